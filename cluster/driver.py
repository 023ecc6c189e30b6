"""The driver: the single controller of a run.  It starts the services, then
runs the PPO loop, which reads top to bottom as the design's data flow:

    prompts  = dataset.next_batch()
    rollouts = actors.generate(prompts)
    scored   = reward_client.score(rollouts)
    learner.make_experience(scored)
    learner.train()
    sync.push(version)
    metrics.log(...)

`Services` owns every process the run starts and stops them all on the way out,
on success or failure.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from cluster.config import FlywheelConfig
from cluster.data import PromptStream, load_prompt_sets
from cluster.metrics import MetricsWriter
from cluster.records import ScoredRollout

log = logging.getLogger("flywheel.driver")


class Services:
    """Reward service, Ray, placement group, rollout actors, learner ranks, weight sync."""

    def __init__(self, cfg: FlywheelConfig, model_path: str, out_dir: Path):
        self.cfg, self.model_path, self.out_dir = cfg, model_path, out_dir
        self._stack = ExitStack()

    def __enter__(self) -> "Services":
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _start(self) -> None:
        cfg = self.cfg
        self.reward = self._start_reward()
        self._start_ray()
        from cluster.groups import LearnerGroup, RolloutGroup, WeightSync, make_placement_group

        import ray

        pg = make_placement_group(cfg)
        self._stack.callback(ray.util.remove_placement_group, pg)
        t0 = time.perf_counter()
        self.rollouts = RolloutGroup(cfg, self.model_path, pg, first_bundle=0)
        self._stack.callback(_kill_all, self.rollouts.actors)
        log.info("%d rollout actor(s) up in %.1f s", len(self.rollouts.actors), time.perf_counter() - t0)
        t0 = time.perf_counter()
        self.learner = LearnerGroup(cfg, self.model_path, pg, first_bundle=cfg.rollout.num_actors)
        self._stack.callback(_kill_all, self.learner.ranks)
        log.info("%d learner rank(s) up in %.1f s", len(self.learner.ranks), time.perf_counter() - t0)
        self.sync = WeightSync(cfg, self.learner, self.rollouts)

    def _start_reward(self):
        """A client of the configured service, or of one started here on loopback."""
        from reward_service.client import RewardClient
        from reward_service.process import start_reward_server

        rc = self.cfg.reward
        url = rc.url
        if url is None:
            server = start_reward_server(
                rule=rc.rule, model_path=rc.model_path, port=rc.port, start_timeout_s=rc.start_timeout_s,
                log_path=str(self.out_dir / "reward_service.log"),
            )
            self._stack.callback(server.stop)
            url = server.url
            log.info("reward service (%s) started at %s", rc.rule or rc.model_path, url)
        # Reachability is already known: run() checked a configured URL before
        # building anything, and start_reward_server waited for /health.
        client = RewardClient(url, timeout_s=rc.timeout_s, batch_size=rc.batch_size)
        self._stack.callback(client.close)
        return client

    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        address = self.cfg.ray.address or os.environ.get("RAY_ADDRESS")
        repo_root = str(Path(__file__).resolve().parent.parent)
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
               # vLLM's per-request INFO lines would drown the step log; its warnings still show.
               "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
        if address:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        else:
            need = (self.cfg.rollout.num_actors * self.cfg.rollout.num_cpus_per_actor
                    + self.cfg.learner.world_size * self.cfg.learner.num_cpus_per_rank)
            num_cpus = self.cfg.ray.num_cpus or max(os.cpu_count() or 1, int(np.ceil(need)))
            ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                     log_to_driver=True, logging_level=logging.WARNING)
        self._stack.callback(ray.shutdown)


def _kill_all(actors: list) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone: nothing to stop
            pass


def _check_reward_reachable(cfg: FlywheelConfig) -> None:
    from reward_service.client import RewardClient

    with RewardClient(cfg.reward.url, timeout_s=cfg.reward.timeout_s) as client:
        client.health(timeout_s=cfg.reward.timeout_s)


def _resolve_model(cfg: FlywheelConfig) -> str:
    if cfg.model.path is not None:
        return cfg.model.path
    from cluster.tiny_model import ensure_embedded_model

    return str(ensure_embedded_model("policy"))


def evaluate_gold(services: Services, stream: PromptStream | None, seed: int) -> dict[str, float]:
    """Mean gold reward of the current policy on the held-out prompts (synthetic task only)."""
    if stream is None:
        return {}
    from cluster.synthetic_task import gold_rewards

    rollout = services.rollouts.generate(stream.all_batch(), seed=seed)
    gold = gold_rewards(rollout.prompts, rollout.completions)
    return {"eval_gold_reward": float(gold.mean()), "eval_gold_reward_std": float(gold.std()),
            "eval_prompts": len(gold)}


class SyncProbe:
    """A fixed token sequence whose logprobs are read from vLLM and the learner around each sync."""

    def __init__(self, prompt_ids: np.ndarray, completion_ids: np.ndarray):
        self.prompt_ids = [int(x) for x in prompt_ids]
        self.completion_ids = [int(x) for x in completion_ids]

    def before(self, services: Services) -> np.ndarray:
        return services.rollouts.sequence_logprobs(self.prompt_ids, self.completion_ids)

    def after(self, services: Services, before: np.ndarray) -> dict[str, float]:
        vllm = services.rollouts.sequence_logprobs(self.prompt_ids, self.completion_ids)
        learner = services.learner.sequence_logprobs(self.prompt_ids, self.completion_ids)
        return {
            "sync_logprob_err": float(np.abs(vllm - learner).max()),  # vLLM vs learner after the sync
            "sync_logprob_shift": float(np.abs(vllm - before).max()),  # vLLM before vs after the sync
        }


def step_record(step: int, scored: ScoredRollout, exp: dict, train: dict, sync_s: float, gen_s: float,
                gold: np.ndarray | None) -> dict[str, Any]:
    rollout = scored.rollout
    record: dict[str, Any] = {
        "step": step,
        "policy_version": rollout.policy_version,
        "reward_mean": exp["reward_mean"],
        "score_mean": float(np.mean(scored.scores)),
        "kl": exp["kl"],
        "policy_loss": train["policy_loss"],
        "value_loss": train["value_loss"],
        "rollout_tokens": rollout.num_tokens,
        "rollout_tokens_per_s": rollout.num_tokens / max(gen_s, 1e-9),
        "gen_s": gen_s,
        "score_s": scored.score_s,
        "train_s": train["train_s"] + exp["make_experience_s"],
        "sync_s": sync_s,
        "stop_fraction": float(np.mean([r == "stop" for r in rollout.finish_reasons])),
    }
    if gold is not None:
        record["gold_reward_mean"] = float(gold.mean())
    record.update({k: v for k, v in exp.items() if k not in record})
    record.update({k: v for k, v in train.items() if k not in record})
    return record


def run(cfg: FlywheelConfig) -> dict[str, Any]:
    """Run the configured PPO steps; returns the summary also written to summary.json."""
    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    t_start = time.perf_counter()
    if cfg.reward.url is not None:
        _check_reward_reachable(cfg)  # fail in seconds, before building or starting anything
    model_path = _resolve_model(cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts, eval_prompts = load_prompt_sets(cfg, tokenizer, out_dir / "data")
    synthetic = cfg.data.prompts_path is None  # the gold reward exists only for the synthetic task
    metrics = MetricsWriter(out_dir / "metrics.jsonl")
    summary: dict[str, Any] = {"model_path": model_path, "steps": cfg.run.steps}
    with Services(cfg, model_path, out_dir) as services:
        summary["startup_s"] = time.perf_counter() - t_start
        summary["before"] = evaluate_gold(services, eval_prompts, seed=cfg.run.seed + 10_000)
        log.info("before training: %s", summary["before"])
        probe = None
        for step in range(cfg.run.steps):
            batch = prompts.next_batch()
            t0 = time.perf_counter()
            rollout = services.rollouts.generate(batch, seed=cfg.run.seed * 1_000_003 + step)
            gen_s = time.perf_counter() - t0
            scored = services.reward.score_rollout(rollout)
            gold = _gold(rollout) if synthetic else None
            exp_stats = services.learner.make_experience(scored)
            train_stats = services.learner.train()
            if probe is None and cfg.run.check_sync:
                probe = SyncProbe(rollout.prompt_ids[0], rollout.completion_ids[0])
            before = probe.before(services) if probe else None
            sync_s = services.sync.push(version=step + 1)
            record = step_record(step, scored, exp_stats, train_stats, sync_s, gen_s, gold)
            if probe:
                record.update(probe.after(services, before))
            metrics.log(record)
        summary["after"] = evaluate_gold(services, eval_prompts, seed=cfg.run.seed + 10_000)
        log.info("after training: %s", summary["after"])
        if cfg.run.save_final:
            summary["final_checkpoint"] = services.learner.save_hf(str((out_dir / "final").resolve()))
    metrics.close()
    summary["total_s"] = time.perf_counter() - t_start
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _gold(rollout) -> np.ndarray:
    from cluster.synthetic_task import gold_rewards

    return gold_rewards(rollout.prompts, rollout.completions)

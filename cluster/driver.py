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
on success or failure. Every `run.checkpoint_every` steps the learner ranks and
the driver write a checkpoint (`cluster/checkpoints.py`); `run.resume` restores
the latest one before the first step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cluster import checkpoints
from cluster.config import FlywheelConfig, advisories
from cluster.dashboard import live_dashboard
from cluster.data import PromptStream, load_prompt_sets
from cluster.exporters import step_sinks
from cluster.metrics import MetricsWriter
from flywheel.records import ExperienceStats, PromptBatch, ScoredRollout, TrainStats
from flywheel.seeds import sample_seeds
from flywheel.task_splits import write_jsonl
from flywheel.tasks import get_task

log = logging.getLogger("flywheel.driver")


class Services:
    """Reward service, Ray, placement group, rollout actors, learner ranks, weight sync."""

    def __init__(self, cfg: FlywheelConfig, model_path: str, dtype: str, out_dir: Path,
                 before_actors: Callable[[], object] | None = None):
        """`before_actors`, when given, is called once Ray is up and before any actor is made: what
        must succeed before the run's heavy processes start (the driver waits there for its prompts)."""
        self.cfg, self.model_path, self.dtype, self.out_dir = cfg, model_path, dtype, out_dir
        self._before_actors = before_actors
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
        start_ray(cfg, self._stack)
        if self._before_actors is not None:
            self._before_actors()
        from cluster.groups import LearnerGroup, RolloutGroup, WeightSync, kill_actors, make_placement_group

        import ray

        pg = make_placement_group(cfg)
        self._stack.callback(ray.util.remove_placement_group, pg)
        # Both groups start at once: a start is mostly one process importing and building, so on a
        # machine with few cores the two overlap instead of adding up.
        t0 = time.perf_counter()
        self.rollouts = RolloutGroup(cfg, self.model_path, self.dtype, pg, first_bundle=0)
        self._stack.callback(kill_actors, self.rollouts.actors)
        self.learner = LearnerGroup(cfg, self.model_path, self.dtype, pg, first_bundle=cfg.rollout.num_actors)
        self._stack.callback(self.learner.shutdown)
        self.rollouts.wait_started()
        log.info("%d rollout actor(s) up in %.1f s", len(self.rollouts.actors), time.perf_counter() - t0)
        self.learner.wait_started()
        log.info("%d learner rank(s) up in %.1f s", len(self.learner.ranks), time.perf_counter() - t0)
        self.sync = WeightSync(cfg, self.learner, self.rollouts)

    def _start_reward(self):
        """The configured service's client, or the run's own service on loopback (restarted if it dies)."""
        from reward_service.client import RewardClient
        from reward_service.process import SupervisedRewardService, start_reward_server

        rc = self.cfg.reward
        self.reward_log = None
        if rc.url is not None:
            # Reachability is already known: run() checked the URL before building anything. The run
            # cannot restart a service it did not start, so the client retries up to its deadline.
            client = RewardClient(rc.url, timeout_s=rc.timeout_s, batch_size=rc.batch_size,
                                  retries=None, max_backoff_s=2.0)
            self._stack.callback(client.close)
            return client

        def start(port: int, start_timeout_s: float):
            return start_reward_server(rule=rc.rule, model_path=rc.model_path, port=port,
                                       start_timeout_s=start_timeout_s, log_path=str(self.out_dir / "reward_service.log"))

        server = start(rc.port, rc.start_timeout_s)
        service = SupervisedRewardService(
            server, RewardClient(server.url, timeout_s=rc.timeout_s, batch_size=rc.batch_size), start,
            start_timeout_s=rc.start_timeout_s, deadline_s=self.cfg.run.step_timeout_s,
            max_restarts=rc.max_restarts, pid_path=str(self.out_dir / "reward_service.pid"))
        self._stack.callback(service.stop)
        self.reward_log = Path(service.log_path)
        log.info("reward service (%s) started at %s", rc.rule or rc.model_path, service.url)
        return service


def _check_reward_reachable(cfg: FlywheelConfig) -> None:
    from reward_service.client import RewardClient

    with RewardClient(cfg.reward.url, timeout_s=cfg.reward.timeout_s) as client:
        client.health(timeout_s=cfg.reward.timeout_s)


def resolve_model(cfg: FlywheelConfig) -> str:
    if cfg.model.path is not None:
        return cfg.model.path
    from flywheel.tiny_model import embedded_spec, ensure_embedded_model

    return str(ensure_embedded_model("policy", embedded_spec(cfg.model.embedded)))


def start_ray(cfg: FlywheelConfig, stack: ExitStack) -> None:
    """Join the configured (or the job's) Ray cluster, or start a local one sized for the run."""
    import ray

    if ray.is_initialized():
        return
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    repo_root = str(Path(__file__).resolve().parent.parent)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
           # vLLM's per-request INFO lines would drown the step log; its warnings still show.
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        need = (cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor
                + cfg.learner.world_size * cfg.learner.num_cpus_per_rank)
        num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(np.ceil(need)))
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=True, logging_level=logging.WARNING)
    stack.callback(ray.shutdown)
    _restore_stop_handlers(handlers)


def _restore_stop_handlers(handlers: dict) -> None:
    """ray.init replaces the SIGTERM handler (its own exits at once, or its core worker's aborts
    the process) with nothing stopped; put the launcher's back, SIGINT's too: they unwind the run."""
    if threading.current_thread() is threading.main_thread():
        for signum, handler in handlers.items():
            if callable(handler):
                signal.signal(signum, handler)


class RunError(RuntimeError):
    """The run stopped for a reason it names (bad scores, a failed sync check); printed without a traceback."""


def with_seeds(batch: PromptBatch, cfg: FlywheelConfig, step: int, stream: str = "train") -> PromptBatch:
    """The batch with one sampling seed per (prompt, sample) of this step."""
    batch.seeds = sample_seeds(cfg.run.seed, step, len(batch), cfg.rollout.samples_per_prompt, stream)
    return batch


def check_scores(scored: ScoredRollout, url: str, log_path: Path | None) -> None:
    """Stop the step before a NaN or missing score reaches the advantages, the optimiser and vLLM."""
    bad = np.flatnonzero(~np.isfinite(scored.scores))
    if not len(bad):
        return
    r, i = scored.rollout, int(bad[0])
    where = f"; its log is {log_path}" if log_path else ""
    raise RunError(
        f"the reward service at {url} returned no finite score for {len(bad)} of {len(scored.scores)} samples "
        f"(rows {bad[:10].tolist()}; row {i}: prompt {r.prompts[i][:80]!r}, completion {r.completions[i][:80]!r} "
        f"scored {scored.scores[i]}). Nothing was trained on this step. Fix the scorer{where}"
    )


def evaluate_gold(services: Services, stream: PromptStream | None, cfg: FlywheelConfig,
                  samples_path: Path | None = None) -> dict[str, float]:
    """Mean gold reward of the current policy on the held-out prompts (embedded tasks only).

    Every evaluation uses the same seeds, so before and after differ only by the policy, and two
    runs with the same `run.seed` sample each (prompt, sample) from the same stream: their
    `samples_path` files (prompt, sample, completion, gold per line) compare policies pairwise.
    """
    if stream is None:
        return {}
    batch = with_seeds(stream.all_batch(), cfg, step=0, stream="eval")
    rollout = services.rollouts.generate(batch)
    gold = get_task(cfg.data.task).gold(rollout.prompts, rollout.completions)
    if samples_path is not None:
        n = cfg.rollout.samples_per_prompt
        write_jsonl(samples_path, [{"prompt": p, "sample": i % n, "completion": c, "gold": float(g)}
                                   for i, (p, c, g) in enumerate(zip(rollout.prompts, rollout.completions, gold))])
    return {"eval_gold_reward": float(gold.mean()), "eval_gold_reward_std": float(gold.std()),
            "eval_prompts": len(batch), "eval_samples": len(gold)}


# A synced actor closes at least half of its gap to the learner's new weights; a stale one closes none.
STALE_FRACTION = 0.5


class SyncProbe:
    """A fixed token sequence whose logprobs are read from every actor and the learner around each sync."""

    def __init__(self, prompt_ids: np.ndarray, completion_ids: np.ndarray, max_model_len: int, tolerance: float,
                 max_tokens: int | None = None):
        # vLLM scores a sequence as a prompt that must leave room for one generated token; at most
        # max_tokens of it (the completion's first tokens, after the end of the prompt).
        budget = max_model_len - 1 if max_tokens is None else min(max_model_len - 1, max_tokens)
        completion = [int(x) for x in completion_ids][: max(1, budget - len(prompt_ids))]
        self.prompt_ids = [int(x) for x in prompt_ids][-(budget - len(completion)) :]
        self.completion_ids = completion
        self.tolerance = tolerance

    def before(self, services: Services) -> list[np.ndarray]:
        return services.rollouts.sequence_logprobs(self.prompt_ids, self.completion_ids)

    def after(self, services: Services, before: list[np.ndarray]) -> dict[str, float]:
        """Errors against the learner (each actor must be within tolerance) and shifts from before.

        An actor fails when its gap to the learner exceeds the tolerance and is not clearly smaller
        than its gap before the sync: a stale actor keeps the whole gap, while a synced one keeps
        only rounding, which in bf16 can pass 0.1 nats on a token the policy has made very unlikely
        (seen once in 60 GRPO steps: 0.27 where the update moved the probe by about 0.3-0.5).
        """
        # The learner reads its logprobs while the actors read theirs (separate processes and cores).
        learner = services.learner.start_sequence_logprobs(self.prompt_ids, self.completion_ids)
        actors = services.rollouts.sequence_logprobs(self.prompt_ids, self.completion_ids)
        learner = learner.result()
        errors = [float(np.abs(v - learner).max()) for v in actors]
        gaps_before = [float(np.abs(b - learner).max()) for b in before]
        failed = [i for i, (e, g) in enumerate(zip(errors, gaps_before))
                  if e > self.tolerance and e > STALE_FRACTION * g]
        if failed:
            worst = max(failed, key=errors.__getitem__)
            raise RunError(
                f"weight sync check failed: rollout actor {worst}'s logprobs of the probe sequence differ from "
                f"the learner's by {errors[worst]:.4g}, above sync.check_tolerance={self.tolerance:g} and "
                f"{errors[worst] / max(gaps_before[worst], 1e-12):.0%} of its gap before the sync "
                f"({gaps_before[worst]:.4g}) (all actors: {[round(e, 5) for e in errors]}); the actor is not "
                f"generating with the learner's weights"
            )
        return {
            "sync_logprob_err": max(errors),  # the worst actor against the learner, after the sync
            "sync_logprob_shift": min(float(np.abs(v - b).max()) for v, b in zip(actors, before)),  # least moved actor
        }


def sync_tolerance(cfg: FlywheelConfig, dtype: str) -> float:
    if cfg.sync.check_tolerance is not None:
        return cfg.sync.check_tolerance
    return 0.1 if dtype == "bfloat16" else 0.002


def step_record(step: int, scored: ScoredRollout, exp: ExperienceStats, train: TrainStats, sync_s: float,
                gold: np.ndarray | None) -> dict[str, Any]:
    rollout = scored.rollout
    gen_s = rollout.gen_s  # the slowest actor's generate time
    record: dict[str, Any] = {
        "step": step,
        "policy_version": rollout.policy_version,
        # Policy versions the rollouts lag behind the learner (which is at version `step` when they start).
        "staleness": step - rollout.policy_version,
        "rollout_tokens": rollout.num_tokens,
        "rollout_tokens_per_s": rollout.num_tokens / max(gen_s, 1e-9),
        "actor_tokens_per_s": rollout.actor_tokens_per_s,
        "rollout_samples": len(rollout.completions),
        "rollout_samples_per_s": len(rollout.completions) / max(gen_s, 1e-9),
        "gen_s": gen_s,
        "score_s": scored.score_s,
        "score_std": float(np.std(scored.scores)),
        "score_failed_attempts": scored.failed_attempts,
        "reward_service_restarts": scored.restarts,
        "sync_s": sync_s,
        "actor_restarts": rollout.actor_restarts,
        "stop_fraction": float(np.mean([r == "stop" for r in rollout.finish_reasons])),
        **asdict(exp),
        **asdict(train),
    }
    # The learner's share of the step: making experience plus the update (update_s alone).
    record["update_s"] = train.train_s
    record["train_s"] = train.train_s + exp.make_experience_s
    if gold is not None:
        record["gold_reward_mean"] = float(gold.mean())
        record["gold_reward_std"] = float(gold.std())
    return record


def run(cfg: FlywheelConfig) -> dict[str, Any]:
    """Run the configured PPO steps; returns the summary also written to summary.json.

    A learner rank or rollout actor that dies stops the run: every process is stopped on the
    way out, and the error names the last complete checkpoint to resume from.
    """
    from cluster.groups import RemoteCallError

    try:
        return _run(cfg)
    except RemoteCallError as exc:
        raise RunError(f"{exc}. Every process of the run was stopped; "
                       f"{checkpoints.describe_latest(cfg.run.output_dir)}") from None


def _run(cfg: FlywheelConfig) -> dict[str, Any]:
    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resume = checkpoints.load(cfg.run.resume, cfg) if cfg.run.resume else None  # fails before anything starts
    if resume is None:
        checkpoints.fresh_start(out_dir)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    t_start = time.perf_counter()
    for note in advisories(cfg):
        log.warning("config: %s", note)
    machine, precision = describe_machine(cfg)
    if cfg.reward.url is not None:
        _check_reward_reachable(cfg)  # fail in seconds, before building or starting anything
    model_path = resolve_model(cfg)
    prompt_sets = _load_prompts_beside_ray(cfg, model_path, out_dir / "data")
    synthetic = cfg.data.prompts_path is None  # a gold reward exists only for the embedded tasks' prompts
    task = get_task(cfg.data.task)
    if resume:
        checkpoints.truncate_metrics(out_dir / "metrics.jsonl", resume.driver.step)
    metrics = MetricsWriter(out_dir / "metrics.jsonl", cfg.run.steps, sinks=step_sinks(cfg.monitor, out_dir),
                            resumed=resume is not None)
    summary: dict[str, Any] = {"model_path": model_path, "steps": cfg.run.steps, "dtype": precision.dtype,
                               "dtype_reason": precision.reason, "machine": machine}
    with (live_dashboard(cfg.monitor, out_dir, metrics.progress),
          Services(cfg, model_path, precision.dtype, out_dir, before_actors=prompt_sets.result) as services):
        prompts, eval_prompts = prompt_sets.result()
        summary["startup_s"] = time.perf_counter() - t_start
        if resume is None:
            first, probe = 0, None
            summary["before"] = evaluate_gold(services, eval_prompts, cfg, out_dir / "eval_before.jsonl")
            log.info("before training: %s", summary["before"])
        else:  # the "before" evaluation is the original run's, kept in the checkpoint
            first, probe = restore(services, prompts, resume, cfg, precision.dtype)
            summary.update(before=resume.driver.before, resumed_from=str(resume.path))
        metrics.expect(cfg.run.steps, done=first)
        lag = cfg.rollout.max_staleness
        actor_version = first  # the actors hold the learner's weights at the start (a resume pushed them)
        generating = None  # the batch the actors are working on, started ahead in asynchronous mode

        def push(version: int) -> dict[str, float]:
            """The learner's weights to every actor (idle, so no sample mixes two versions), checked."""
            t0 = time.perf_counter()
            before = probe.before(services) if probe else None
            t1 = time.perf_counter()
            figures = {"sync_s": services.sync.push(version=version)}
            if probe:
                t2 = time.perf_counter()
                figures.update(probe.after(services, before))
                figures["sync_check_s"] = (t1 - t0) + (time.perf_counter() - t2)  # the probe's reads
            if cfg.sync.verify_weights:
                figures["sync_weights_verified"] = services.sync.verify()
            return figures

        for step in range(first, cfg.run.steps):
            t_step = time.perf_counter()
            if generating is None:
                generating = services.rollouts.start(with_seeds(prompts.next_batch(), cfg, step))
            rollout = services.rollouts.finish(generating)
            gen_wait_s, generating, synced = time.perf_counter() - t_step, None, {"sync_s": 0.0}
            if probe is None and cfg.run.check_sync:
                probe = SyncProbe(rollout.prompt_ids[0], rollout.completion_ids[0], cfg.model.max_model_len,
                                  sync_tolerance(cfg, precision.dtype), cfg.sync.probe_tokens)
            # Asynchronous: the actors start on the next batch before the learner trains on this one.
            # Not across a checkpoint: the next batch then comes from the checkpointed weights, so a
            # resumed run generates it again the same.
            ahead = step + 1
            if lag and ahead < cfg.run.steps and not checkpoints.is_due(ahead, cfg):
                if actor_version < ahead - lag:  # it would lag more than max_staleness when trained on
                    synced, actor_version = push(step), step
                generating = services.rollouts.start(with_seeds(prompts.next_batch(), cfg, ahead))
            scored = services.reward.score_rollout(rollout)
            check_scores(scored, services.reward.url, services.reward_log)
            gold = task.gold(rollout.prompts, rollout.completions) if synthetic else None
            exp_stats = services.learner.make_experience(scored)
            train_stats = services.learner.train()
            if generating is None:  # synchronous, the last step, or before a checkpoint: sync now
                synced, actor_version = push(step + 1), step + 1
            record = step_record(step, scored, exp_stats, train_stats, synced.pop("sync_s"), gold)
            record.update(synced, gen_wait_s=gen_wait_s, step_s=time.perf_counter() - t_step)
            metrics.log(record)
            if checkpoints.is_due(step + 1, cfg):
                save_checkpoint(services, cfg, step + 1, prompts, summary["before"], probe)
        if not cfg.run.steps:  # an evaluation only: the policy is the one just scored, and nothing to save
            summary["after"] = summary["before"]
        else:
            summary["after"] = evaluate_gold(services, eval_prompts, cfg, out_dir / "eval_after.jsonl")
            log.info("after training: %s", summary["after"])
        if cfg.run.save_final and cfg.run.steps:
            summary["final_checkpoint"] = services.learner.save_hf(str((out_dir / "final").resolve()))
        summary["learner_peak_memory_gib"] = services.learner.peak_memory_gib()
        summary["learner_allocator"] = services.learner.allocators()
    metrics.close()
    summary["total_s"] = time.perf_counter() - t_start
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _load_prompts_beside_ray(cfg: FlywheelConfig, model_path: str, data_dir: Path) -> Future:
    """The training and eval prompt streams, loaded in a thread while the main thread starts the
    reward service and Ray: the tokenizer's import and the tokenising take seconds of one core, while
    Ray's start mostly waits on its own processes. A bad prompt still stops the run before any actor
    starts (Services waits for the prompts there).

    Python 3.11 raises a deadlock error when two threads import modules of one package at once in
    opposite orders, so what the reward client and Ray's start import lazily and the tokenizer's
    import would also import is imported here first. With these, the two threads' imports share no
    package (measured with ray 2.60, transformers and datasets as pinned)."""
    import ctypes.util  # noqa: F401

    import anyio  # noqa: F401
    import h11  # noqa: F401
    import httpcore._sync.http11  # noqa: F401
    import ray  # noqa: F401

    import cluster.groups  # noqa: F401
    import reward_service.client  # noqa: F401
    import reward_service.process  # noqa: F401

    def load() -> tuple[PromptStream, PromptStream | None]:
        from transformers import AutoTokenizer

        return load_prompt_sets(cfg, AutoTokenizer.from_pretrained(model_path), data_dir)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flywheel-prompts")
    try:
        return pool.submit(load)
    finally:
        pool.shutdown(wait=False)  # its one thread ends with this job


def save_checkpoint(services: Services, cfg: FlywheelConfig, steps_done: int, prompts: PromptStream,
                    before: dict[str, float], probe: SyncProbe | None) -> Path:
    """Every learner rank writes its engines and state into a .tmp folder, the driver adds its own, then it is renamed."""
    tmp = checkpoints.begin(cfg.run.output_dir, steps_done)
    holds = services.learner.save_checkpoint(str(tmp))
    state = checkpoints.driver_state(steps_done, prompts, before, probe)
    return checkpoints.commit(tmp, cfg, state, holds, reference_model=services.model_path)


def restore(services: Services, prompts: PromptStream, resume: checkpoints.Checkpoint, cfg: FlywheelConfig,
            dtype: str) -> tuple[int, SyncProbe | None]:
    """Load a checkpoint into the learner ranks, the prompt stream and the driver's RNGs, and push the
    restored policy to the rollout actors (they start from the base model); the steps done and the
    run's sync probe (the same sequence as before the stop, so its figures compare)."""
    step = services.learner.load_checkpoint(str(resume.path.resolve()))
    state = resume.driver
    prompts.restore(state.prompts)
    checkpoints.restore_driver_rngs(state)
    services.sync.push(version=state.policy_version)
    log.info("resumed from %s: %d steps done, policy version %d", resume.path, step, state.policy_version)
    if state.probe is None:
        return step, None
    return step, SyncProbe(np.asarray(state.probe["prompt_ids"]), np.asarray(state.probe["completion_ids"]),
                           cfg.model.max_model_len, sync_tolerance(cfg, dtype), cfg.sync.probe_tokens)


def describe_machine(cfg: FlywheelConfig):
    """Log the machine in one line and choose the dtype for it."""
    from cluster.doctor import machine_report, one_line
    from flywheel.hardware import resolve_dtype

    precision = resolve_dtype(cfg.model.dtype, cfg.run.device)
    if precision.warning:
        log.warning("%s", precision.warning)
    machine = machine_report(cfg.run.device)
    log.info("machine: %s", one_line(machine))
    log.info("dtype %s (model.dtype=%s): %s", precision.dtype, cfg.model.dtype, precision.reason)
    return machine, precision


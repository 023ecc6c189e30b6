"""The stages before and beside RL, run by `python -m cluster.launch` with
`run.stage: sft | reward_model | dpo` (PPO is `cluster/driver.py`).

Each stage loads its data (`flywheel/data_formats.py`, or the synthetic task's
when no data is given), holds out `eval_fraction` of it, trains on the learner
ranks (`learner/stages.py`, one Ray actor per DeepSpeed rank), reports its
held-out figure before and after, and saves a Hugging Face model in
`run.output_dir/model`, which the next stage reads as it is:

- sft: held-out loss per response token; the policy for `model.path`;
- reward_model: held-out agreement with the data's ordering of the pairs; the
  judge for `reward.model_path` (served by `reward_service` as saved);
- dpo: held-out share of pairs whose implicit reward (policy over reference)
  prefers chosen; the policy.

Every batch writes a line to `metrics.jsonl`; `summary.json` holds the figures.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cluster.config import FlywheelConfig
from cluster.driver import describe_machine, resolve_model, start_ray
from cluster.exporters import TensorBoardSink
from cluster.metrics import MetricsWriter
from flywheel import data_formats, synthetic_task
from flywheel.tasks import get_task

log = logging.getLogger("flywheel.stages")


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle, at least one item held out."""
    order = np.random.default_rng(seed).permutation(len(items))
    held = max(1, int(round(len(items) * fraction)))
    return [items[i] for i in order[held:]], [items[i] for i in order[:held]]


def _batches(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Full batches of a seeded permutation (the last partial batch is dropped, so ranks split evenly)."""
    order = np.random.default_rng(seed).permutation(n)
    return [order[i : i + size] for i in range(0, n - size + 1, size)]


def _eval_batches(n: int, size: int, world: int) -> list[np.ndarray]:
    """Batches over the held-out items, each a multiple of the ranks (at most world - 1 items are left out)."""
    usable = n - n % world
    return [np.arange(i, min(i + size, usable)) for i in range(0, usable, size)]


def _sft_examples(cfg: FlywheelConfig) -> list[data_formats.SFTExample]:
    if cfg.sft.data:
        return data_formats.load_sft(cfg.sft.data)
    demos = get_task(cfg.data.task).demonstrations(cfg.sft.examples, cfg.run.seed)
    return [data_formats.SFTExample(prompt=p, response=c) for p, c in demos]


def _pairs(source: str | None, count: int, seed: int) -> list[data_formats.PreferenceExample]:
    if source:
        return data_formats.load_preferences(source)
    return [data_formats.PreferenceExample(p.prompt, p.chosen, p.rejected, gold_margin=p.gold_chosen - p.gold_rejected)
            for p in synthetic_task.make_preference_pairs(count, seed)]


@functools.lru_cache(maxsize=2)
def _tokens(model_path: str) -> "_Tokens":
    return _Tokens(model_path)


class _Tokens:
    """Policy-tokenised prompts and completions (completions end with EOS when asked)."""

    def __init__(self, model_path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path)

    def prompts(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(self.tok(t, add_special_tokens=True)["input_ids"], dtype=np.int32) for t in texts]

    def completions(self, texts: list[str], eos: bool) -> list[np.ndarray]:
        out = []
        for t in texts:
            ids = self.tok(t, add_special_tokens=False)["input_ids"]
            out.append(np.asarray(ids + ([self.tok.eos_token_id] if eos else []), dtype=np.int32))
        return out


def _pick(seq: list, rows: np.ndarray) -> list:
    return [seq[i] for i in rows]


def _load_sft(cfg: FlywheelConfig) -> tuple[list, list]:
    return _split(_sft_examples(cfg), cfg.sft.eval_fraction, cfg.run.seed)


def _train_sft(cfg: FlywheelConfig, group, model_path: str, data: tuple[list, list],
               metrics: MetricsWriter) -> dict[str, Any]:
    sc = cfg.sft
    train, held = data
    tokens = _tokens(model_path)
    tp, tr = tokens.prompts([e.prompt for e in train]), tokens.completions([e.response for e in train], eos=True)
    hp, hr = tokens.prompts([e.prompt for e in held]), tokens.completions([e.response for e in held], eos=True)

    def held_out_loss() -> float:
        nll = count = 0.0
        for rows in _eval_batches(len(hp), sc.batch_size, cfg.learner.world_size):
            a, b = group.call("eval_loss", _pick(hp, rows), _pick(hr, rows), what="the held-out loss")
            nll, count = nll + a, count + b
        return nll / max(count, 1.0)

    before = held_out_loss()
    log.info("sft: %d train / %d held-out examples; held-out loss %.4f", len(train), len(held), before)
    step = 0
    metrics.expect(sc.epochs * (len(train) // sc.batch_size))
    for epoch in range(sc.epochs):
        for rows in _batches(len(train), sc.batch_size, cfg.run.seed + epoch):
            loss = group.call("train_batch", _pick(tp, rows), _pick(tr, rows), what="an SFT step")
            metrics.log({"step": step, "epoch": epoch, "loss": loss})
            step += 1
    after = held_out_loss()
    log.info("sft: held-out loss %.4f -> %.4f", before, after)
    return {"held_out_loss_before": before, "held_out_loss_after": after, "train_examples": len(train),
            "held_out_examples": len(held), "steps": step}


def _agreement(group, pairs: list, batch_size: int, world: int) -> dict[str, float]:
    """The judge's held-out agreement with the pairs' labels, and with the gold labeller's ordering
    where the data carries one (the synthetic task's labels are noisy choices of that labeller)."""
    right = count = gold_right = gold_count = 0.0
    for rows in _eval_batches(len(pairs), batch_size, world):
        sums = group.call("evaluate", [pairs[i].prompt for i in rows], [pairs[i].chosen for i in rows],
                          [pairs[i].rejected for i in rows], [pairs[i].gold_margin for i in rows],
                          what="the held-out agreement")
        right, count, gold_right, gold_count = (a + b for a, b in zip((right, count, gold_right, gold_count), sums))
    out = {"labels": right / max(count, 1.0)}
    if gold_count:
        out["gold"] = gold_right / gold_count
    return out


def _label_noise(pairs: list) -> dict[str, float]:
    """How often the labels themselves agree with the gold ordering: the ceiling of label agreement."""
    ordered = [p.gold_margin for p in pairs if p.gold_margin]
    return {"held_out_labels_agree_with_gold": sum(m > 0 for m in ordered) / len(ordered)} if ordered else {}


def _load_reward_model(cfg: FlywheelConfig) -> tuple[list, list]:
    rc = cfg.reward_model
    return _split(_pairs(rc.data, rc.pairs, cfg.run.seed), rc.eval_fraction, cfg.run.seed)


def _train_reward_model(cfg: FlywheelConfig, group, model_path: str, data: tuple[list, list],
                        metrics: MetricsWriter) -> dict[str, Any]:
    rc = cfg.reward_model
    train, held = data
    world = cfg.learner.world_size
    before = _agreement(group, held, rc.batch_size, world)
    log.info("reward_model: %d train / %d held-out pairs; held-out agreement %s", len(train), len(held),
             _agreement_text(before))
    step = 0
    metrics.expect(rc.epochs * (len(train) // rc.batch_size))
    for epoch in range(rc.epochs):
        for rows in _batches(len(train), rc.batch_size, cfg.run.seed + epoch):
            batch = _pick(train, rows)
            loss, acc = group.call("train_batch", [p.prompt for p in batch], [p.chosen for p in batch],
                                   [p.rejected for p in batch], [p.weight for p in batch], what="a reward-model step")
            metrics.log({"step": step, "epoch": epoch, "loss": loss, "accuracy": acc})
            step += 1
    after = _agreement(group, held, rc.batch_size, world)
    log.info("reward_model: held-out agreement %s -> %s", _agreement_text(before), _agreement_text(after))
    summary = {"held_out_agreement_before": before["labels"], "held_out_agreement_after": after["labels"],
               "train_pairs": len(train), "held_out_pairs": len(held), "steps": step}
    if "gold" in after:
        summary.update(held_out_gold_agreement_before=before["gold"], held_out_gold_agreement_after=after["gold"],
                       **_label_noise(held))
    return summary


def _agreement_text(agreement: dict[str, float]) -> str:
    gold = f", gold ordering {agreement['gold']:.4f}" if "gold" in agreement else ""
    return f"labels {agreement['labels']:.4f}{gold}"


def _load_dpo(cfg: FlywheelConfig) -> tuple[list, list]:
    return _split(_pairs(cfg.dpo.data, cfg.dpo.pairs, cfg.run.seed), cfg.dpo.eval_fraction, cfg.run.seed)


def _train_dpo(cfg: FlywheelConfig, group, model_path: str, data: tuple[list, list],
               metrics: MetricsWriter) -> dict[str, Any]:
    dc, world = cfg.dpo, cfg.learner.world_size
    tokens = _tokens(model_path)

    def encode(pairs: list) -> dict[str, Any]:
        enc = {"prompts": tokens.prompts([p.prompt for p in pairs]),
               "chosen": tokens.completions([p.chosen for p in pairs], eos=False),
               "rejected": tokens.completions([p.rejected for p in pairs], eos=False)}
        # The reference never changes: its logprobs are computed once for every pair.
        enc["ref_c"], enc["ref_r"] = np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32)
        for rows in _eval_batches(len(pairs), dc.batch_size, world):
            enc["ref_c"][rows], enc["ref_r"][rows] = group.call(
                "reference_logps", _pick(enc["prompts"], rows), _pick(enc["chosen"], rows),
                _pick(enc["rejected"], rows), what="reference logprobs")
        return enc

    def args(enc: dict[str, Any], rows: np.ndarray) -> tuple:
        return (_pick(enc["prompts"], rows), _pick(enc["chosen"], rows), _pick(enc["rejected"], rows),
                enc["ref_c"][rows], enc["ref_r"][rows])

    def held_out_preference(enc: dict[str, Any]) -> float:
        right = count = 0.0
        for rows in _eval_batches(len(enc["prompts"]), dc.batch_size, world):
            r, c = group.call("evaluate", *args(enc, rows), what="the held-out preference")
            right, count = right + r, count + c
        return right / max(count, 1.0)

    train, held = (encode(part) for part in data)
    before = held_out_preference(held)
    step, stats = 0, {}
    metrics.expect(dc.epochs * (len(train["prompts"]) // dc.batch_size))
    for epoch in range(dc.epochs):
        for rows in _batches(len(train["prompts"]), dc.batch_size, cfg.run.seed + epoch):
            stats = group.call("train_batch", *args(train, rows), what="a DPO step")
            metrics.log({"step": step, "epoch": epoch, **stats})
            step += 1
    after = held_out_preference(held)
    log.info("dpo: held-out pairs preferred %.4f -> %.4f", before, after)
    return {"held_out_preferred_before": before, "held_out_preferred_after": after, "last_batch": stats,
            "train_pairs": len(train["prompts"]), "held_out_pairs": len(held["prompts"]), "steps": step}


def _stage_worker(cfg: FlywheelConfig, model_path: str) -> tuple[type, str, dict[str, Any], Callable, Callable]:
    """(worker class, the model it starts from, its arguments, the data loader, the training loop) for run.stage.
    The arguments leave out the learning-rate schedule, which needs the data's size (`_schedule`)."""
    from flywheel.pretrained import minilm_path
    from learner.stages import DPOWorker, RewardModelWorker, SFTWorker

    lc, sc = cfg.learner, getattr(cfg, cfg.run.stage)
    common = {"weight_decay": lc.weight_decay if sc.weight_decay is None else sc.weight_decay,
              "max_grad_norm": lc.max_grad_norm}
    if cfg.run.stage == "sft":
        return SFTWorker, model_path, {"lr": cfg.sft.lr, **common}, _load_sft, _train_sft
    if cfg.run.stage == "reward_model":
        rc = cfg.reward_model
        backbone = {"policy": model_path, "minilm": None, "path": rc.backbone_path}[rc.backbone] or minilm_path()
        kwargs = {"lr": rc.lr, "max_length": rc.max_length, **common}
        return RewardModelWorker, backbone, kwargs, _load_reward_model, _train_reward_model
    kwargs = {"lr": cfg.dpo.lr, "beta": cfg.dpo.beta, "loss": cfg.dpo.loss, **common}
    return DPOWorker, model_path, kwargs, _load_dpo, _train_dpo


def _schedule(sc, train_items: int):
    from learner.engine import LRSchedule

    # The same count as the training loops: full batches only, every epoch.
    return LRSchedule(sc.lr_schedule, sc.warmup_steps, sc.epochs * (train_items // sc.batch_size))


def run_stage(cfg: FlywheelConfig) -> dict[str, Any]:
    """Train the configured stage; returns the summary also written to summary.json."""
    from cluster.groups import StageGroup

    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    t_start = time.perf_counter()
    machine, precision = describe_machine(cfg)
    worker_cls, start_from, kwargs, load, train = _stage_worker(cfg, resolve_model(cfg))
    data = load(cfg)  # bad data stops the run here, before anything starts
    kwargs["schedule"] = _schedule(getattr(cfg, cfg.run.stage), len(data[0]))
    summary: dict[str, Any] = {"stage": cfg.run.stage, "start_from": start_from, "dtype": precision.dtype,
                               "machine": machine}
    tensorboard = [TensorBoardSink(out_dir / "tensorboard")] if cfg.monitor.tensorboard else []
    metrics = MetricsWriter(out_dir / "metrics.jsonl", sinks=tensorboard)
    with ExitStack() as stack:
        start_ray(cfg, stack)
        # SFT and DPO tokenise in the driver: the tokenizer's import (seconds of one core) runs while
        # the ranks start.
        tokenizer = (lambda: _tokens(start_from)) if cfg.run.stage in ("sft", "dpo") else None
        group = StageGroup(cfg, worker_cls, start_from, precision.dtype, while_starting=tokenizer, **kwargs)
        stack.callback(group.shutdown)
        summary.update(train(cfg, group, start_from, data, metrics))
        summary["model"] = group.call("save_hf", str((out_dir / "model").resolve()), what="saving the model")
    metrics.close()
    summary["total_s"] = time.perf_counter() - t_start
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

"""Prompts for the driver: loading (through `datasets`), tokenising, checking
they fit the context, and serving one batch per step in a seeded order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cluster.config import ConfigError, FlywheelConfig
from flywheel.records import PromptBatch


class PromptStream:
    """Tokenised prompts served in seeded epochs: `next_batch()` per step."""

    def __init__(self, prompts: list[str], tokenizer, batch_size: int, seed: int, max_prompt_tokens: int,
                 source: str):
        if not prompts:
            raise ConfigError(f"{source}: no prompts found; point data.prompts_path at a JSONL file with a 'prompt' field")
        self.prompts = prompts
        self.ids = [np.asarray(tokenizer(p, add_special_tokens=True)["input_ids"], dtype=np.int32) for p in prompts]
        too_long = [(i, len(x)) for i, x in enumerate(self.ids) if len(x) > max_prompt_tokens]
        if too_long:
            i, n = too_long[0]
            raise ConfigError(
                f"{source}: prompt {i} has {n} tokens but only {max_prompt_tokens} fit "
                f"(model.max_model_len minus rollout.max_new_tokens); {len(too_long)} prompts are too long. "
                "Raise model.max_model_len, lower rollout.max_new_tokens, or shorten the prompts"
            )
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []
        self.epoch = 0

    def next_batch(self) -> PromptBatch:
        while len(self.order) < self.batch_size:
            self.order.extend(self.rng.permutation(len(self.prompts)).tolist())
            self.epoch += 1
        rows, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return PromptBatch(prompts=[self.prompts[i] for i in rows], prompt_ids=[self.ids[i] for i in rows])

    def state(self) -> dict:
        """Where the stream is (JSON-ready): the generator's state, the rest of the epoch's order, the epoch."""
        return {"rng": self.rng.bit_generator.state, "order": list(self.order), "epoch": self.epoch}

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.epoch = list(state["order"]), state["epoch"]

    def all_batch(self) -> PromptBatch:
        return PromptBatch(prompts=list(self.prompts), prompt_ids=list(self.ids))


def load_prompt_sets(cfg: FlywheelConfig, tokenizer, data_dir: Path) -> tuple[PromptStream, PromptStream | None]:
    """Training prompts and held-out eval prompts (eval only for the synthetic task)."""
    from flywheel import synthetic_task
    from flywheel.tasks import get_task

    limit = cfg.model.max_model_len - cfg.rollout.max_new_tokens
    eval_stream = None
    if cfg.data.prompts_path is None:
        paths = get_task(cfg.data.task).load().write_datasets(
            data_dir, seed=cfg.run.seed,
            sizes={"prompts_train": cfg.data.train_prompts, "prompts_eval": max(cfg.run.eval_prompts, 1)},
        )
        train = synthetic_task.load_prompts(paths["prompts_train"])
        source = str(paths["prompts_train"])
        if cfg.run.eval_prompts:
            eval_prompts = synthetic_task.load_prompts(paths["prompts_eval"])[: cfg.run.eval_prompts]
            eval_stream = PromptStream(eval_prompts, tokenizer, len(eval_prompts), cfg.run.seed, limit,
                                       str(paths["prompts_eval"]))
    else:
        source = cfg.data.prompts_path
        try:
            train = synthetic_task.load_prompts(source)
        except (FileNotFoundError, KeyError) as exc:
            raise ConfigError(f"data.prompts_path: {exc}") from None
    stream = PromptStream(train, tokenizer, cfg.data.prompts_per_step, cfg.run.seed, limit, source)
    return stream, eval_stream

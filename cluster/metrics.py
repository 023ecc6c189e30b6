"""Per-step metrics: one JSON line per step in `metrics.jsonl`, and a console line."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("flywheel.metrics")

# Printed on the console each step, in this order; everything goes to the file.
CONSOLE_KEYS = ("reward_mean", "score_mean", "gold_reward_mean", "kl", "policy_loss", "value_loss",
                "rollout_tokens_per_s", "gen_s", "train_s", "sync_s")


class MetricsWriter:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)  # line-buffered: a crash keeps every finished step

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        shown = " ".join(f"{k}={record[k]:.4g}" for k in CONSOLE_KEYS if isinstance(record.get(k), (int, float)))
        log.info("step %s %s", record.get("step"), shown)

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

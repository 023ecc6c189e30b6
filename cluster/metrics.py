"""Per-step metrics: one JSON line per step in `metrics.jsonl`, and a console line.

`python -m cluster.metrics RUN_DIR` prints the median, min and max of the step
timings and sync checks of a finished run and writes RUN_DIR/metrics_summary.json.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
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


SUMMARY_KEYS = ("gen_s", "score_s", "train_s", "sync_s", "rollout_tokens", "rollout_tokens_per_s",
                "sync_logprob_err", "sync_logprob_shift", "sample_logprob_diff")


def summarize(run_dir: Path) -> dict[str, dict[str, float]]:
    """Median / min / max over the steps of each SUMMARY_KEYS metric present in the run."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    out = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m cluster.metrics RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    summary = summarize(run_dir)
    print(f"{'metric':<22} {'median':>10} {'min':>10} {'max':>10}")
    for key, v in summary.items():
        print(f"{key:<22} {v['median']:>10.4g} {v['min']:>10.4g} {v['max']:>10.4g}")
    (run_dir / "metrics_summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

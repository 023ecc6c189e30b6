"""Per-step metrics: one JSON line per step in `metrics.jsonl`, a console line, and the
same record handed to each sink (Prometheus, TensorBoard: `cluster/exporters.py`).

`python -m cluster.metrics RUN_DIR` prints the median, min and max of the step
timings and sync checks of a finished run and writes RUN_DIR/metrics_summary.json.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

log = logging.getLogger("flywheel.metrics")

# Printed on the console each step, in this order; everything goes to the file. A stage's lines
# (SFT, reward model, DPO) carry none of these and show their own figures instead.
CONSOLE_KEYS = ("reward_mean", "score_mean", "gold_reward_mean", "kl", "policy_loss", "value_loss",
                "rollout_tokens_per_s", "gen_s", "train_s", "sync_s")
_NOT_SHOWN = ("step", "epoch")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Sink(Protocol):
    """Somewhere else each step's record goes."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class MetricsWriter:
    """Appends one JSON line per step and logs a console line: the step out of the total, the key
    figures, and the time left at the mean pace of the steps so far.  Each sink gets the record
    too; a sink that fails is reported once and dropped, never stopping the run.

    Only a resumed run (`resumed=True`) appends to an earlier run's file; otherwise that file moves
    to metrics.previous.jsonl, since appended to it would give every reader each step twice."""

    def __init__(self, path: Path, total_steps: int | None = None, clock: Callable[[], float] = time.monotonic,
                 sinks: list[Sink] | None = None, resumed: bool = False):
        if not resumed and path.is_file() and path.stat().st_size:
            kept = path.with_name(f"{path.stem}.previous{path.suffix}")
            log.warning("%s holds the steps of an earlier run: moved to %s, since this run starts from its "
                        "first step (to continue a PPO run instead, pass --resume)", path, kept.name)
            path.replace(kept)
        self.path = path
        self.total_steps = total_steps
        self._clock = clock
        self._started = clock()
        self._logged = self._done = 0
        self._sinks = list(sinks or [])
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)  # line-buffered: a crash keeps every finished step

    def expect(self, total_steps: int, done: int = 0) -> None:
        """Set the number of steps the run will have logged at its end, `done` of them already (a resumed
        run's), for the time left; restart the pace clock."""
        self.total_steps, self._started, self._logged, self._done = total_steps, self._clock(), 0, done

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._logged += 1
        log.info("%s", self.console_line(record))
        self._to_sinks("log", clean)

    def _to_sinks(self, method: str, *args: Any) -> None:
        for sink in list(self._sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as exc:  # monitoring must never stop training
                log.warning("metrics: %s failed (%s: %s); it gets no more records", type(sink).__name__,
                            type(exc).__name__, exc)
                self._sinks.remove(sink)

    def progress(self) -> dict[str, Any]:
        """Steps logged since expect(), of the total, the mean seconds per step and the time left."""
        pace = (self._clock() - self._started) / self._logged if self._logged else None
        done = self._done + self._logged
        left = None if pace is None or self.total_steps is None else max(self.total_steps - done, 0) * pace
        return {"steps_done": done, "total_steps": self.total_steps, "s_per_step": pace, "left_s": left}

    def console_line(self, record: dict[str, Any]) -> str:
        """"step 12/60 kl=0.01 ... | 1.2 s/step, 58 s left" (the total and time left when known)."""
        keys = [k for k in CONSOLE_KEYS if _is_number(record.get(k))]
        if not keys:
            keys = [k for k, v in record.items() if k not in _NOT_SHOWN and _is_number(v)][:6]
        step = record.get("step")
        where = f"step {step}" if self.total_steps is None or step is None else f"step {step + 1}/{self.total_steps}"
        line = " ".join([where] + [f"{k}={record[k]:.4g}" for k in keys])
        pace = (self._clock() - self._started) / max(self._logged, 1)
        if self.total_steps is not None and step is not None:
            left = max(self.total_steps - (step + 1), 0) * pace
            line += f" | {pace:.2f} s/step, {_duration(left)} left"
        return line

    def close(self) -> None:
        self._file.close()
        self._to_sinks("close")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


SUMMARY_KEYS = ("gen_s", "score_s", "train_s", "sync_s", "sync_check_s", "rollout_tokens", "rollout_tokens_per_s",
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

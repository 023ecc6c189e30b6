"""The step figures for the ecosystem's monitoring: Prometheus gauges through Ray's metrics
system, and TensorBoard event files.  Each is a sink that `MetricsWriter.log` hands every
record to, beside its own JSON line.

Prometheus (`ray.util.metrics`): Ray exports what the driver sets from every node's metrics
agent, where Ray's dashboard and a Prometheus/Grafana set up as in Ray's docs read them
(Ray prefixes each name with `ray_`).  Every series carries a `run` tag, the output
directory's name, so several runs on one cluster stay apart.

TensorBoard: one scalar per numeric figure of a step, under `output_dir/tensorboard`
(`tensorboard --logdir DIR/tensorboard`); a list figure such as `actor_tokens_per_s`
becomes `actor_tokens_per_s/0`, `actor_tokens_per_s/1`, ...
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# The phases of a PPO step and the record key holding each one's seconds (train is the update alone).
PHASE_KEYS = (("generate", "gen_s"), ("score", "score_s"), ("experience", "make_experience_s"),
              ("train", "update_s"), ("sync", "sync_s"))

# Gauges set from the record key of the same name (without the prefix), with their description.
GAUGES = {
    "rollout_tokens_per_s": "tokens generated per second by all rollout actors in the step",
    "rollout_samples_per_s": "completions generated per second in the step",
    "reward_mean": "mean total reward per sequence (score minus the KL penalty when in the reward)",
    "score_mean": "mean reward-service score",
    "score_std": "standard deviation of the reward-service scores of the step",
    "gold_reward_mean": "mean gold reward of the step's completions (embedded tasks)",
    "kl": "mean per-sequence KL(policy || reference)",
    "policy_loss": "PPO policy loss",
    "value_loss": "critic loss",
    "policy_version": "version of the weights that generated the step's rollouts",
    "staleness": "policy versions the step's rollouts lag behind the learner (0 in synchronous mode)",
}
# Counters increased by the record key's value each step: {record key: (name without the prefix, description)}.
COUNTERS = {
    "score_failed_attempts": ("reward_service_failed_attempts", "reward-service requests that failed and were retried"),
    "reward_service_restarts": ("reward_service_restarts", "times the run's own reward service died and was restarted"),
    "actor_restarts": ("rollout_actor_restarts", "rollout actors that died while generating and were replaced"),
}
PREFIX = "flywheel_"


def numeric_figures(record: dict[str, Any]) -> dict[str, float]:
    """Every finite number of a record by name (lists as `name/i`), except the step itself."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        named = [(f"{key}/{i}", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for name, v in named:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[name] = float(v)
    return out


def step_sinks(monitor: Any, out_dir: Path) -> list:
    """The sinks the config's MonitorConfig turns on for a PPO run writing to `out_dir`."""
    sinks: list = []
    if monitor.prometheus:
        sinks.append(PrometheusSink(out_dir.resolve().name))
    if monitor.tensorboard:
        sinks.append(TensorBoardSink(out_dir / "tensorboard"))
    return sinks


class PrometheusSink:
    """Sets the flywheel_* gauges each step.  `metrics` is `ray.util.metrics` (a fake in unit tests);
    the metrics are made at the first record, when Ray is up."""

    def __init__(self, run_name: str, metrics: Any = None):
        self.run_name = run_name
        self._metrics = metrics
        self._gauges: dict[str, Any] = {}

    def _make(self) -> None:
        m = self._metrics
        if m is None:
            import ray.util.metrics as m
        tags = {"run": self.run_name}
        for key, doc in GAUGES.items():
            self._gauges[key] = m.Gauge(PREFIX + key, doc, tag_keys=("run",)).set_default_tags(tags)
        self._step_s = m.Gauge(PREFIX + "step_seconds", "seconds of each phase of the last step",
                               tag_keys=("run", "phase")).set_default_tags(tags)
        self._actor = m.Gauge(PREFIX + "actor_rollout_tokens_per_s", "tokens per second of each rollout actor",
                              tag_keys=("run", "actor")).set_default_tags(tags)
        self._steps = m.Gauge(PREFIX + "steps_done", "PPO steps finished", tag_keys=("run",)).set_default_tags(tags)
        self._counters = {key: m.Counter(PREFIX + name, doc, tag_keys=("run",)).set_default_tags(tags)
                          for key, (name, doc) in COUNTERS.items()}

    def log(self, record: dict[str, Any]) -> None:
        if not self._gauges:
            self._make()
        figures = numeric_figures(record)
        for key, gauge in self._gauges.items():
            if key in figures:
                gauge.set(figures[key])
        for phase, key in PHASE_KEYS:
            if key in figures:
                self._step_s.set(figures[key], tags={"phase": phase})
        for actor, value in enumerate(record.get("actor_tokens_per_s") or []):
            self._actor.set(value, tags={"actor": str(actor)})
        if isinstance(record.get("step"), int):
            self._steps.set(record["step"] + 1)
        for key, counter in self._counters.items():
            if record.get(key):  # Ray's counters refuse an increase of 0
                counter.inc(record[key])

    def close(self) -> None:
        pass


class TensorBoardSink:
    """A scalar per numeric figure per step in `log_dir`, flushed each step so a running
    TensorBoard shows the run as it goes."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._writer = None

    def log(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        step = record.get("step", 0)
        for tag, value in numeric_figures(record).items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

"""The step figures as Prometheus gauges (through a fake of ray.util.metrics) and as TensorBoard
events (read back with TensorBoard's own reader), and sinks that fail without stopping a run."""

from __future__ import annotations

import math

import pytest

from cluster.exporters import PrometheusSink, TensorBoardSink, numeric_figures
from cluster.metrics import MetricsWriter, read_metrics

RECORD = {"step": 2, "policy_version": 2, "staleness": 0, "rollout_tokens_per_s": 812.5,
          "actor_tokens_per_s": [400.0, 425.0], "gen_s": 3.0, "score_s": 0.25, "make_experience_s": 1.5,
          "update_s": 2.0, "train_s": 3.5, "sync_s": 0.5, "reward_mean": 0.41, "kl": 0.03,
          "score_failed_attempts": 2, "note": "text is skipped", "grad_norm": math.nan}


class FakeMetric:
    """Records what Ray's Gauge/Counter would be told: {tags: value}."""

    def __init__(self, name, description="", tag_keys=()):
        self.name, self.tag_keys, self.values, self.default = name, tag_keys, {}, {}

    def set_default_tags(self, tags):
        assert set(tags) <= set(self.tag_keys)
        self.default = tags
        return self

    def _key(self, tags):
        merged = {**self.default, **(tags or {})}
        assert set(merged) == set(self.tag_keys), (self.name, merged)
        return tuple(sorted(merged.items()))

    def set(self, value, tags=None):
        self.values[self._key(tags)] = value

    def inc(self, value=1.0, tags=None):
        key = self._key(tags)
        self.values[key] = self.values.get(key, 0) + value


class FakeRegistry:
    def __init__(self):
        self.made: dict[str, FakeMetric] = {}

    def _make(self, name, description="", tag_keys=()):
        assert name not in self.made, f"{name} made twice"
        self.made[name] = FakeMetric(name, description, tag_keys)
        return self.made[name]

    Gauge = Counter = _make


def test_numeric_figures_flattens_lists_and_skips_the_rest():
    figures = numeric_figures(RECORD)
    assert figures["actor_tokens_per_s/0"] == 400.0 and figures["actor_tokens_per_s/1"] == 425.0
    assert "step" not in figures and "note" not in figures and "grad_norm" not in figures  # NaN is no figure
    assert figures["staleness"] == 0.0


def test_prometheus_gauges_carry_the_step_figures():
    registry = FakeRegistry()
    sink = PrometheusSink("run-a", metrics=registry)
    sink.log(RECORD)
    sink.log({**RECORD, "step": 3, "score_failed_attempts": 1, "reward_service_restarts": 1, "actor_restarts": 2})
    run = (("run", "run-a"),)
    m = registry.made
    assert m["flywheel_rollout_tokens_per_s"].values == {run: 812.5}
    assert m["flywheel_kl"].values == {run: 0.03}
    assert m["flywheel_policy_version"].values == {run: 2}
    assert m["flywheel_staleness"].values == {run: 0}
    assert m["flywheel_steps_done"].values == {run: 4}
    phases = {dict(k)["phase"]: v for k, v in m["flywheel_step_seconds"].values.items()}
    # train is the update alone: train_s (3.5) counts experience (1.5) too.
    assert phases == {"generate": 3.0, "score": 0.25, "experience": 1.5, "train": 2.0, "sync": 0.5}
    actors = {dict(k)["actor"]: v for k, v in m["flywheel_actor_rollout_tokens_per_s"].values.items()}
    assert actors == {"0": 400.0, "1": 425.0}
    assert m["flywheel_reward_service_failed_attempts"].values == {run: 3}  # a counter: 2 then 1 more
    assert m["flywheel_reward_service_restarts"].values == {run: 1}
    assert m["flywheel_rollout_actor_restarts"].values == {run: 2}
    assert "flywheel_gold_reward_mean" in m and not m["flywheel_gold_reward_mean"].values  # absent figure: unset


def test_prometheus_metric_names_are_valid_for_ray():
    from ray.util.metrics import _is_invalid_metric_name

    registry = FakeRegistry()
    PrometheusSink("r", metrics=registry).log(RECORD)
    assert not [name for name in registry.made if _is_invalid_metric_name(name)]


def test_tensorboard_events_match_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path / "metrics.jsonl", sinks=[TensorBoardSink(tmp_path / "tensorboard")])
    for step in range(3):
        writer.log({**RECORD, "step": step, "kl": 0.01 * step, "rollout_tokens_per_s": 800.0 + step})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = read_metrics(tmp_path / "metrics.jsonl")
    for tag in ("kl", "rollout_tokens_per_s", "score_s", "actor_tokens_per_s/1"):
        scalars = events.Scalars(tag)
        key, _, index = tag.partition("/")
        expected = [r[key][int(index)] if index else r[key] for r in records]
        assert [s.step for s in scalars] == [0, 1, 2]
        assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6)
    assert "note" not in events.Tags()["scalars"]


def test_a_failing_sink_is_dropped_and_the_file_goes_on(tmp_path, caplog):
    class Broken:
        calls = 0

        def log(self, record):
            Broken.calls += 1
            raise RuntimeError("disk full")

        def close(self):
            pass

    writer = MetricsWriter(tmp_path / "metrics.jsonl", sinks=[Broken()])
    writer.log({"step": 0, "kl": 1.0})
    writer.log({"step": 1, "kl": 2.0})
    writer.close()
    assert Broken.calls == 1
    assert "Broken failed (RuntimeError: disk full)" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]

"""metrics.jsonl writing and the per-run summary."""

from __future__ import annotations

import json
import math

from cluster.metrics import MetricsWriter, main, read_metrics, summarize


def test_write_read_and_summarize(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    for step, gen_s in enumerate([3.0, 1.0, 2.0]):
        writer.log({"step": step, "gen_s": gen_s, "kl": math.nan})
    writer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["kl"] is None  # NaN is written as null, so the file stays valid JSON
    assert summarize(tmp_path) == {"gen_s": {"median": 2.0, "min": 1.0, "max": 3.0}}
    assert main([str(tmp_path)]) == 0
    assert json.loads((tmp_path / "metrics_summary.json").read_text())["gen_s"]["median"] == 2.0


def test_console_line_shows_progress_and_time_left(tmp_path):
    now = [100.0]
    writer = MetricsWriter(tmp_path / "metrics.jsonl", clock=lambda: now[0])
    writer.expect(60)
    now[0] += 2.0  # two seconds per step
    writer.log({"step": 0, "kl": 0.5, "gen_s": 1.25})
    now[0] += 2.0
    line = writer.console_line({"step": 1, "kl": 0.25, "gen_s": 1.0})
    # Pace: 4 s since expect() over the 1 step logged so far; 58 steps left.
    assert line.startswith("step 2/60 kl=0.25 gen_s=1 | 4.00 s/step, 3 min 52 s left"), line
    # A stage's record (no PPO figures) shows its own numbers, never the step or epoch again.
    stage = writer.console_line({"step": 3, "epoch": 0, "loss": 1.5, "accuracy": 0.75})
    assert stage.startswith("step 4/60 loss=1.5 accuracy=0.75 |"), stage
    writer.close()
    # Without a known total: the step and the figures only.
    assert MetricsWriter(tmp_path / "m2.jsonl").console_line({"step": 7, "kl": 1.0}) == "step 7 kl=1"


def test_a_fresh_run_moves_an_earlier_runs_metrics_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    MetricsWriter(tmp_path / "metrics.jsonl").close()
    # Appended to, the file would hold steps 0, 1, 0, 1, ...: every reader would see each step twice.
    assert not (tmp_path / "metrics.jsonl").read_text()
    assert (tmp_path / "metrics.previous.jsonl").read_text() == '{"step": 0}\n{"step": 1}\n'
    MetricsWriter(tmp_path / "metrics.jsonl").close()  # nothing to move: the earlier file stays
    assert (tmp_path / "metrics.previous.jsonl").is_file()
    # A resumed run appends to its own file.
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    MetricsWriter(tmp_path / "metrics.jsonl", resumed=True).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'

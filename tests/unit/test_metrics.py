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

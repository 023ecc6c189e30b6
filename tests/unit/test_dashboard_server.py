"""The dashboard's server without a browser: the offline command on a metrics.jsonl written by
hand, incremental reading, the live server's state and its stop, and a port that is taken."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.dashboard import MetricsTail, live_dashboard

REPO = Path(__file__).resolve().parents[2]


def _get(url: str) -> dict | str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read().decode()
    return json.loads(body) if resp.headers["Content-Type"] == "application/json" else body


def _write_run(out: Path, steps: int, total: int, finished: bool) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"run": {"steps": total}}))
    with open(out / "metrics.jsonl", "w") as f:
        for step in range(steps):
            f.write(json.dumps({"step": step, "rollout_tokens_per_s": 100.0 + step, "kl": 0.1 * step}) + "\n")
    if finished:
        (out / "summary.json").write_text("{}")


@pytest.mark.timeout(60)
def test_offline_command_serves_a_finished_run_and_a_pipeline(tmp_path):
    _write_run(tmp_path / "ppo_a", steps=3, total=3, finished=True)
    _write_run(tmp_path / "pipe" / "sft", steps=2, total=2, finished=True)
    proc = subprocess.Popen([sys.executable, "-m", "cluster.dashboard", str(tmp_path / "ppo_a"), str(tmp_path / "pipe")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", line).group(1)
        page = _get(url)
        assert "<svg" in page or "createElementNS" in page
        assert not re.search(r"(src|href)=\"https?://", page)  # nothing fetched from outside
        runs = _get(url + "api/status")["runs"]
        assert [(r["name"], r["state"], r["total_steps"]) for r in runs] == [
            ("ppo_a", "finished", 3), ("pipe/sft", "finished", 2)]
        got = _get(url + "api/metrics?run=0&since=1")
        assert [r["step"] for r in got["records"]] == [1, 2] and got["next"] == 3
        assert _get(url + "api/metrics?run=1")["records"][1]["kl"] == pytest.approx(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_offline_command_refuses_a_directory_without_a_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cluster.dashboard", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no metrics.jsonl" in result.stderr and "run.output_dir" in result.stderr


def test_tail_reads_only_complete_new_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.since(0) == []  # no file yet
    path.write_text('{"step": 0}\n{"step": 1')  # the second line is still being written
    assert tail.since(0) == [{"step": 0}]
    with open(path, "a") as f:
        f.write(', "kl": 0.5}\n')
    assert tail.since(1) == [{"step": 1, "kl": 0.5}]
    assert tail.since(2) == []


def _monitor(**kw):
    return SimpleNamespace(**{"dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": 0, **kw})


@pytest.mark.timeout(60)
def test_live_server_reports_progress_then_stops_with_the_run(tmp_path, caplog):
    caplog.set_level("INFO", logger="flywheel.dashboard")
    progress = {"steps_done": 1, "total_steps": 4, "s_per_step": 2.0, "left_s": 6.0}
    with live_dashboard(_monitor(), tmp_path, lambda: progress) as server:
        status = _get(server.url + "api/status")["runs"][0]
        assert status["state"] == "running" and status["left_s"] == 6.0 and status["total_steps"] == 4
        assert f"dashboard: {server.url}" in caplog.text
    with pytest.raises(OSError):
        _get(server.url + "api/status")  # stopped on the way out

    with pytest.raises(ValueError):
        with live_dashboard(_monitor(), tmp_path, lambda: progress) as server:
            raise ValueError("the run failed")


def test_taken_port_is_a_warning_not_a_failed_run(tmp_path, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with live_dashboard(_monitor(dashboard_port=busy.getsockname()[1]), tmp_path, dict) as server:
            assert server is None
    assert "the run goes on without it" in caplog.text
    with live_dashboard(_monitor(dashboard=False), tmp_path, dict) as server:
        assert server is None

"""`python -m cluster.doctor` reports this machine, in text and as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _doctor(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "cluster.doctor", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def test_text_report_names_cpu_versions_dtype_and_shm():
    out = _doctor()
    for section in ("cpu", "memory", "gpu", "packages", "a run would choose", "/dev/shm"):
        assert f"\n{section}\n" in f"\n{out}", section
    assert _cpu_model() in out
    assert metadata.version("torch") in out
    assert "dtype            bfloat16" in out or "dtype            float32" in out


def test_json_report_and_one_line():
    from cluster.doctor import one_line

    report = json.loads(_doctor("--json"))
    assert set(report) >= {"cpu", "memory", "gpus", "packages", "run_would_choose", "shm", "disk_free_gib"}
    assert report["cpu"]["model"] == _cpu_model()
    assert report["packages"]["torch"] == metadata.version("torch")
    assert report["run_would_choose"]["dtype"] in ("bfloat16", "float32")
    line = one_line(report)
    assert "\n" not in line and report["cpu"]["kind"] in line

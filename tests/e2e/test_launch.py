"""End-to-end: the real entry point as a subprocess, through the real stack
(local Ray, vLLM CPU build, DeepSpeed, the HTTP reward service on loopback).

Every process the run starts inherits a marker in its environment; after the
run we look for any process still carrying it, so a leaked Ray worker, vLLM
engine or reward server fails the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "local_tiny_ppo.yaml"
REQUIRED = ("step", "reward_mean", "kl", "policy_loss", "value_loss", "rollout_tokens_per_s", "gen_s", "train_s",
            "sync_s", "policy_version")
# bf16 weights on both sides, different kernels: logprobs agree to about 1e-2.
BF16_LOGPROB_TOL = 0.05


def _launch(args: list[str], timeout_s: float, marker: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLYWHEEL_TEST_MARKER": marker, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cluster.launch", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def _processes_with_marker(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            if f"FLYWHEEL_TEST_MARKER={marker}".encode() in environ:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
                found.append(f"{pid}: {cmdline!r}")
        except OSError:
            continue
    return found


def _shm_files() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _assert_no_leftovers(marker: str, shm_before: set[str] | None = None, grace_s: float = 15.0) -> None:
    """No process of the run survives, and nothing it put in /dev/shm remains."""
    deadline = time.monotonic() + grace_s
    while (left := _processes_with_marker(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left running after the run: {left}"
    if shm_before is not None:
        new = sorted(_shm_files() - shm_before)
        assert not new, f"the run left shared memory behind in /dev/shm: {new}"


@pytest.mark.timeout(900)
def test_ppo_run_end_to_end(tmp_path):
    """A short real run with the default dtype (auto), two rollout actors and two learner
    ranks at ZeRO-3, sampling at temperature 0.7 with top-p: metrics, weight sync into
    both engines, checkpoint, clean exit with no process and no shared memory left."""
    from flywheel.hardware import resolve_dtype

    marker = uuid.uuid4().hex
    out = tmp_path / "run"
    shm_before = _shm_files()
    result = _launch(
        ["--config", str(CONFIG), "--output-dir", str(out), "run.steps=3", "run.checkpoint_every=0", "run.eval_prompts=15",
         "data.prompts_per_step=16", "rollout.num_actors=2", "rollout.samples_per_prompt=2",
         "rollout.temperature=0.7", "rollout.top_p=0.95", "learner.minibatch_size=16", "learner.world_size=2",
         "learner.zero_stage=3", "sync.bucket_mb=0.25", "sync.verify_weights=true"],
        timeout_s=840, marker=marker,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    _assert_no_leftovers(marker, shm_before)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        assert all(np.isfinite(r[k]) for k in REQUIRED)
    # Rollouts of step k come from the policy after k syncs.
    assert [r["policy_version"] for r in records] == [0, 1, 2]
    for r in records:
        # After each sync, vLLM's logprobs of a fixed sequence equal the learner's ...
        assert r["sync_logprob_err"] < BF16_LOGPROB_TOL, r
        # ... and differ from vLLM's own before the sync: the weights really changed.
        assert r["sync_logprob_shift"] > 2 * r["sync_logprob_err"], r

    for r in records:
        # The learner scores the distribution vLLM sampled from (temperature 0.7, top-p 0.95).
        assert r["sample_logprob_diff"] < 0.02, r

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == resolve_dtype("auto", "cpu").dtype
    assert len(summary["learner_peak_memory_gib"]) == 2 and all(0.1 < m < 20 for m in summary["learner_peak_memory_gib"])
    # learner.allocator=auto reaches each rank's process through Ray's runtime_env (LD_PRELOAD at its start).
    from flywheel.allocator import allocator_env

    expected = "jemalloc" if allocator_env("auto", "cpu", os.environ.get("LD_PRELOAD", ""))[0] else "system"
    assert summary["learner_allocator"] == [expected, expected]
    # 15 held-out prompts split 8 / 7 over two actors, 2 samples each: none lost.
    assert summary["before"]["eval_prompts"] == 15 and summary["before"]["eval_samples"] == 30
    final = Path(summary["final_checkpoint"])
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    # After every sync, every weight of both engines equals the learner's (gathered from ZeRO-3), exactly.
    from safetensors import safe_open

    with safe_open(final / "model.safetensors", "pt") as f:
        assert [r["sync_weights_verified"] for r in records] == [len(list(f.keys()))] * 3
    assert (final / "tokenizer.json").is_file()


@pytest.mark.timeout(120)
def test_unknown_config_key_fails_before_anything_starts(tmp_path):
    marker = uuid.uuid4().hex
    t0 = time.monotonic()
    result = _launch(["--config", str(CONFIG), "--output-dir", str(tmp_path / "run"), "rollout.num_engines=2"],
                     timeout_s=100, marker=marker)
    assert result.returncode == 2
    assert "rollout.num_engines: unknown key" in result.stderr
    assert "num_actors" in result.stderr  # names what is valid
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - t0 < 60
    _assert_no_leftovers(marker, grace_s=0)


@pytest.mark.timeout(120)
def test_impossible_value_names_key_and_range(tmp_path):
    result = _launch(["--config", str(CONFIG), "--output-dir", str(tmp_path / "run"), "rollout.num_actors=0"],
                     timeout_s=100, marker=uuid.uuid4().hex)
    assert result.returncode == 2
    assert "rollout.num_actors: must be >= 1, got 0" in result.stderr


@pytest.mark.timeout(180)
def test_unreachable_reward_service_fails_within_timeout(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"
    marker = uuid.uuid4().hex
    t0 = time.monotonic()
    result = _launch(["--config", str(CONFIG), "--output-dir", str(tmp_path / "run"), f"reward.url={url}",
                      "reward.timeout_s=3"], timeout_s=150, marker=marker)
    elapsed = time.monotonic() - t0
    assert result.returncode == 1
    assert url in result.stderr
    assert "python -m reward_service" in result.stderr
    # 3 s of reward timeout plus start-up (imports, building the tiny model if not cached).
    assert elapsed < 90, elapsed
    _assert_no_leftovers(marker)


@pytest.mark.timeout(180)
def test_prompts_longer_than_the_context_stop_the_launch_before_any_actor(tmp_path):
    """The prompts are tokenised while Ray starts; one that cannot fit still stops the launch with the
    fix, before a rollout actor or learner rank is made, and leaves no process behind."""
    marker = uuid.uuid4().hex
    result = _launch(["--config", str(CONFIG), "--output-dir", str(tmp_path / "run"), "model.max_model_len=20"],
                     timeout_s=150, marker=marker)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "tokens but only 4 fit" in result.stderr and "Raise model.max_model_len" in result.stderr
    assert "RolloutWorker" not in result.stderr and "LearnerWorker" not in result.stderr  # no actor ever logged
    assert not (tmp_path / "run" / "metrics.jsonl").read_text().strip()
    _assert_no_leftovers(marker)

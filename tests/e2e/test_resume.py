"""End-to-end: checkpoints and exact resume through the real entry point and the real stack.

Two runs of 6 steps with a checkpoint every 3 are stopped in step 6, after 5 steps are logged,
and resumed from the checkpoint of step 3: one by SIGKILLing its launcher (with a
half-written checkpoint folder added, as a kill while writing one leaves), one by killing a
learner rank at ZeRO-3, after which the launcher stops everything and prints the command that
resumes. A run is deterministic, so the steps the stopped run logged after its checkpoint are
what a straight run logs: the resumed run must log exactly the same figures for them. In
float32, so no bf16 kernel noise can hide a difference.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.test_launch import CONFIG, REPO, _assert_no_leftovers, _launch, _processes_with_marker, _shm_files

SMALL = ["run.eval_prompts=8", "data.train_prompts=64", "data.prompts_per_step=8", "rollout.samples_per_prompt=2",
         "rollout.max_new_tokens=8", "learner.minibatch_size=8", "model.dtype=float32"]
# Wall-clock figures: they differ between any two runs. Every other key must be equal.
TIMING_KEYS = {"gen_s", "score_s", "sync_s", "sync_check_s", "train_s", "make_experience_s", "update_s",
               "rollout_tokens_per_s", "actor_tokens_per_s", "rollout_samples_per_s", "gen_wait_s", "step_s"}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _lines_logged(out: Path) -> int:
    """Whole lines in a running run's metrics.jsonl (the last one may be half-written)."""
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


STOPPED = ["run.steps=6", "run.checkpoint_every=3"]  # stopped after 5 steps: steps 3 and 4 are redone


def _assert_redone_steps_equal(before: list[dict], out: Path) -> None:
    """The resumed run logged every step once, and the steps it redid after the checkpoint of step 3
    equal (but for wall-clock figures) what the stopped run had logged for them."""
    after = _records(out)
    assert [r["step"] for r in after] == list(range(6))  # each step once: the stopped run's later lines are gone
    assert after[:3] == before[:3]  # the lines before the checkpoint are kept as they were
    redone = before[3:]
    assert len(redone) >= 2, f"the stop came before step 5 was logged: {[r['step'] for r in before]}"
    for ra, rb in zip(redone, after[3:]):
        assert set(ra) == set(rb)
        differ = {k: (ra[k], rb[k]) for k in ra if k not in TIMING_KEYS and ra[k] != rb[k]}
        assert not differ, f"step {ra['step']}: {differ}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step_000003")
    # The original "before" evaluation, kept in the checkpoint, is the stopped run's.
    rows = [json.loads(line) for line in (out / "eval_before.jsonl").read_text().splitlines()]
    assert summary["before"]["eval_gold_reward"] == pytest.approx(sum(r["gold"] for r in rows) / len(rows), abs=1e-6)


@pytest.mark.timeout(1200)
def test_a_sigkilled_launcher_resumes_exactly(tmp_path):
    """The launcher SIGKILLed in step 6: no process is left but Ray's agents on their way out, a
    half-written checkpoint folder is ignored, and the resumed run redoes steps 4-5 exactly."""
    marker = uuid.uuid4().hex
    killed = tmp_path / "killed"
    args = ["--config", str(CONFIG), *SMALL, *STOPPED]
    shm_before = _shm_files()
    killed_marker = uuid.uuid4().hex
    proc = _start([*args, "--output-dir", str(killed)], killed_marker)
    try:
        _wait_until(lambda: _lines_logged(killed) >= 5, proc, "step 5's metrics line", timeout_s=600)
        proc.kill()  # SIGKILL: no handler runs, nothing is stopped or cleaned up by the launcher
        proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert not (killed / "summary.json").exists()
    before = _records(killed)
    _assert_only_ray_agents_left(killed_marker)
    # Only DeepSpeed's shared memory stays behind a SIGKILL for good (the README says so).
    for name in _shm_files() - shm_before:
        if name.startswith("deepspeed_allreduce_buffer_"):
            os.remove(f"/dev/shm/{name}")
    # What a kill while writing a checkpoint leaves: a half-written folder, to be ignored.
    partial = killed / "checkpoints" / "step_000006.tmp"
    (partial / "policy").mkdir(parents=True)
    (partial / "learner_rank0.pt").write_bytes(b"cut off")
    assert [p.name for p in (killed / "checkpoints").glob("step_??????")] == ["step_000003"]

    result = _launch([*args, "--output-dir", str(killed), "--resume", str(killed)], timeout_s=600, marker=marker)
    assert result.returncode == 0, result.stderr[-5000:]
    _assert_no_leftovers(marker)
    assert not partial.exists()
    _assert_redone_steps_equal(before, killed)
    assert (killed / "final" / "model.safetensors").is_file()


# Ray's per-node agents outlive a SIGKILLed driver by a minute or two: they see the raylet die at
# once, then try to report it to the GCS, which died too, before they exit.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _assert_only_ray_agents_left(marker: str, grace_s: float = 30.0) -> None:
    """Every process of a SIGKILLed run is gone (Ray's share its fate, the reward service watches
    its parent), except Ray's agents on their way out, which are stopped here to save the wait."""
    deadline = time.monotonic() + grace_s
    while True:
        left = _processes_with_marker(marker)
        others = [p for p in left if not any(agent in p for agent in RAY_AGENTS)]
        if not others or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not others, f"processes left running after the kill: {others}"
    for line in left:
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start(args: list[str], marker: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "FLYWHEEL_TEST_MARKER": marker, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "cluster.launch", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=60)


def _wait_until(condition, proc: subprocess.Popen, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(0.1)


def _learner_ranks(marker: str) -> list[int]:
    """Pids of the run's learner rank actors (Ray titles a worker process after its actor class)."""
    return [int(line.split(":")[0]) for line in _processes_with_marker(marker) if "LearnerWorker" in line]


@pytest.mark.timeout(1200)
def test_a_dead_learner_rank_stops_the_run_with_the_resume_command(tmp_path):
    """Two ranks at ZeRO-3; one is killed in step 6. The launcher stops every process and prints the
    command that resumes; that command, as a user would paste it, redoes steps 4-5 exactly."""
    marker = uuid.uuid4().hex
    out = tmp_path / "run"
    shm_before = _shm_files()
    overrides = [*SMALL, *STOPPED, "learner.world_size=2", "learner.zero_stage=3"]
    proc = _start(["--config", str(CONFIG), "--output-dir", str(out), *overrides], marker)
    try:
        _wait_until(lambda: _lines_logged(out) >= 5, proc, "step 5's metrics line", timeout_s=600)
        ranks = _learner_ranks(marker)
        assert len(ranks) == 2, _processes_with_marker(marker)
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    assert proc.returncode == 1, stderr[-4000:]
    assert "an actor died" in stderr and "Every process of the run was stopped" in stderr, stderr[-4000:]
    _assert_no_leftovers(marker, shm_before, grace_s=60)
    before = _records(out)

    match = re.search(r"continue the run with:\n\s+(python -m cluster\.launch .*)", stderr)
    assert match, stderr[-4000:]
    command = shlex.split(match.group(1))
    assert command[command.index("--resume") + 1] == str(out) and command[-1] == "run.steps=6"
    result = _launch(command[3:], timeout_s=600, marker=marker)
    assert result.returncode == 0, result.stderr[-5000:]
    _assert_redone_steps_equal(before, out)
    _assert_no_leftovers(marker, shm_before)

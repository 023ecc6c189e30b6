"""End-to-end: a run survives the death of its processes, through the real entry point and stack.

In one run of two rollout actors, the run's own reward service is SIGKILLed once step 0 is
logged and is started again by the driver, the step's rollout scored again; then rollout actor 1
is SIGKILLed while it generates step 2, is replaced, given the current weights, and its share of
the batch generated again with the same seeds. Every step is logged once with all its samples and
finite scores, and no process is left behind. And a stop signal mid-run stops every process.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.test_launch import CONFIG, _assert_no_leftovers, _processes_with_marker, _shm_files
from tests.e2e.test_resume import SMALL, _lines_logged, _records, _start, _stop, _wait_until

PROMPTS, SAMPLES = 8, 2  # data.prompts_per_step and rollout.samples_per_prompt in SMALL


def _start_and_wait(out: Path, overrides: list[str], marker: str, lines: int, **popen):
    """A small run launched in the background, once `lines` of its steps are logged."""
    proc = _start(["--config", str(CONFIG), "--output-dir", str(out), *SMALL, "run.save_final=false", *overrides],
                  marker, **popen)
    try:
        _wait_until(lambda: _lines_logged(out) >= lines, proc, f"step {lines}'s metrics line", timeout_s=400)
    except BaseException:
        _stop(proc)
        raise
    return proc


def _finish(proc, timeout_s: float) -> str:
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    finally:
        _stop(proc)
    assert proc.returncode == 0, stderr[-5000:]
    return stderr


def _assert_each_step_once_and_whole(out: Path, steps: int) -> list[dict]:
    records = _records(out)
    assert [r["step"] for r in records] == list(range(steps))
    for r in records:
        assert r["rollout_samples"] == PROMPTS * SAMPLES, r
        assert np.isfinite(r["reward_mean"]) and np.isfinite(r["score_std"]), r
    return records


@pytest.mark.timeout(600)
def test_a_killed_reward_service_and_a_killed_rollout_actor_each_cost_a_step_again(tmp_path):
    """The reward service is SIGKILLed once step 0 is logged (the driver restarts it and scores the
    step it was scoring again); actor 1 is SIGKILLed while it generates step 2 (it holds there for
    the kill, through the test hook in actors/rollout.py). Each step completes with every sample once, and the new actor
    passes the weight-sync check: it holds the learner's weights."""
    marker = uuid.uuid4().hex
    out = tmp_path / "run"
    hold = tmp_path / "hold_actor"
    hold.write_text("1 2\n")  # actor 1, generating at policy version 2: step 2
    shm_before = _shm_files()
    os.environ["FLYWHEEL_TEST_HOLD_ROLLOUT"] = str(hold)
    try:
        proc = _start(["--config", str(CONFIG), "--output-dir", str(out), *SMALL, "run.steps=4",
                       "rollout.num_actors=2", "run.checkpoint_every=0", "run.save_final=false"], marker)
    finally:
        del os.environ["FLYWHEEL_TEST_HOLD_ROLLOUT"]
    try:
        _wait_until(lambda: _lines_logged(out) >= 1, proc, "step 0's metrics line", timeout_s=400)
        service = int((out / "reward_service.pid").read_text())
        os.kill(service, signal.SIGKILL)
        pid_file = Path(f"{hold}.pid")
        _wait_until(pid_file.exists, proc, "actor 1 holding in step 2", timeout_s=400)
        pid = int(pid_file.read_text())
        title = [p for p in _processes_with_marker(marker) if p.startswith(f"{pid}:")]
        assert title and "RolloutWorker" in title[0], (pid, _processes_with_marker(marker))
        assert _lines_logged(out) == 2  # steps 0 and 1 done, step 2 generating
        os.kill(pid, signal.SIGKILL)
    except BaseException:
        _stop(proc)
        raise
    stderr = _finish(proc, timeout_s=400)
    assert "reward service at http://127.0.0.1:" in stderr and f"(pid {service}) exited with code -9" in stderr, \
        stderr[-4000:]
    assert "rollout actor 1 died while generating" in stderr, stderr[-4000:]
    records = _assert_each_step_once_and_whole(out, 4)
    assert records[0]["reward_service_restarts"] == 0
    assert sum(r["reward_service_restarts"] for r in records) == 1, [r["reward_service_restarts"] for r in records]
    assert not (out / "reward_service.pid").exists()  # removed when the run stopped the service
    assert [r["actor_restarts"] for r in records] == [0, 0, 1, 0]
    assert [r["policy_version"] for r in records] == [0, 1, 2, 3]
    for r in records[2:]:
        # float32: after each sync the new actor's logprobs equal the learner's (the run checks
        # this too, and would have stopped), and the sync changed them: it received the weights.
        assert r["sync_logprob_err"] < 0.002 and r["sync_logprob_shift"] > 2 * r["sync_logprob_err"], r
    for r in records:
        # The learner scores every sample of the step, the regenerated share included, as the
        # policy of that step: a share sampled by an engine on other weights would stand out.
        assert r["sample_logprob_diff"] < 0.002, r
    assert records[2]["rollout_tokens"] > 0
    _assert_no_leftovers(marker, shm_before)


@pytest.mark.timeout(600)
def test_a_stop_signal_stops_every_process_and_keeps_the_last_checkpoint(tmp_path):
    """SIGTERM (what `ray job stop`, `kill` and schedulers send) mid-run: the launcher exits with
    130, prints the command that resumes, leaves no process or shared memory, and the checkpoint
    written before the signal is whole; the logged steps are each there once. The launcher starts
    with the signal ignored and blocked, as a parent may hand it down (a shell's background job; a
    process that blocked it): it must take the signal all the same. SIGINT (Ctrl-C) takes the same
    handler, which tests/unit/test_launch_signals.py checks for both signals."""
    signum = signal.SIGTERM
    marker = uuid.uuid4().hex
    out = tmp_path / "run"
    shm_before = _shm_files()

    def inherit_the_signal_ignored_and_blocked():
        signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signum})

    proc = _start_and_wait(out, ["run.steps=50", "run.checkpoint_every=1"], marker, lines=2,
                           preexec_fn=inherit_the_signal_ignored_and_blocked)
    try:
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 130, stderr[-4000:]
    assert "--resume" in stderr, stderr[-4000:]
    steps = [r["step"] for r in _records(out)]
    assert steps == list(range(len(steps))) and len(steps) < 50, steps
    whole = sorted(p.name for p in (out / "checkpoints").glob("step_??????"))
    assert whole and all((out / "checkpoints" / name / "manifest.json").is_file() for name in whole), whole
    _assert_no_leftovers(marker, shm_before)

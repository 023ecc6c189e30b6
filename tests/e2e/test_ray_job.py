"""End-to-end: a short training submitted with the real `ray job submit` CLI to a
real Ray head started with `ray start --head` on loopback, as the README says.

The job's working directory is Ray's temporary copy of the upload; the run's
outputs must land where the README says instead (a relative --output-dir goes
under $FLYWHEEL_OUTPUT_ROOT, default ~/flywheel-runs), and `ray job status` /
`ray job logs` must answer as Ray users expect. The cluster is always stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel.net import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _ray(*args: str, env: dict, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def _submit(*args: str, env: dict, timeout_s: float, agent_wait_s: float = 120) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the new head's job agent is still starting (Ray answers
    "No available agent to submit job, please try again later" for the first seconds)."""
    deadline = time.monotonic() + agent_wait_s
    while True:
        result = _ray("job", "submit", *args, env=env, timeout_s=timeout_s)
        if "No available agent" not in result.stderr + result.stdout or time.monotonic() > deadline:
            return result
        time.sleep(2)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head` on loopback with its own ports and temp dir, shared by this module's jobs
    as one cluster serves many jobs; `ray stop` afterwards, always."""
    tmp_path = tmp_path_factory.mktemp("ray_head")
    gcs, dashboard = free_port(), free_port()
    temp_dir = Path("/tmp") / f"fwjob{gcs}"  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "FLYWHEEL_OUTPUT_ROOT": str(tmp_path / "durable"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    started = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                   f"--temp-dir={temp_dir}", "--disable-usage-stats", env=env, timeout_s=180)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}", env, tmp_path / "durable"
    finally:
        _ray("stop", "--force", env=env, timeout_s=120)
        subprocess.run(["rm", "-rf", str(temp_dir)], timeout=60)


@pytest.mark.timeout(900)
def test_ray_job_submit_keeps_its_outputs(ray_head):
    address, env, durable_root = ray_head
    job_id = "flywheel_test_job"
    # The README's command, shrunk by overrides; the output directory is relative, as a user would give it.
    submitted = _submit(f"--address={address}", f"--submission-id={job_id}", "--working-dir", ".",
                        "--", "python", "-m", "cluster.launch", "--config", "configs/local_tiny_ppo.yaml",
                        "--output-dir", "runs/job", "run.steps=2", "run.eval_prompts=8", "data.prompts_per_step=8",
                        "rollout.samples_per_prompt=2", "learner.minibatch_size=16", "learner.world_size=1",
                        "rollout.num_actors=1", env=env, timeout_s=780)
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, logs[-4000:]
    assert "succeeded" in logs, logs[-2000:]

    durable = durable_root / "runs" / "job"
    assert str(durable) in logs  # the run said where its outputs go
    summary = json.loads((durable / "summary.json").read_text())
    assert summary["steps"] == 2 and (durable / "final" / "model.safetensors").is_file()
    assert len((durable / "metrics.jsonl").read_text().splitlines()) == 2

    status = _ray("job", "status", f"--address={address}", job_id, env=env, timeout_s=60)
    assert status.returncode == 0 and f"Job '{job_id}' succeeded" in status.stdout, status.stdout + status.stderr
    job_logs = _ray("job", "logs", f"--address={address}", job_id, env=env, timeout_s=60)
    assert job_logs.returncode == 0 and "flywheel: ppo done" in job_logs.stdout, job_logs.stdout[-2000:]


# A run's processes: its rollout actors, learner ranks and reward service.
_RUN_PROCESSES = "ray::RolloutWorker|ray::LearnerWorker|-m reward_service"


def _processes(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", "--", pattern], capture_output=True, text=True, timeout=30)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


@pytest.mark.timeout(900)
def test_ray_job_stop_stops_every_process_of_the_run(ray_head, tmp_path):
    address, env, _ = ray_head
    job_id = "flywheel_test_stop"
    ours = _RUN_PROCESSES
    others = set(_processes(ours))  # anything already running on the machine is not this job's
    submitted = _submit(f"--address={address}", f"--submission-id={job_id}", "--no-wait",
                        "--working-dir", ".", "--", "python", "-m", "cluster.launch", "--config",
                        "configs/local_tiny_ppo.yaml", "--output-dir", str(tmp_path / "stopped"), "run.steps=500",
                        "run.eval_prompts=8", "data.prompts_per_step=8", "rollout.samples_per_prompt=2",
                        "learner.minibatch_size=16", "learner.world_size=1", "rollout.num_actors=1", env=env,
                        timeout_s=120)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    # Wait (bounded) until the run is training, then stop it as a user would.
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.monotonic() < deadline, _ray("job", "logs", f"--address={address}", job_id, env=env,
                                                 timeout_s=60).stdout[-3000:]
        time.sleep(2)
    assert set(_processes("ray::RolloutWorker")) - others and set(_processes("-m reward_service")) - others
    stopped = _ray("job", "stop", f"--address={address}", job_id, env=env, timeout_s=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    status = _ray("job", "status", f"--address={address}", job_id, env=env, timeout_s=60)
    assert "stopped" in status.stdout.lower(), status.stdout + status.stderr
    # Nothing of the run is left: no actor, learner rank or reward service process.
    deadline = time.monotonic() + 60
    while left := set(_processes(ours)) - others:
        assert time.monotonic() < deadline, left
        time.sleep(1)

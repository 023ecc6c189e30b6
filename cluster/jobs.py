"""Running as a Ray job (`ray job submit --working-dir . -- python -m cluster.launch ...`).

Ray starts a job's entry point in its own copy of the uploaded working
directory, inside the session folder, and deletes that copy with the session.
A relative output directory there would hand the user a success message and
nothing to keep, so `durable_output_dir` moves it under a root that outlives
the job and says where.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# Set by Ray's job supervisor for every job entry point (ray.dashboard.modules.job.job_supervisor).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Where relative output directories of jobs go; ~/flywheel-runs when unset.
OUTPUT_ROOT_ENV = "FLYWHEEL_OUTPUT_ROOT"


def running_as_ray_job(environ: Mapping[str, str] = os.environ) -> bool:
    return RAY_JOB_ENV in environ


def durable_output_dir(output_dir: str, environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """(the directory to write to, a message for the user or None).

    Outside a job, or for an absolute path, the directory is kept. Under a job, a relative
    one is placed under $FLYWHEEL_OUTPUT_ROOT (default ~/flywheel-runs) instead of the job's
    temporary working directory. On a cluster of several nodes, that root (or the absolute
    path given) must be storage that every node mounts at the same path: the learner's rank 0
    writes the checkpoints wherever it runs.
    """
    if os.path.isabs(output_dir) or not running_as_ray_job(environ):
        return output_dir, None
    root = Path(environ.get(OUTPUT_ROOT_ENV) or Path.home() / "flywheel-runs")
    target = str((root / output_dir).resolve())
    message = (f"running as a Ray job: its working directory ({os.getcwd()}) is Ray's temporary copy, deleted "
               f"with the session, so the relative output directory {output_dir!r} is written to {target} "
               f"instead. To choose, pass an absolute --output-dir on storage every node sees, or set "
               f"{OUTPUT_ROOT_ENV}.")
    return target, message

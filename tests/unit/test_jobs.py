"""Outputs of a run submitted with `ray job submit` must outlive the job's temporary working directory."""

from __future__ import annotations

from pathlib import Path

from cluster.jobs import OUTPUT_ROOT_ENV, RAY_JOB_ENV, durable_output_dir


def test_outside_a_job_the_output_directory_is_kept():
    assert durable_output_dir("runs/demo", environ={}) == ("runs/demo", None)


def test_an_absolute_directory_is_kept_under_a_job():
    assert durable_output_dir("/shared/runs/demo", environ={RAY_JOB_ENV: "{}"}) == ("/shared/runs/demo", None)


def test_a_relative_directory_under_a_job_moves_to_the_output_root_with_a_message(tmp_path):
    target, message = durable_output_dir("runs/demo", environ={RAY_JOB_ENV: "{}", OUTPUT_ROOT_ENV: str(tmp_path)})
    assert target == str(tmp_path / "runs" / "demo")
    assert "Ray's temporary copy" in message and target in message and "absolute --output-dir" in message


def test_the_default_root_is_in_the_home_directory():
    target, _ = durable_output_dir("runs/demo", environ={RAY_JOB_ENV: "{}"})
    assert Path(target) == Path.home() / "flywheel-runs" / "runs" / "demo"

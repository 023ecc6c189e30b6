"""A C++ op build that was killed half-way must not hang the next start.

torch waits on an extension's `lock` file with no time limit; `prepare_op_builds` waits for a
young lock (a build in progress) and removes an old one with a warning.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from learner.engine import prepare_op_builds


def _lock(root, name="deepspeed_shm_comm", age_s=0.0):
    folder = root / name
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    if age_s:
        old = time.time() - age_s
        os.utime(lock, (old, old))
    return lock


def test_an_abandoned_lock_is_removed_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock(tmp_path, age_s=3600)
    with pytest.warns(UserWarning, match="never finished"):
        assert prepare_op_builds() == str(tmp_path)
    assert not lock.exists()


def test_a_build_in_progress_is_waited_for_and_its_lock_left_to_it(tmp_path, monkeypatch, recwarn):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock(tmp_path)
    finished = threading.Timer(0.5, lock.unlink)  # the other process's build ends
    finished.start()
    started = time.monotonic()
    prepare_op_builds(stale_after_s=60, poll_s=0.05)
    assert time.monotonic() - started >= 0.4
    assert not [w for w in recwarn if "never finished" in str(w.message)]


def test_a_lock_that_outlives_the_limit_is_cleared_within_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = _lock(tmp_path)
    started = time.monotonic()
    with pytest.warns(UserWarning, match="never finished"):
        prepare_op_builds(stale_after_s=0.5, poll_s=0.05)
    assert not lock.exists()
    assert time.monotonic() - started < 5


def test_the_build_runs_this_environments_ninja_whatever_path_a_process_was_started_with(tmp_path, monkeypatch):
    """Two ninja versions hash a build command differently and rebuild each other's op: every
    process of one environment must find the same ninja first, whatever its PATH."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "ninja").write_text("#!/bin/sh\n")
    (scripts / "ninja").chmod(0o755)
    system = tmp_path / "system"
    system.mkdir()
    (system / "ninja").write_text("#!/bin/sh\n")
    (system / "ninja").chmod(0o755)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr("sysconfig.get_path", lambda name: str(scripts))
    for path in [str(system), os.pathsep.join([str(system), str(scripts)]), str(scripts)]:
        monkeypatch.setenv("PATH", path)
        prepare_op_builds()
        assert shutil.which("ninja") == str(scripts / "ninja"), path
    assert os.environ["PATH"] == str(scripts)  # not added again when it already comes first

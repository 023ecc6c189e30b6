"""learner.allocator: which environment starts a learner process with which allocator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flywheel import allocator
from flywheel.allocator import JEMALLOC_CONF, allocator_env, jemalloc_path, process_allocator


def test_ray_ships_jemalloc_here():
    path = jemalloc_path()
    assert path is not None and path.endswith("core/libjemalloc.so") and os.path.isfile(path)


def test_auto_on_cpu_preloads_jemalloc_keeping_freed_pages():
    env, why = allocator_env("auto", "cpu")
    assert env == {"LD_PRELOAD": jemalloc_path(), "MALLOC_CONF": JEMALLOC_CONF}
    assert "jemalloc" in why and "dirty_decay_ms:-1" in JEMALLOC_CONF


def test_auto_leaves_gpu_runs_and_a_users_preload_alone():
    assert allocator_env("auto", "cuda") == ({}, "the system allocator (learner.allocator=auto on cuda)")
    env, why = allocator_env("auto", "cpu", preload="/opt/libtcmalloc.so")
    assert env == {} and "/opt/libtcmalloc.so" in why


def test_explicit_jemalloc_goes_in_front_of_a_users_preload():
    env, _ = allocator_env("jemalloc", "cuda", preload="/opt/libfoo.so")
    assert env["LD_PRELOAD"] == f"{jemalloc_path()} /opt/libfoo.so"


def test_system_and_bad_values():
    assert allocator_env("system", "cpu")[0] == {}
    with pytest.raises(ValueError, match="learner.allocator must be one of"):
        allocator_env("tcmalloc", "cpu")


def test_without_rays_jemalloc(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc_path", lambda: None)
    env, why = allocator_env("auto", "cpu")
    assert env == {} and "no libjemalloc.so" in why
    with pytest.raises(FileNotFoundError, match="set learner.allocator=auto or system"):
        allocator_env("jemalloc", "cpu")


def test_process_allocator_reads_the_mapped_libraries():
    line = "7f00-7f10 r-xp 00000000 00:00 1 "
    assert process_allocator(line + "/usr/lib/libc.so.6\n" + line + "/x/ray/core/libjemalloc.so\n") == "jemalloc"
    assert process_allocator(line + "/usr/lib/libc.so.6\n") == "system"


def test_a_process_started_with_the_environment_runs_jemalloc():
    """The variables work as Ray passes them: in a new process's environment."""
    env, _ = allocator_env("jemalloc", "cpu")
    code = "from flywheel.allocator import process_allocator; print(process_allocator())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "jemalloc"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert plain.stdout.strip() == "system"

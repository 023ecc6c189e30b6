"""The launcher takes SIGINT (Ctrl-C) and SIGTERM (`ray job stop`, `kill`, schedulers) the same
way, even when its parent started it with the signal ignored and blocked: the handler turns the
signal into KeyboardInterrupt, which unwinds the run (tests/e2e/test_failures.py shows the unwind
of a real run for SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A stand-in for the run: waits, and reports how it ended.
CHILD = """
import sys, time
from cluster.launch import _take_stop_signals
_take_stop_signals()
print("ready", flush=True)
try:
    time.sleep(60)
    print("not stopped", flush=True)
except KeyboardInterrupt as exc:
    print(f"unwound: {exc}", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_unwinds_even_when_inherited_ignored_and_blocked(signum):
    def inherit_the_signal_ignored_and_blocked():
        signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signum})

    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            preexec_fn=inherit_the_signal_ignored_and_blocked)
    try:
        assert proc.stdout.readline().strip() == "ready"
        started = time.monotonic()
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.strip() == f"unwound: signal {int(signum)}"
    assert proc.returncode == 0 and time.monotonic() - started < 10

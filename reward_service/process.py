"""Launch the reward service as a child process and own its lifetime.

`start_reward_server` runs `python -m reward_service ...` with this
interpreter, in its own process group, with `--parent-pid` so that the server
exits by itself if this process dies without calling `stop()`.  It returns once
/health answers; if the server does not come up in time it is killed and the
error shows the tail of its log.

`SupervisedRewardService` is the run's own server with its client: a server
that dies while a rollout is scored is started again and the rollout scored
again, within a deadline.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from flywheel.net import free_port
from flywheel.records import Rollout, ScoredRollout
from reward_service.client import RewardClient, RewardServiceError

log = logging.getLogger("flywheel.reward_service")

# The directory holding the reward_service package: the child needs it importable.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)


def _tail(path: str, max_bytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read log {path}: {exc})"


def _ready_line_seen(log_path: str, start: int) -> bool:
    with open(log_path, "rb") as f:
        f.seek(start)
        return b"reward service ready on " in f.read()


class RewardServerProcess:
    """A running reward server: `.url`, `.pid`, `.stop()`; a context manager."""

    def __init__(
        self, proc: subprocess.Popen, url: str, log_path: str, command: list[str], owns_log: bool = False
    ):
        self.proc = proc
        self.url = url
        self.log_path = log_path
        self.command = command
        self._owns_log = owns_log  # a temporary log we made: removed after a clean stop

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server's process group, then SIGKILL after `timeout_s`."""
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)  # its own group: pgid == pid
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc.poll() is not None:
            if self._owns_log and self.proc.returncode in (0, -signal.SIGTERM):
                Path(self.log_path).unlink(missing_ok=True)
            return
        raise RewardServiceError(f"reward server pid {self.pid} survived SIGKILL; log: {self.log_path}")

    def __enter__(self) -> "RewardServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"RewardServerProcess(url={self.url!r}, pid={self.pid}, log={self.log_path!r})"


def start_reward_server(
    rule: str | None = None,
    model_path: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    start_timeout_s: float = 60.0,
    log_path: str | None = None,
    extra_args: list[str] | None = None,
) -> RewardServerProcess:
    """Start the reward service with exactly one of `rule` / `model_path`.

    port=0 picks a free port.  `extra_args` go to the command line as they are
    (e.g. ["--num-threads", "2"]).  Raises RewardServiceError, with the tail of
    the server's log, if /health does not answer within `start_timeout_s`.
    """
    if (rule is None) == (model_path is None):
        raise ValueError("start_reward_server needs exactly one of rule=... or model_path=...")
    source = ["--rule", rule] if rule is not None else ["--model", str(model_path)]
    # A port picked here can be taken by someone else before the child binds it:
    # then the child exits at once and we try another one.
    attempts = 3 if port == 0 else 1
    for attempt in range(attempts):
        chosen = port or free_port(host)
        server = _launch(source, host, chosen, start_timeout_s, log_path, extra_args or [])
        if isinstance(server, RewardServerProcess):
            return server
        if "address already in use" not in server.lower() or attempt == attempts - 1:
            raise RewardServiceError(server)
    raise AssertionError("unreachable")


def _launch(
    source: list[str],
    host: str,
    port: int,
    start_timeout_s: float,
    log_path: str | None,
    extra_args: list[str],
) -> RewardServerProcess | str:
    """The running server, or the error message if it did not come up."""
    owns_log = log_path is None
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="reward_service_", suffix=".log")
        os.close(fd)
    command = [
        sys.executable, "-m", "reward_service", *source,
        "--host", host, "--port", str(port), "--parent-pid", str(os.getpid()), *extra_args,
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO_ROOT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "ab") as log:
        log_start = log.tell()  # the log may hold earlier runs
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )  # fmt: skip
    server = RewardServerProcess(proc, f"http://{host}:{port}", log_path, command, owns_log)
    client = RewardClient(server.url, retries=0, connect_timeout_s=1.0)
    deadline = time.monotonic() + start_timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return (
                    f"reward server exited with code {proc.returncode} before answering on "
                    f"{server.url}. Command: {' '.join(command)}\nLog {log_path} (tail):\n{_tail(log_path)}"
                )
            # The ready line proves that our child holds the port, and /health
            # that it serves; either alone could be fooled by another server.
            if _ready_line_seen(log_path, log_start):
                try:
                    client.health(timeout_s=1.0)
                    return server
                except RewardServiceError:
                    pass
            time.sleep(0.2)
    finally:
        client.close()
    server._owns_log = False  # keep the log: the error below points to it
    server.stop(timeout_s=5.0)
    return (
        f"reward server did not answer {server.url}/health within {start_timeout_s:.1f} s "
        f"(raise start_timeout_s on a busy machine) and was killed. Command: {' '.join(command)}\n"
        f"Log {log_path} (tail):\n{_tail(log_path)}"
    )


class SupervisedRewardService:
    """The run's own reward server and its client, kept alive while scoring.

    `server` was started by `start(port, start_timeout_s)`, and `client` speaks to it. When scoring
    fails because the server exited or refuses connections, the server is started again the same
    way (on the same port, or on a free one if that is taken, the client following) and the same rollout is scored again: nothing is generated twice. All
    of it must fit in `deadline_s` per rollout, with at most `max_restarts` restarts; the error
    beyond says which limit was hit. The server's pid is written to `pid_path` at each start.
    """

    def __init__(self, server: RewardServerProcess, client: RewardClient,
                 start: Callable[[int, float], RewardServerProcess], *, start_timeout_s: float, deadline_s: float,
                 max_restarts: int, pid_path: str | None = None):
        self.server, self.client, self._start = server, client, start
        self.start_timeout_s, self.deadline_s, self.max_restarts = start_timeout_s, deadline_s, max_restarts
        self.pid_path = pid_path
        self._write_pid()

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def log_path(self) -> str:
        return self.server.log_path

    def _write_pid(self) -> None:
        if self.pid_path is not None:
            Path(self.pid_path).write_text(f"{self.server.pid}\n")

    def stop(self) -> None:
        self.server.stop()
        self.client.close()
        if self.pid_path is not None:
            Path(self.pid_path).unlink(missing_ok=True)

    def score_rollout(self, rollout: Rollout) -> ScoredRollout:
        """The rollout's scores, restarting a server that died on the way; `restarts` counts them."""
        deadline = time.monotonic() + self.deadline_s
        start, failed_before, restarts = time.perf_counter(), self.client.failed_attempts, 0
        while True:
            try:
                scores = self.client.score(rollout.prompts, rollout.completions)
                break
            except RewardServiceError as exc:
                reason = self._death(exc)
                if reason is None:
                    raise  # a live server that answered badly: restarting it would not help
                if restarts >= self.max_restarts or time.monotonic() >= deadline:
                    limit = (f"reward.max_restarts={self.max_restarts}" if restarts >= self.max_restarts
                             else f"the scoring deadline of {self.deadline_s:.0f} s (run.step_timeout_s)")
                    raise RewardServiceError(
                        f"the run's reward service at {self.url} {reason} after {restarts} restart(s) while "
                        f"scoring this step, the limit being {limit}; its log is {self.server.log_path}"
                    ) from exc
                log.warning("reward service at %s %s; restarting it and scoring the same %d samples again",
                            self.url, reason, len(rollout.completions))
                self._restart(deadline)
                restarts += 1
        return ScoredRollout(rollout=rollout, scores=scores, score_s=time.perf_counter() - start,
                             failed_attempts=self.client.failed_attempts - failed_before, restarts=restarts)

    def _death(self, exc: RewardServiceError) -> str | None:
        """Why the server is gone (it exited, or refuses connections), or None if it is not."""
        if not self.server.alive():
            return f"(pid {self.server.pid}) exited with code {self.server.proc.returncode}"
        if "connection refused" in str(exc):
            return f"(pid {self.server.pid}) refused connections"
        return None

    def _restart(self, deadline: float) -> None:
        old = self.server
        old.stop(timeout_s=5.0)  # reaps an exited one; stops one that no longer listens
        start_timeout_s = min(self.start_timeout_s, max(1.0, deadline - time.monotonic()))
        port = int(old.url.rsplit(":", 1)[1])
        try:
            self.server = self._start(port, start_timeout_s)
        except RewardServiceError as exc:
            if "address already in use" not in str(exc).lower():
                raise
            self.server = self._start(0, start_timeout_s)  # the port was taken while the server was down
        self.client.close()  # its pooled connections went to the dead server
        self.client.url = self.server.url
        self._write_pid()

"""Unit tests of reward_service/client.py against tiny in-test HTTP servers.

Each test starts a standard-library HTTP server (or a bare listening socket) on
loopback in this process, so no reward service is needed and each runs in well
under a second.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from reward_service.client import RewardClient, RewardServiceError


class FakeService:
    """An HTTP server on loopback whose /score answers len(completion) per item.

    `statuses` is a list of HTTP status codes for the first requests (each one
    popped in turn; a non-200 answers with `error_text`); every batch received
    is recorded in `batches`.
    """

    def __init__(self, statuses: list[int] | None = None, error_text: str = ""):
        self.batches: list[list[str]] = []
        self.statuses = list(statuses or [])
        self.error_text = error_text
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.batches.append(req["completions"])
                status = fake.statuses.pop(0) if fake.statuses else 200
                if status != 200:
                    self._answer(status, fake.error_text.encode(), "application/json")
                    return
                scores = [float(len(c)) for c in req["completions"]]
                body = {"scores": scores, "scorer": "fake", "elapsed_s": 0.0}
                self._answer(200, json.dumps(body).encode(), "application/json")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # A short poll interval makes shutdown() quick.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "FakeService":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batches_split_and_keep_order():
    # 7 items in batches of 3: requests of 3, 3 and 1; completion i has length i,
    # so the scores must come back as 0, 1, ..., 6 in that order.
    completions = ["x" * i for i in range(7)]
    with FakeService() as fake, RewardClient(fake.url, batch_size=3) as client:
        scores = client.score([f"p{i}" for i in range(7)], completions)
    assert [len(b) for b in fake.batches] == [3, 3, 1]
    assert [c for b in fake.batches for c in b] == completions
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, np.arange(7, dtype=np.float32))


def test_empty_batch_sends_nothing():
    with FakeService() as fake, RewardClient(fake.url) as client:
        assert client.score([], []).shape == (0,)
    assert fake.batches == []


def test_unequal_lengths_rejected_before_sending():
    with FakeService() as fake, RewardClient(fake.url) as client:
        with pytest.raises(ValueError, match="2 prompts and 1 completions"):
            client.score(["a", "b"], ["x"])
    assert fake.batches == []


def test_422_raises_at_once_with_server_message():
    text = '{"detail": "completions: must be a list of strings"}'
    with FakeService(statuses=[422], error_text=text) as fake:
        client = RewardClient(fake.url, retries=5, backoff_s=1.0)
        start = time.monotonic()
        with pytest.raises(RewardServiceError) as info:
            client.score(["a"], ["b"])
        elapsed = time.monotonic() - start
    assert len(fake.batches) == 1  # no retry
    assert elapsed < 0.9  # and no backoff sleep
    assert "HTTP 422" in str(info.value)
    assert "completions: must be a list of strings" in str(info.value)
    assert fake.url in str(info.value)


def test_5xx_is_retried_then_succeeds():
    with FakeService(statuses=[503], error_text="busy") as fake:
        client = RewardClient(fake.url, retries=1, backoff_s=0.05)
        scores = client.score(["p"], ["abc"])
    assert len(fake.batches) == 2
    np.testing.assert_array_equal(scores, [3.0])


def test_retried_attempts_are_counted_per_scoring_call():
    """The dashboard's reward-service error count: one 503 then success is one failed attempt."""
    from flywheel.records import Rollout

    rollout = Rollout(prompts=["p", "q"], prompt_ids=[], completions=["ab", "abc"], completion_ids=[], logprobs=[],
                      finish_reasons=[], policy_version=0, gen_s=0.0)
    with FakeService(statuses=[503], error_text="busy") as fake:
        client = RewardClient(fake.url, retries=1, backoff_s=0.05)
        first = client.score_rollout(rollout)
        second = client.score_rollout(rollout)
    assert (first.failed_attempts, second.failed_attempts, client.failed_attempts) == (1, 0, 1)
    np.testing.assert_array_equal(second.scores, [2.0, 3.0])


def test_5xx_after_all_retries_raises_with_server_text():
    with FakeService(statuses=[500, 500, 500], error_text="scorer exploded") as fake:
        client = RewardClient(fake.url, retries=2, backoff_s=0.01, timeout_s=5.0)
        with pytest.raises(RewardServiceError, match="scorer exploded") as info:
            client.score(["p"], ["c"])
    assert len(fake.batches) == 3
    assert client.failed_attempts == 3
    assert "python -m reward_service" in str(info.value)


def test_connection_refused_raises_within_timeout_with_fix():
    port = unused_port()  # bound then released: nothing listens there
    url = f"http://127.0.0.1:{port}"
    timeout_s = 2.0
    client = RewardClient(url, timeout_s=timeout_s, retries=2)
    start = time.monotonic()
    with pytest.raises(RewardServiceError) as info:
        client.score(["p"], ["c"])
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert elapsed < timeout_s + 1.0
    assert url in msg
    assert "connection refused" in msg
    assert f"python -m reward_service --rule synthetic_gold --port {port}" in msg
    assert "2.0 s" in msg


def test_a_dropped_remote_service_is_retried_until_the_deadline():
    """A configured reward.url cannot be restarted by the run: its client keeps trying, every
    0.1 s at most, until its deadline, and then names the URL and what happened."""
    url = f"http://127.0.0.1:{unused_port()}"
    client = RewardClient(url, timeout_s=1.5, retries=None, backoff_s=0.05, max_backoff_s=0.1)
    start = time.monotonic()
    with pytest.raises(RewardServiceError, match="connection refused") as info:
        client.score(["p"], ["c"])
    elapsed = time.monotonic() - start
    assert 1.3 < elapsed < 2.5, elapsed  # tried until the deadline, not given up after a few tries
    assert client.failed_attempts >= 10  # 0.05, then 0.1 s apart: about 15 attempts in 1.5 s
    assert url in str(info.value) and "1.5 s" in str(info.value)
    assert f"attempt {client.failed_attempts})" in str(info.value)  # no cap on attempts to name


def test_server_that_never_answers_hits_read_timeout():
    # A socket that listens but never accepts: the kernel completes the TCP
    # handshake, the request is sent, and no answer ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        timeout_s = 1.0
        client = RewardClient(url, timeout_s=timeout_s, retries=3)
        start = time.monotonic()
        with pytest.raises(RewardServiceError) as info:
            client.score(["p"], ["c"])
        elapsed = time.monotonic() - start
    assert timeout_s - 0.1 < elapsed < timeout_s + 1.0
    assert "Timeout" in str(info.value)
    assert url in str(info.value)


def test_health_and_wait_until_healthy_fail_fast_when_nothing_listens():
    client = RewardClient(f"http://127.0.0.1:{unused_port()}")
    start = time.monotonic()
    with pytest.raises(RewardServiceError, match="not healthy within 1.0 s"):
        client.wait_until_healthy(deadline_s=1.0)
    assert time.monotonic() - start < 2.0


def test_client_pickles_without_its_connection_pool():
    import pickle

    with FakeService() as fake:
        client = RewardClient(fake.url, batch_size=2)
        client.score(["a"], ["b"])  # opens the pool
        clone = pickle.loads(pickle.dumps(client))
        np.testing.assert_array_equal(clone.score(["a"], ["bb"]), [2.0])

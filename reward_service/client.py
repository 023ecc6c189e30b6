"""Client of the reward service: the only way the driver reaches it.

`RewardClient.score` splits a batch into requests of `batch_size` items and
returns one float32 score per item, in order.  Each request, with its retries,
must finish within `timeout_s`: connection errors and 5xx answers are retried
with a short backoff while time remains; a 4xx answer is a bug in the request
and raises at once with the server's explanation.  Every failure raises
`RewardServiceError`, whose message names the URL, the timeout, what happened
and the command that starts the service.
"""

from __future__ import annotations

import itertools
import math
import time
from urllib.parse import urlsplit

import httpx
import numpy as np

from flywheel.records import Rollout, ScoredRollout


class RewardServiceError(RuntimeError):
    """The reward service could not be reached or refused a request."""


def _short(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more chars)"


class RewardClient:
    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        retries: int | None = 2,
        batch_size: int = 256,
        connect_timeout_s: float = 5.0,
        backoff_s: float = 0.2,
        max_backoff_s: float = 30.0,
    ):
        """
        url: base URL of the service, e.g. "http://127.0.0.1:8123".
        timeout_s: deadline of one request of `batch_size` items, retries included.
        retries: extra attempts after a connection error or a 5xx answer; None: until the deadline.
        batch_size: items per HTTP request.
        connect_timeout_s: cap on establishing one connection.
        backoff_s: wait before the first retry; doubles at each further one.
        max_backoff_s: the longest wait between two attempts.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.retries = None if retries is None else int(retries)
        self.batch_size = int(batch_size)
        self.connect_timeout_s = float(connect_timeout_s)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        # Attempts that failed (no connection, no answer in time, HTTP 5xx) since the client was made,
        # whether a retry then succeeded or not: the reward service's error count on the dashboard.
        self.failed_attempts = 0
        self._http: httpx.Client | None = None

    # -- plumbing ---------------------------------------------------------

    def _client(self) -> httpx.Client:
        if self._http is None:
            # trust_env=False: a proxy from the environment must not sit between
            # the driver and a loopback service.
            self._http = httpx.Client(trust_env=False)
        return self._http

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # Picklable for Ray: the connection pool is rebuilt on first use.
        return {**self.__dict__, "_http": None}

    def start_hint(self) -> str:
        port = urlsplit(self.url).port or 8123
        return (
            f"Start it with: python -m reward_service --rule synthetic_gold --port {port}, "
            "or check reward.url in your config."
        )

    def _unreachable(self, timeout_s: float, what: str, answered: bool) -> RewardServiceError:
        happened = "kept failing for" if answered else "did not answer within"
        return RewardServiceError(
            f"reward service at {self.url} {happened} {timeout_s:.1f} s ({what}). " + self.start_hint()
        )

    def _request(self, method: str, path: str, json: dict | None, timeout_s: float) -> dict:
        """One call with retries, all within `timeout_s`; the decoded JSON answer."""
        http = self._client()  # built before the clock starts: it loads CA certificates
        deadline = time.monotonic() + timeout_s
        backoff = self.backoff_s
        what, answered = "no attempt made", False
        for attempt in itertools.count() if self.retries is None else range(self.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            timeout = httpx.Timeout(remaining, connect=min(self.connect_timeout_s, remaining))
            try:
                resp = http.request(method, self.url + path, json=json, timeout=timeout)
            except httpx.ConnectError as exc:
                refused = "refused" in str(exc).lower()
                what, answered = ("connection refused" if refused else f"cannot connect: {exc}"), False
            except httpx.TimeoutException as exc:
                what, answered = f"{type(exc).__name__}: no answer in time", False
            except httpx.TransportError as exc:
                what, answered = f"{type(exc).__name__}: {exc}", False
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError:
                        raise RewardServiceError(
                            f"{self.url}{path} answered HTTP {resp.status_code} with non-JSON "
                            f"{_short(resp.text, 300)!r}; is a reward service listening there? "
                            + self.start_hint()
                        ) from None
                if resp.status_code < 500:
                    raise RewardServiceError(
                        f"reward service at {self.url} rejected {method} {path} with HTTP "
                        f"{resp.status_code}: {_short(resp.text)}"
                    )
                what, answered = f"HTTP {resp.status_code}: {_short(resp.text)}", True
            self.failed_attempts += 1
            what = f"{what}; attempt {attempt + 1}" + ("" if self.retries is None else f" of {self.retries + 1}")
            if self.retries is None or attempt < self.retries:
                time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
                backoff = min(2 * backoff, self.max_backoff_s)
        raise self._unreachable(timeout_s, what, answered)

    # -- API --------------------------------------------------------------

    def score(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """(B,) float32 scores, one per (prompt, completion) pair, in order."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"score: got {len(prompts)} prompts and {len(completions)} completions; "
                "pass one completion per prompt"
            )
        out = np.empty(len(prompts), dtype=np.float32)
        for start in range(0, len(prompts), self.batch_size):
            stop = min(start + self.batch_size, len(prompts))
            body = {"prompts": list(prompts[start:stop]), "completions": list(completions[start:stop])}
            answer = self._request("POST", "/score", body, self.timeout_s)
            scores = answer.get("scores")
            if not isinstance(scores, list) or len(scores) != stop - start:
                raise RewardServiceError(
                    f"reward service at {self.url} returned {_short(repr(answer), 300)} for "
                    f"{stop - start} items; expected {{'scores': [{stop - start} floats]}}"
                )
            # A NaN score arrives as JSON null.
            out[start:stop] = [math.nan if s is None else s for s in scores]
        return out

    def score_rollout(self, rollout: Rollout) -> ScoredRollout:
        """Scores of a rollout's (prompt, completion) pairs, with the wall time taken."""
        start, failed_before = time.perf_counter(), self.failed_attempts
        scores = self.score(rollout.prompts, rollout.completions)
        return ScoredRollout(rollout=rollout, scores=scores, score_s=time.perf_counter() - start,
                             failed_attempts=self.failed_attempts - failed_before)

    def health(self, timeout_s: float = 5.0) -> dict:
        """The /health answer, e.g. {"status": "ok", "scorer": "rule:length"}."""
        return self._request("GET", "/health", None, timeout_s)

    def wait_until_healthy(self, deadline_s: float = 60.0, poll_s: float = 0.25) -> dict:
        """Poll /health until it answers or `deadline_s` passes (then raise)."""
        deadline = time.monotonic() + deadline_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self.health(timeout_s=max(0.1, min(2.0, remaining)))
            except RewardServiceError as exc:
                last = exc
            if time.monotonic() + poll_s >= deadline:
                raise RewardServiceError(
                    f"reward service at {self.url} was not healthy within {deadline_s:.1f} s; "
                    f"last error: {last}"
                ) from last
            time.sleep(poll_s)

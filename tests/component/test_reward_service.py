"""Component tests of the reward service: the real server in its own process.

Every test talks to `python -m reward_service` on loopback, started through
`reward_service.process.start_reward_server`, the way the driver starts it.
The reward-model test builds a tiny random Llama classifier with the project's
embedded builder (flywheel/tiny_model.py) in a temporary directory.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from reward_service.client import RewardClient, RewardServiceError
from reward_service.process import start_reward_server
from reward_service.rules import RULES, length_reward

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_BATCH = 8

PROMPTS = ["Q: what is two plus two?\nA:", "Say hello.", "Count to five:", "", "x"]
COMPLETIONS = [" four", " hello there my friend", " one two three four five", "a " * 40, ""]


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting to be reaped counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.1)
    return gone(pid)


@pytest.fixture(scope="module")
def length_server():
    with start_reward_server(rule="length", extra_args=["--max-batch", str(MAX_BATCH)]) as server:
        yield server


def items_scored(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5.0).text
    return float(re.search(r"^reward_items_scored_total (\S+)$", text, re.M).group(1))


def test_scores_equal_the_rule_called_directly(length_server):
    # batch_size 2 < MAX_BATCH: 5 items travel as requests of 2, 2 and 1.
    client = RewardClient(length_server.url, batch_size=2, timeout_s=10.0)
    scores = client.score(PROMPTS, COMPLETIONS)
    expected = [length_reward(p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    # By hand: 1, 4, 5, 40 (capped) and 0 words over 32.
    assert expected == [1 / 32, 4 / 32, 5 / 32, 1.0, 0.0]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-7)


def test_wrong_types_get_422_naming_the_field(length_server):
    r = httpx.post(length_server.url + "/score", json={"prompts": [1, 2], "completions": "x"}, timeout=5.0)
    assert r.status_code == 422
    body = r.json()
    locs = [tuple(d["loc"]) for d in body["detail"]]
    assert ("body", "completions") in locs
    assert ("body", "prompts", 0) in locs
    assert "two lists of strings" in body["expected"]


def test_unequal_lengths_get_a_clear_error(length_server):
    r = httpx.post(length_server.url + "/score", json={"prompts": ["a", "b"], "completions": ["x"]}, timeout=5.0)
    assert r.status_code == 422
    msg = r.json()["detail"][0]["msg"]
    assert "got 2 prompts and 1 completions" in msg
    # Through the client, a 4xx becomes a RewardServiceError carrying that text.
    client = RewardClient(length_server.url, timeout_s=5.0)
    with pytest.raises(RewardServiceError, match="HTTP 422"):
        client._request("POST", "/score", {"prompts": ["a"], "completions": []}, 5.0)


def test_oversize_batch_gets_413_with_the_fix(length_server):
    n = MAX_BATCH + 1
    r = httpx.post(length_server.url + "/score", json={"prompts": ["p"] * n, "completions": ["c"] * n}, timeout=5.0)
    assert r.status_code == 413
    assert f"exceeds the server's max_batch {MAX_BATCH}" in r.json()["detail"]


def test_health_and_metrics(length_server):
    client = RewardClient(length_server.url)
    assert client.health() == {"status": "ok", "scorer": "rule:length"}
    before = items_scored(length_server.url)
    client.score(["a", "b", "c"], ["x", "y", "z"])
    assert items_scored(length_server.url) == before + 3
    text = httpx.get(length_server.url + "/metrics", timeout=5.0).text
    assert 'reward_requests_total{outcome="ok"}' in text
    assert "reward_score_seconds_sum" in text


def test_stop_leaves_no_process():
    server = start_reward_server(rule="length")
    pid = server.pid
    assert psutil.pid_exists(pid)
    server.stop()
    assert not psutil.pid_exists(pid)
    with pytest.raises(RewardServiceError, match="python -m reward_service"):
        RewardClient(server.url, timeout_s=1.0).health(timeout_s=1.0)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "reward_service", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_cli_unknown_rule_exits_2_listing_valid_rules():
    result = run_cli("--rule", "no_such_rule", "--port", "1")
    assert result.returncode == 2
    for name in RULES:
        assert name in result.stderr


def test_cli_needs_exactly_one_of_rule_and_model():
    assert run_cli("--port", "1").returncode == 2
    both = run_cli("--rule", "length", "--model", "/tmp", "--port", "1")
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr


def test_start_failure_raises_with_the_log_tail(tmp_path):
    with pytest.raises(RewardServiceError, match="is not a directory"):
        start_reward_server(
            model_path=str(tmp_path / "missing"), start_timeout_s=30, log_path=str(tmp_path / "log")
        )


def test_server_exits_when_its_parent_dies(tmp_path):
    # An intermediate process starts the server, prints its pid, then is
    # SIGKILLed: it never gets to call stop().
    script = textwrap.dedent(
        """
        import sys, time
        from reward_service.process import start_reward_server
        server = start_reward_server(rule="length", log_path=sys.argv[1])
        print(server.pid, flush=True)
        time.sleep(120)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "log")], stdout=subprocess.PIPE, text=True, env=env
    )
    server_pid = None
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 60)
        assert ready, "intermediate process did not start the server within 60 s"
        server_pid = int(parent.stdout.readline())
        assert not gone(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        # The server polls its parent every second, then shuts down.
        assert wait_gone(server_pid, timeout_s=10), f"server pid {server_pid} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        if server_pid is not None and not gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)


# -- a reward model ---------------------------------------------------------


def test_model_scorer_through_the_server_equals_the_model(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from flywheel.tiny_model import TinyModelSpec, ensure_embedded_model

    # The embedded reward model's architecture, shrunk: hidden 64, 2 layers,
    # 4 heads, fp32; a wide init spreads the random scores well apart.
    spec = TinyModelSpec(hidden_size=64, intermediate_size=128, num_kv_heads=4, init_std=0.2, dtype="float32")
    path = ensure_embedded_model("reward", spec=spec, cache_dir=tmp_path)
    # batch_size 4 on both sides: one padded batch of 4 texts, then one of 1.
    extra = ["--batch-size", "4", "--dtype", "float32"]
    with start_reward_server(model_path=path, start_timeout_s=120, extra_args=extra) as server:
        client = RewardClient(server.url, batch_size=4, timeout_s=60.0)
        assert client.health()["scorer"] == f"model:{path}"
        scores = client.score(PROMPTS, COMPLETIONS)

    # The model called directly, one unpadded text at a time.
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = [
            model(**tokenizer(p + c, return_tensors="pt")).logits[0, 0].item()
            for p, c in zip(PROMPTS, COMPLETIONS)
        ]
    assert np.ptp(expected) > 0.05  # a test of distinct numbers, not of one constant
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)


def _rollout(prompts: list[str], completions: list[str]):
    from flywheel.records import Rollout

    n = len(prompts)
    return Rollout(prompts=prompts, prompt_ids=[np.array([1])] * n, completions=completions,
                   completion_ids=[np.array([2])] * n, logprobs=[np.zeros(1, np.float32)] * n,
                   finish_reasons=["length"] * n, policy_version=0, gen_s=0.0)


def _supervised(tmp_path, max_restarts: int):
    from reward_service.process import SupervisedRewardService

    def start(port: int, start_timeout_s: float):
        return start_reward_server(rule="length", port=port, start_timeout_s=start_timeout_s,
                                   log_path=str(tmp_path / "reward.log"))

    server = start(0, 60.0)
    return SupervisedRewardService(server, RewardClient(server.url, timeout_s=10.0), start, start_timeout_s=60.0,
                                   deadline_s=90.0, max_restarts=max_restarts, pid_path=str(tmp_path / "reward.pid"))


def test_supervised_service_restarts_a_killed_server_and_scores_the_same_rollout(tmp_path):
    service = _supervised(tmp_path, max_restarts=1)
    try:
        pid, url = int((tmp_path / "reward.pid").read_text()), service.url
        assert pid == service.server.pid
        first = service.score_rollout(_rollout(PROMPTS, COMPLETIONS))
        assert first.restarts == 0
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, 10)
        again = service.score_rollout(_rollout(PROMPTS, COMPLETIONS))
        # Started again, on the same port, its new pid written down; every score there, equal to before.
        assert again.restarts == 1 and again.failed_attempts >= 1
        new_pid = int((tmp_path / "reward.pid").read_text())
        assert new_pid == service.server.pid != pid and service.url == url
        np.testing.assert_array_equal(again.scores, first.scores)
        # A second death in one scoring is beyond max_restarts=1: the error says so.
        os.kill(new_pid, signal.SIGKILL)
        assert wait_gone(new_pid, 10)
        service.max_restarts = 0
        with pytest.raises(RewardServiceError, match=r"exited with code -9 after 0 restart\(s\).*reward.max_restarts=0"):
            service.score_rollout(_rollout(PROMPTS, COMPLETIONS))
    finally:
        service.stop()
    assert not (tmp_path / "reward.pid").exists()
    assert wait_gone(service.server.pid, 10)


"""End-to-end: the dashboard of a real run (the real entry point through local Ray, vLLM, DeepSpeed
and the HTTP reward service), read in a real headless browser (Debian's chromium driven by
Playwright) while the run goes.  The throughput figures on the page must change as steps
complete, and they must be the run's own (metrics.jsonl).  A screenshot of the page at the last
step is kept in the test's tmp dir and in test-artifacts/dashboard.png at the repository root.

The run is asynchronous (rollout.max_staleness=1: the actors generate the next batch while the
learner trains), so it is also the end-to-end test of that mode: every batch but the first is
one policy version stale, and every weight push leaves each actor with the learner's weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.e2e.test_launch import CONFIG, REPO, _assert_no_leftovers

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACT = REPO / "test-artifacts" / "dashboard.png"
STEPS = 5


def _browser_or_skip():
    if not os.path.exists(CHROMIUM):
        pytest.skip("no chromium on this machine: `make browser` installs Debian's (apt-get, as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[dev]'")
    return sync_playwright


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen, log: Path, poll_s: float = 1.0):
    """Poll `predicate` until it returns something truthy; fail naming `what` if the run ends or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(poll_s)
    pytest.fail(f"no {what} within {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def _number(text: str) -> float | None:
    text = text.replace(",", "").strip()
    return float(text) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", text) else None


@pytest.mark.timeout(900)
def test_dashboard_follows_a_real_run_in_a_browser(tmp_path):
    sync_playwright = _browser_or_skip()
    marker, out, log = uuid.uuid4().hex, tmp_path / "run", tmp_path / "launch.log"
    env = {**os.environ, "FLYWHEEL_TEST_MARKER": marker, "PYTHONPATH": str(REPO)}
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.launch", "--config", str(CONFIG), "--output-dir", str(out),
             f"run.steps={STEPS}", "run.eval_prompts=4", "run.save_final=false", "run.checkpoint_every=0", "data.prompts_per_step=8",
             "rollout.num_actors=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=12",
             "learner.minibatch_size=16", "learner.ppo_epochs=1",
             "rollout.max_staleness=1", "rollout.num_threads=1", "learner.num_threads=1", "sync.verify_weights=true"],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    try:
        url = _wait_for(lambda: (m := re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", log.read_text())) and m[1],
                        300, "dashboard address in the log", proc, log)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url + "?poll=0.3")  # steps of a tiny run can take under 2 s, the page's usual poll

            def shown() -> tuple[int, float | None, str, int]:
                """Steps done, the total tokens/s tile, its per-actor line, and the points of the throughput
                chart, read in one go (the page cannot redraw in between)."""
                progress, value, sub, points = page.evaluate("""() => {
                    const tile = document.querySelector('[data-figure="rollout_tokens_per_s"]');
                    return [document.getElementById("progress-text").textContent,
                            tile ? tile.querySelector(".value").textContent : "",
                            tile ? tile.querySelector(".sub").textContent : "",
                            document.querySelectorAll("#c-tokens circle").length];
                }""")
                done = re.search(r"step (\d+) / ", progress)
                return int(done[1]) if done else 0, _number(value), sub, points

            # Every new step count the page shows, with its figures, until the last step.
            seen: dict[int, tuple] = {}

            def last_step_shown() -> bool:
                now = shown()
                if now[0] and now[0] not in seen:
                    seen[now[0]] = now
                return now[0] == STEPS

            _wait_for(last_step_shown, 600, f"step {STEPS} of {STEPS} on the page", proc, log, poll_s=0.2)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            ARTIFACT.parent.mkdir(exist_ok=True)
            shutil.copy(tmp_path / "dashboard.png", ARTIFACT)
            browser.close()
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    assert not errors, errors
    _assert_no_leftovers(marker)
    with pytest.raises(OSError):  # the run stopped its server on the way out
        urllib.request.urlopen(url + "api/status", timeout=5)

    # The other monitoring sinks ran through the whole run beside the page.
    text = log.read_text()
    assert "PrometheusSink failed" not in text and "TensorBoardSink failed" not in text, text[-4000:]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(STEPS))
    # The throughput on the page changed as steps completed, and each figure shown is the run's own
    # for the last step done (tiles show 3 significant digits at least).
    assert len(seen) >= 2 and len({tokens for _, tokens, _, _ in seen.values()}) > 1, seen
    for done, (_, tokens, sub, points) in seen.items():
        assert tokens == pytest.approx(records[done - 1]["rollout_tokens_per_s"], rel=0.01, abs=0.06), (seen, records)
        # Two actors: each one's rate is on the tile, and the chart has a point per step for the
        # total and for each actor.
        assert "actor 0:" in sub and "actor 1:" in sub, seen
        assert points == 3 * done, seen
    assert all(len(r["actor_tokens_per_s"]) == 2 for r in records)
    # Asynchronous: step k trains on a batch the actors generated with the weights of update k - 1
    # while the learner made update k, corrected towards the learner's (weights near 1).
    assert [r["policy_version"] for r in records] == [0, 0, 1, 2, 3]
    assert [r["staleness"] for r in records] == [0, 1, 1, 1, 1]
    assert all(0.5 < r["behavior_weight_mean"] < 1.5 for r in records), records
    for r in records[1:]:
        # A push before each later step: vLLM's logprobs of a fixed sequence then equal the learner's
        # (bf16 or float32, whichever the machine runs), and the push changed them.
        assert r["sync_logprob_err"] < 0.05 and r["sync_logprob_shift"] > 2 * r["sync_logprob_err"], r
    # ... and every weight of both engines equals the learner's, exactly (the run stops otherwise).
    verified = [r.get("sync_weights_verified") for r in records]
    assert verified[0] is None and len(set(verified[1:])) == 1 and verified[1] > 10, verified
    assert ARTIFACT.stat().st_size > 10_000

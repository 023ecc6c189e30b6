"""End-to-end: the three RLHF phases through the real entry point, each stage
reading the previous stage's output directory as it is.

SFT on demonstrations -> a reward model on preference pairs -> PPO against
that reward model served over HTTP, with the SFT policy as the start and the
KL reference. Small sizes: this checks the wiring, the saved formats and the
figures each stage reports, not the quality (benchmarks/ measure that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _launch(config: str, out: Path, *overrides: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cluster.launch", "--config", str(REPO / "configs" / config),
                           "--output-dir", str(out), *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


@pytest.mark.timeout(1200)
def test_sft_then_reward_model_then_ppo(tmp_path):
    """configs/local_tiny_pipeline.yaml in one command, shrunk."""
    out = tmp_path / "pipe"
    result = _launch("local_tiny_pipeline.yaml", out, "sft.examples=512", "sft.epochs=2", "reward_model.pairs=512",
                     "reward_model.epochs=1", "run.steps=2", "run.eval_prompts=8", "data.prompts_per_step=8",
                     "rollout.samples_per_prompt=2", "learner.minibatch_size=16", "run.save_final=false",
                     "run.checkpoint_every=0")
    assert result.returncode == 0, result.stderr[-4000:]
    pipeline = json.loads((out / "pipeline.json").read_text())
    assert pipeline["stages"] == ["sft", "reward_model", "ppo"]
    s, r = pipeline["summaries"]["sft"], pipeline["summaries"]["reward_model"]
    assert s["held_out_loss_after"] < s["held_out_loss_before"], s
    policy = out / "sft" / "model"
    assert (policy / "model.safetensors").is_file() and (policy / "tokenizer.json").is_file()
    assert r["start_from"] == str(policy.resolve()) and 0.0 <= r["held_out_agreement_after"] <= 1.0

    # PPO started from the SFT policy and scored with the judge the reward-model stage saved.
    ppo_config = json.loads((out / "ppo" / "config.json").read_text())
    assert ppo_config["model"]["path"] == str(policy.resolve())
    assert ppo_config["reward"]["rule"] is None
    assert ppo_config["reward"]["model_path"] == str((out / "reward_model" / "model").resolve())
    records = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records] == [0, 1]
    # The proxy (the learned judge's score) and the gold labeller side by side at every step.
    assert all(np.isfinite(x["score_mean"]) and 0.0 <= x["gold_reward_mean"] <= 1.0 for x in records)
    # The SFT policy already writes on-topic words: far above the random-init policy's ~0.06.
    before = pipeline["summaries"]["ppo"]["before"]
    assert before["eval_gold_reward"] > 0.2
    # Every held-out sample is kept beside the figure: 8 prompts x 2 samples, the same mean.
    rows = [json.loads(line) for line in (out / "ppo" / "eval_before.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and sorted({x["sample"] for x in rows}) == [0, 1]
    assert np.mean([x["gold"] for x in rows]) == pytest.approx(before["eval_gold_reward"], abs=1e-6)


@pytest.mark.timeout(300)
def test_bad_preference_data_stops_before_training(tmp_path):
    bad = REPO / "tests" / "fixtures" / "data" / "bad_pairs.jsonl"
    result = _launch("local_tiny_reward_model.yaml", tmp_path / "rm", f"reward_model.data={bad}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "bad data" in result.stderr and "bad_pairs.jsonl" in result.stderr and "lines 2, 3, 5" in result.stderr
    assert not (tmp_path / "rm" / "model").exists()


@pytest.mark.timeout(600)
def test_dpo_stage_prefers_chosen_on_held_out_pairs(tmp_path):
    result = _launch("local_tiny_dpo.yaml", tmp_path / "dpo", "dpo.pairs=640", "dpo.eval_fraction=0.1")
    assert result.returncode == 0, result.stderr[-4000:]
    s = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    # The policy starts as the reference (margins near 0, their sign is rounding); training moves them.
    assert s["held_out_preferred_after"] > max(0.55, s["held_out_preferred_before"]), s
    assert (tmp_path / "dpo" / "model" / "model.safetensors").is_file()

    # run.steps=0 only evaluates: the DPO policy sampled on held-out prompts, nothing trained or saved.
    result = _launch("local_tiny_ppo.yaml", tmp_path / "eval", f"model.path={s['model']}", "run.steps=0",
                     "run.eval_prompts=8", "run.save_final=true")
    assert result.returncode == 0, result.stderr[-4000:]
    e = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert e["model_path"] == s["model"] and e["before"] == e["after"] and e["before"]["eval_prompts"] == 8
    assert not (tmp_path / "eval" / "metrics.jsonl").read_text().strip()
    assert (tmp_path / "eval" / "eval_before.jsonl").is_file() and not (tmp_path / "eval" / "final").exists()


@pytest.mark.timeout(600)
def test_arithmetic_sft_then_a_critic_free_estimator(tmp_path):
    """configs/local_tiny_arithmetic.yaml shrunk, with RLOO: exact-match rewards over HTTP, no critic."""
    out = tmp_path / "arith"
    result = _launch("local_tiny_arithmetic.yaml", out, "sft.examples=256", "sft.epochs=1", "run.steps=2",
                     "learner.advantage=rloo", "run.eval_prompts=16", "data.prompts_per_step=8",
                     "rollout.samples_per_prompt=4", "learner.minibatch_size=32", "run.save_final=false",
                     "run.checkpoint_every=0")
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records] == [0, 1]
    # Exact match is 0 or 1 per sample; the estimator trains no critic, so there is no value loss.
    for x in records:
        assert 0.0 <= x["score_mean"] <= 1.0 and x["score_mean"] == pytest.approx(x["gold_reward_mean"], abs=1e-6)
        assert x["value_loss"] == 0.0
    rows = [json.loads(line) for line in (out / "ppo" / "eval_before.jsonl").read_text().splitlines()]
    assert len(rows) == 16 * 4 and {x["gold"] for x in rows} <= {0.0, 1.0}
    assert all(" + " in x["prompt"] or " - " in x["prompt"] for x in rows)

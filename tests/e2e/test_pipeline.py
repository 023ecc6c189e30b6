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

import pytest

REPO = Path(__file__).resolve().parents[2]


def _launch(config: str, out: Path, *overrides: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cluster.launch", "--config", str(REPO / "configs" / config),
                           "--output-dir", str(out), *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


@pytest.mark.timeout(1200)
def test_sft_then_reward_model_then_ppo(tmp_path):
    sft = _launch("local_tiny_sft.yaml", tmp_path / "sft", "sft.examples=512", "sft.epochs=1")
    assert sft.returncode == 0, sft.stderr[-4000:]
    s = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert s["held_out_loss_after"] < s["held_out_loss_before"], s
    policy = tmp_path / "sft" / "model"
    assert (policy / "model.safetensors").is_file() and (policy / "tokenizer.json").is_file()

    rm = _launch("local_tiny_reward_model.yaml", tmp_path / "rm", f"model.path={policy}", "reward_model.pairs=512",
                 "reward_model.epochs=1")
    assert rm.returncode == 0, rm.stderr[-4000:]
    r = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert 0.0 <= r["held_out_agreement_after"] <= 1.0 and r["steps"] > 0
    judge = tmp_path / "rm" / "model"

    ppo = _launch("local_tiny_ppo.yaml", tmp_path / "ppo", f"model.path={policy}", "reward.rule=null",
                  f"reward.model_path={judge}", "run.steps=2", "run.eval_prompts=8", "data.prompts_per_step=8",
                  "rollout.samples_per_prompt=2", "learner.minibatch_size=16", "run.save_final=false")
    assert ppo.returncode == 0, ppo.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    # The served judge's scores are real numbers, not the gold rule's [0, 1] values copied.
    assert all(r["score_mean"] == r["score_mean"] for r in records)
    assert all("gold_reward_mean" in r for r in records)  # proxy and gold side by side


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

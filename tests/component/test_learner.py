"""The DeepSpeed learner on the embedded tiny model, in this process (one rank).

Checks what a user relies on: experience tensors line up with the rollout, a PPO
update on a fixed reward signal moves the policy the right way, the learner's
logprobs equal transformers' for the same weights, and under ZeRO-3 the
gathered full weights (what a sync or a checkpoint sends) are the real ones.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from flywheel.net import free_port
from flywheel.records import Rollout, ScoredRollout
from learner.config import LearnerConfig

pytestmark = pytest.mark.timeout(600)


def _worker(policy_path: str, zero_stage: int, dtype: str = "float32", ref_path: str | None = None,
            group_size: int = 1, **ppo):
    from learner.worker import LearnerSetup, LearnerWorker

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    setup = LearnerSetup(model_path=policy_path, rank=0, world_size=1, master_addr="127.0.0.1",
                         master_port=free_port(), device="cpu", dtype=dtype, zero_stage=zero_stage, seed=0,
                         dist_timeout_s=120, ref_model_path=ref_path, group_size=group_size)
    return LearnerWorker(setup, LearnerConfig(**{"minibatch_size": 8, **ppo}))


def _scored(policy_path: str, rewarded_token: int, n: int = 16, seed: int = 0, version: int = 0) -> ScoredRollout:
    """Random completions; the score is the fraction of tokens equal to `rewarded_token`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_path)
    rng = np.random.default_rng(seed)
    prompt = np.asarray(tok("Write about animals:")["input_ids"], dtype=np.int32)
    completions = [rng.integers(5, tok.vocab_size, size=rng.integers(3, 9)).astype(np.int32) for _ in range(n)]
    for c in completions[0::4] + completions[1::4]:  # two of every four, so each group of 4 has a contrast
        c[rng.random(len(c)) < 0.5] = rewarded_token
    scores = np.array([np.mean(c == rewarded_token) for c in completions], dtype=np.float32)
    rollout = Rollout(prompts=["Write about animals:"] * n, prompt_ids=[prompt] * n, completions=[""] * n,
                      completion_ids=completions, logprobs=[np.zeros(len(c), np.float32) for c in completions],
                      finish_reasons=["length"] * n, policy_version=version, gen_s=0.0)
    return ScoredRollout(rollout=rollout, scores=scores)


def _teardown(worker):
    worker.shutdown(destroy_process_group=False)


def test_logprobs_match_transformers(policy_path):
    from transformers import AutoModelForCausalLM

    worker = _worker(policy_path, zero_stage=2)
    try:
        prompt, completion = [1, 40, 41, 42], [50, 60, 70]
        got = worker.sequence_logprobs(prompt, completion)
        model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
        want = torch.log_softmax(logits, -1)[torch.arange(3, 6), torch.tensor(completion)].detach().numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
    finally:
        _teardown(worker)


@pytest.mark.parametrize("zero_stage, kl_mode, advantage, critic_trunk", [
    (2, "reward", "gae", "separate"), (3, "reward", "gae", "separate"), (2, "loss", "gae", "separate"),
    (3, "reward", "gae", "shared"),
    (2, "reward", "grpo", "separate"), (2, "reward", "rloo", "separate"), (3, "reward", "reinforce_pp", "separate"),
    (2, "loss", "reinforce_pp_baseline", "separate"),
])
def test_ppo_update_raises_rewarded_token_probability(policy_path, zero_stage, kl_mode, advantage, critic_trunk):
    rewarded = 77
    estimator = "k2" if kl_mode == "loss" else "k1"
    # Groups of 4 samples per prompt: half of each group carries the rewarded token (see _scored).
    worker = _worker(policy_path, zero_stage=zero_stage, lr=3e-3, ppo_epochs=4, kl_coef=0.01, kl_mode=kl_mode,
                     kl_estimator=estimator, advantage=advantage, group_size=4, critic_trunk=critic_trunk)
    # Critic-free estimators build no critic; a shared trunk carries its value head on the policy.
    assert (worker.critic is None) == (advantage != "gae" or critic_trunk == "shared")
    try:
        prompt = _scored(policy_path, rewarded).rollout.prompt_ids[0].tolist()
        before = worker.sequence_logprobs(prompt, [rewarded])[0]
        for step in range(3):
            # Fresh samples of each update's policy, as in synchronous mode.
            exp = worker.make_experience(_scored(policy_path, rewarded, seed=step, version=step))
            assert np.isfinite(exp.kl) and exp.response_len > 0
            stats = worker.train()
            assert np.isfinite(stats.policy_loss) and np.isfinite(stats.value_loss)
        after = worker.sequence_logprobs(prompt, [rewarded])[0]
        assert after > before + 0.5, (before, after)

        # The full weights a sync sends are the trained ones (gathered under ZeRO-3).
        specs = {s.name: s for s in worker.weight_specs()}
        full = dict(worker._full_parameters())
        assert set(full) == set(specs)
        for name, tensor in full.items():
            assert tuple(tensor.shape) == specs[name].shape, name
        assert full["lm_head.weight"].shape[0] > rewarded
    finally:
        _teardown(worker)


def test_saved_checkpoint_reloads_with_same_logprobs(policy_path, tmp_path):
    worker = _worker(policy_path, zero_stage=3, lr=1e-3)
    try:
        worker.make_experience(_scored(policy_path, 77))
        worker.train()
        prompt, completion = [1, 40, 41], [77, 78]
        want = worker.sequence_logprobs(prompt, completion)
        worker.save_hf(str(tmp_path / "ckpt"))
    finally:
        _teardown(worker)
    _assert_export_logprobs(tmp_path / "ckpt", prompt, completion, want)


def _assert_export_logprobs(folder, prompt: list[int], completion: list[int], want: np.ndarray) -> None:
    """The Hugging Face export in `folder` gives `want` as the logprobs of `completion` after `prompt`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    logits = model(torch.tensor([prompt + completion])).logits[0]
    at = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
    got = torch.log_softmax(logits, -1)[at, torch.tensor(completion)].detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_shared_trunk_critic_learns_values_and_stays_out_of_the_policy_weights(policy_path, tmp_path):
    """learner.critic_trunk=shared: no second trunk; the value head on the policy's trunk starts at
    zero, learns from the value loss, is checkpointed with the policy's engine, and is left out of
    what a sync sends and of the Hugging Face export."""
    worker = _worker(policy_path, zero_stage=2, lr=1e-4, critic_lr=1e-3, critic_trunk="shared")
    try:
        assert worker.critic is None
        head = [n for n, _ in worker.policy.module.named_parameters() if n.startswith("value_head.")]
        assert head == ["value_head.weight", "value_head.bias"]
        first = worker.make_experience(_scored(policy_path, 77))
        assert first.value_mean == 0.0  # a zero head
        stats = worker.train()
        assert stats.value_loss > 0
        second = worker.make_experience(_scored(policy_path, 77, seed=1, version=1))
        assert second.value_mean != 0.0 and abs(second.value_mean - second.return_mean) < abs(second.return_mean)
        worker.train()

        specs = {s.name for s in worker.weight_specs()}
        assert specs == set(dict(worker._full_parameters())) and not any(n.startswith("value_head.") for n in specs)
        prompt, completion = [1, 40, 41], [77, 78]
        want = worker.sequence_logprobs(prompt, completion)
        worker.save_hf(str(tmp_path / "hf"))
        worker.save_checkpoint(str(tmp_path / "ckpt"))
        values = worker.policy.module.value_head.weight.detach().clone()
    finally:
        _teardown(worker)
    _assert_export_logprobs(tmp_path / "hf", prompt, completion, want)
    restored = _worker(policy_path, zero_stage=2, lr=1e-4, critic_lr=1e-3, critic_trunk="shared")
    try:
        assert restored.load_checkpoint(str(tmp_path / "ckpt")) == 2
        torch.testing.assert_close(restored.policy.module.value_head.weight.detach(), values, rtol=0, atol=0)
    finally:
        _teardown(restored)


def test_samples_of_older_weights_are_weighted_towards_the_learners(policy_path):
    """After one update the learner is at version 1: a batch sampled at version 1 keeps the plain
    loss (weights 1), one sampled at version 0 gets min(pi_learner / pi_sampler, cap) per token.
    The fake sampler's logprobs are 0 (probability 1), so each weight is the learner's probability."""
    from learner.losses import behavior_weights

    worker = _worker(policy_path, zero_stage=2, lr=1e-3, behavior_weight_cap=2.0)
    try:
        worker.make_experience(_scored(policy_path, 77, n=8))
        worker.train()
        fresh = worker.make_experience(_scored(policy_path, 77, n=8, seed=1, version=1))
        assert fresh.behavior_weight_mean == 1.0 and not worker._stale
        worker._experience = None
        stale = worker.make_experience(_scored(policy_path, 77, n=8, seed=1, version=0))
        exp = worker._experience
        want = behavior_weights(exp.old_logprobs, exp.sample_logprobs, exp.tokens.mask, cap=2.0)
        assert worker._stale and torch.equal(exp.weights, want)
        assert 0.0 < stale.behavior_weight_mean < 0.1  # the tiny policy spreads its mass over ~1000 tokens
        assert np.isfinite(worker.train().policy_loss)
    finally:
        _teardown(worker)


def test_non_finite_scores_are_refused(policy_path):
    worker = _worker(policy_path, zero_stage=2)
    try:
        scored = _scored(policy_path, 77, n=8)
        scored.scores[3] = np.nan
        with pytest.raises(ValueError, match=r"scores of samples \[3\] are not finite"):
            worker.make_experience(scored)
    finally:
        _teardown(worker)


def test_k1_in_the_loss_is_refused(policy_path):
    with pytest.raises(ValueError, match="zero expected gradient"):
        _worker(policy_path, zero_stage=2, kl_mode="loss", kl_estimator="k1")


def _perturbed_policy(policy_path: str, out_dir, scale: float = 0.05) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(policy_path).save_pretrained(out_dir)
    return str(out_dir)


def _exact_kl(policy, ref, ids: torch.Tensor, prompt_len: int) -> float:
    """Mean over sequences of sum over completion positions of KL(policy || ref), from full distributions."""
    with torch.no_grad():
        logp = torch.log_softmax(policy(ids).logits[:, prompt_len - 1 : -1].float(), -1)
        logq = torch.log_softmax(ref(ids).logits[:, prompt_len - 1 : -1].float(), -1)
    return float((logp.exp() * (logp - logq)).sum(-1).sum(-1).mean())


def test_kl_as_a_loss_pulls_the_policy_back_to_the_reference(policy_path, tmp_path):
    """Flat (zero) reward, so the policy term has no gradient; KL in the loss (k2) alone must
    shrink the true KL(policy || reference), read from full distributions on fixed states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n, steps = 64, 10
    start = _perturbed_policy(policy_path, tmp_path / "start")
    ref = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(policy_path)
    prompt = tok("Write about animals in a calm way:", return_tensors="pt")["input_ids"]
    # One optimiser step per batch of fresh samples: k2's gradient is the KL's only in expectation
    # over on-policy samples, so several Adam steps on one small batch would chase its noise.
    worker = _worker(start, zero_stage=2, ref_path=policy_path, lr=1e-3, ppo_epochs=1, minibatch_size=n,
                     kl_mode="loss", kl_estimator="k2", kl_coef=1.0)
    policy = worker.policy.module
    try:
        kls = []
        held_out = None  # the KL is read on one fixed set of states, so steps compare like with like
        for step in range(steps):
            policy.eval()
            torch.manual_seed(step)
            ids = policy.generate(prompt.repeat(n, 1), do_sample=True, top_k=0, max_new_tokens=8,
                                  min_new_tokens=8, pad_token_id=tok.pad_token_id)
            held_out = ids if held_out is None else held_out
            kls.append(_exact_kl(policy, ref, held_out, prompt.shape[1]))
            completions = [row[prompt.shape[1]:].numpy().astype(np.int32) for row in ids]
            rollout = Rollout(prompts=["p"] * n, prompt_ids=[prompt[0].numpy().astype(np.int32)] * n,
                              completions=[""] * n, completion_ids=completions,
                              logprobs=[np.zeros(8, np.float32)] * n, finish_reasons=["length"] * n,
                              policy_version=step, gen_s=0.0)
            worker.make_experience(ScoredRollout(rollout=rollout, scores=np.zeros(n, np.float32)))
            stats = worker.train()
            assert stats.kl_loss > 0
        # Measured: 3.38 nats falling steadily to 1.04 over the 10 steps.
        assert kls[0] > 0.5, kls  # the perturbation is a real distance to start from
        assert kls[-1] < 0.6 * kls[steps // 2] and kls[-1] < 0.5 * kls[0], kls
    finally:
        _teardown(worker)

"""The DeepSpeed learner on the embedded tiny model, in this process (one rank).

Checks what a user relies on: experience tensors line up with the rollout, a PPO
update on a fixed reward signal moves the policy the right way, the learner's
logprobs equal transformers' for the same weights, and under ZeRO-3 the
gathered full weights (what a sync or a checkpoint sends) are the real ones.
"""

from __future__ import annotations

import glob
import os
import socket

import numpy as np
import pytest
import torch

from cluster.config import LearnerConfig
from cluster.records import Rollout, ScoredRollout

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def policy_path() -> str:
    from cluster.tiny_model import ensure_embedded_model

    return str(ensure_embedded_model("policy"))


def _worker(policy_path: str, zero_stage: int, dtype: str = "float32", **ppo):
    from learner.worker import LearnerSetup, LearnerWorker

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    setup = LearnerSetup(model_path=policy_path, rank=0, world_size=1, master_addr="127.0.0.1",
                         master_port=_free_port(), device="cpu", dtype=dtype, zero_stage=zero_stage, seed=0,
                         dist_timeout_s=120)
    return LearnerWorker(setup, LearnerConfig(minibatch_size=8, **ppo))


def _scored(policy_path: str, rewarded_token: int, n: int = 16, seed: int = 0) -> ScoredRollout:
    """Random completions; the score is the fraction of tokens equal to `rewarded_token`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_path)
    rng = np.random.default_rng(seed)
    prompt = np.asarray(tok("Write about animals:")["input_ids"], dtype=np.int32)
    completions = [rng.integers(5, tok.vocab_size, size=rng.integers(3, 9)).astype(np.int32) for _ in range(n)]
    for c in completions[: n // 2]:
        c[rng.random(len(c)) < 0.5] = rewarded_token
    scores = np.array([np.mean(c == rewarded_token) for c in completions], dtype=np.float32)
    rollout = Rollout(prompts=["Write about animals:"] * n, prompt_ids=[prompt] * n, completions=[""] * n,
                      completion_ids=completions, logprobs=[np.zeros(len(c), np.float32) for c in completions],
                      finish_reasons=["length"] * n, policy_version=0, gen_s=0.0)
    return ScoredRollout(rollout=rollout, scores=scores)


def _cleanup_shm():
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            os.remove(path)
        except OSError:
            pass


def _teardown(worker):
    worker.shutdown(destroy_process_group=False)
    _cleanup_shm()


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


@pytest.mark.parametrize("zero_stage, kl_mode", [(2, "reward"), (3, "reward"), (2, "loss")])
def test_ppo_update_raises_rewarded_token_probability(policy_path, zero_stage, kl_mode):
    rewarded = 77
    worker = _worker(policy_path, zero_stage=zero_stage, lr=3e-3, ppo_epochs=4, kl_coef=0.01, kl_mode=kl_mode)
    try:
        prompt = _scored(policy_path, rewarded).rollout.prompt_ids[0].tolist()
        before = worker.sequence_logprobs(prompt, [rewarded])[0]
        for step in range(3):
            exp = worker.make_experience(_scored(policy_path, rewarded, seed=step))
            assert np.isfinite(exp["kl"]) and exp["response_len"] > 0
            stats = worker.train()
            assert np.isfinite(stats["policy_loss"]) and np.isfinite(stats["value_loss"])
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
    from transformers import AutoModelForCausalLM

    worker = _worker(policy_path, zero_stage=3, lr=1e-3)
    try:
        worker.make_experience(_scored(policy_path, 77))
        worker.train()
        prompt, completion = [1, 40, 41], [77, 78]
        want = worker.sequence_logprobs(prompt, completion)
        worker.save_hf(str(tmp_path / "ckpt"))
    finally:
        _teardown(worker)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    logits = model(torch.tensor([prompt + completion])).logits[0]
    got = torch.log_softmax(logits, -1)[torch.arange(2, 4), torch.tensor(completion)].detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

"""The rollout actor on the embedded tiny policy, with a real in-process vLLM engine.

The engine runs in fp32 so its logprobs can be held to transformers' within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flywheel.records import PromptBatch
from flywheel.seeds import sample_seeds

MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def worker(model_path):
    from actors.rollout import RolloutWorker

    worker = RolloutWorker(
        model_path, actor_rank=3, dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0, kv_cache_gib=1
    )
    yield worker
    worker.shutdown()


def _batch(tokenizer, texts: list[str], seed: int | None = None, n: int = 1) -> PromptBatch:
    ids = [np.array(tokenizer(t)["input_ids"], dtype=np.int32) for t in texts]
    seeds = None if seed is None else sample_seeds(seed, step=0, num_prompts=len(texts), samples=n)
    return PromptBatch(prompts=texts, prompt_ids=ids, seeds=seeds)


def test_generate_returns_well_formed_rollouts(worker, tokenizer):
    batch = _batch(tokenizer, ["count to five:", "the quick brown fox", "hello"], seed=11, n=2)
    r = worker.generate(batch, max_new_tokens=10, temperature=1.0, top_p=0.95, n=2)

    assert len(r.completion_ids) == len(r.logprobs) == len(r.finish_reasons) == len(r.completions) == 6
    assert r.prompts == [p for p in batch.prompts for _ in range(2)]  # i*n + j is prompt i's j-th
    for k, (ids, lps, reason) in enumerate(zip(r.completion_ids, r.logprobs, r.finish_reasons)):
        np.testing.assert_array_equal(r.prompt_ids[k], batch.prompt_ids[k // 2])
        assert ids.dtype == np.int32 and lps.dtype == np.float32
        assert 1 <= len(ids) == len(lps) <= 10
        assert np.isfinite(lps).all() and (lps <= 0).all()
        # "length" exactly when the cap was hit without EOS; "stop" ends on EOS.
        assert reason == ("stop" if ids[-1] == tokenizer.eos_token_id else "length")
        assert reason == "stop" or len(ids) == 10
        assert r.completions[k] == tokenizer.decode(ids, skip_special_tokens=True)
    assert r.policy_version == 0 and r.actor_rank == 3 and r.gen_s > 0
    assert r.num_tokens == sum(len(c) for c in r.completion_ids)

    again = worker.generate(batch, max_new_tokens=10, temperature=1.0, top_p=0.95, n=2)
    assert [c.tolist() for c in again.completion_ids] == [c.tolist() for c in r.completion_ids]
    health = worker.health()
    assert health["policy_version"] == 0 and health["tokens_generated"] == 2 * r.num_tokens


def test_seeded_batch_samples_each_prompt_independently(worker, tokenizer):
    # A seed shared by every request would give identical samples for identical prompts.
    batch = _batch(tokenizer, ["the quick brown fox"] * 8, seed=3)
    r = worker.generate(batch, max_new_tokens=8, temperature=1.0, top_p=1.0)
    assert len({tuple(c.tolist()) for c in r.completion_ids}) == 8


def test_no_sample_repeats_another_across_prompts_samples_and_steps(worker, tokenizer):
    """Identical prompts, 4 samples each, over two steps: all 64 completions differ.

    Before per-sample seeds, vLLM derived the samples of a request from its
    seed, so request i's sample j replayed request i+1's sample j-1.
    """
    samples = []
    for step in range(2):
        batch = _batch(tokenizer, ["the quick brown fox"] * 8)
        batch.seeds = sample_seeds(0, step=step, num_prompts=8, samples=4)
        r = worker.generate(batch, max_new_tokens=8, temperature=1.0, top_p=1.0, n=4)
        samples += [tuple(c.tolist()) for c in r.completion_ids]
    assert len(samples) == 64 and len(set(samples)) == 64


def test_seeds_must_match_the_batch(worker, tokenizer):
    batch = _batch(tokenizer, ["a", "b"], seed=0, n=1)
    with pytest.raises(ValueError, match=r"seeds has shape \(2, 1\), expected \(2, 3\)"):
        worker.generate(batch, max_new_tokens=4, temperature=1.0, top_p=1.0, n=3)


def test_too_long_prompt_names_index_length_and_keys(worker):
    ok = np.arange(3, 3 + 100, dtype=np.int32)  # 100 + 28 = MAX_MODEL_LEN: fits exactly
    too_long = np.arange(3, 3 + 101, dtype=np.int32)
    batch = PromptBatch(prompts=["a", "b"], prompt_ids=[ok, too_long])
    with pytest.raises(ValueError) as info:
        worker.generate(batch, max_new_tokens=28, temperature=1.0, top_p=1.0)
    msg = str(info.value)
    for part in ("prompt 1 ", "101 tokens", "the 100 that fit", "model.max_model_len=128", "rollout.max_new_tokens=28"):
        assert part in msg, msg
    worker.generate(PromptBatch(prompts=["a"], prompt_ids=[ok]), max_new_tokens=28, temperature=1.0, top_p=1.0)


def test_score_sequence_logprobs_matches_transformers(worker, model_path):
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 1000, size=17).tolist()
    completion = rng.integers(3, 1000, size=9).tolist()
    got = worker.score_sequence_logprobs(prompt, completion)

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0]
    # logits at position t predict token t+1: completion token j is predicted at len(prompt)-1+j.
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    want = logp[torch.arange(len(completion)), torch.tensor(completion)].numpy()

    assert got.shape == (9,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.ptp(want) > 0.1  # distinct values: a misaligned position could not pass


def test_sampling_logprobs_match_scoring(worker, tokenizer):
    """At temperature 1 with no top-k / top-p, generate()'s logprobs are the model's own."""
    batch = _batch(tokenizer, ["one two three"], seed=5)
    r = worker.generate(batch, max_new_tokens=8, temperature=1.0, top_p=1.0)
    scored = worker.score_sequence_logprobs(batch.prompt_ids[0].tolist(), r.completion_ids[0].tolist())
    np.testing.assert_allclose(r.logprobs[0], scored, atol=1e-4)

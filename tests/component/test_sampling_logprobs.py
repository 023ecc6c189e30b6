"""The learner's `sampling_logprobs` against the real vLLM engine's logprobs.

With `logprobs_mode="processed_logprobs"` vLLM reports each sampled token's
logprob under the distribution it sampled from (temperature, top-k, top-p);
transformers' logits passed through `learner.sampling` must give the same
numbers, while the plain temperature-1 log-softmax (the learner before it knew
the sampling settings) must not. Prompt logprobs, which the driver's
weight-sync check compares to the learner's temperature-1 logprobs, must stay
raw. Both engines run in fp32 on the embedded tiny policy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flywheel.records import PromptBatch
from learner.sampling import sampling_logprobs

pytestmark = pytest.mark.timeout(600)

TEXTS = ["count to five:", "the quick brown fox", "hello", "once upon a time"]
N = 2


@pytest.fixture(scope="module")
def worker(model_path):
    from actors.rollout import RolloutWorker

    worker = RolloutWorker(model_path, dtype="float32", max_model_len=128, seed=0, kv_cache_gib=1)
    yield worker
    worker.shutdown()


@pytest.fixture(scope="module")
def model(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(model_path) -> PromptBatch:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return PromptBatch(
        prompts=TEXTS,
        prompt_ids=[np.array(tok(t)["input_ids"], dtype=np.int32) for t in TEXTS],
        seeds=np.arange(len(TEXTS) * N).reshape(len(TEXTS), N),
    )


@torch.no_grad()
def learner_logprobs(model, prompt_ids, completion_ids, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """(C,) logprobs of the completion recomputed from transformers' logits."""
    ids = torch.tensor(np.concatenate([prompt_ids, completion_ids]), dtype=torch.long)[None]
    logits = model(input_ids=ids).logits  # (1, P + C, V)
    p, c = len(prompt_ids), len(completion_ids)
    picked = logits[:, p - 1 : p + c - 1]  # logits[:, t] predicts token t + 1
    labels = ids[:, p : p + c]
    return sampling_logprobs(picked, labels, temperature, top_k, top_p)[0].numpy()


def abs_diffs(model, rollout, **sampling) -> np.ndarray:
    """|vLLM logprob - learner logprob| over every sampled token of the rollout."""
    return np.concatenate([
        np.abs(lps - learner_logprobs(model, p, c, **sampling))
        for p, c, lps in zip(rollout.prompt_ids, rollout.completion_ids, rollout.logprobs)
    ])


def test_learner_matches_vllm_processed_logprobs(worker, model, batch):
    settings = dict(temperature=0.7, top_k=50, top_p=0.9)
    rollout = worker.generate(batch, max_new_tokens=16, n=N, **settings)
    assert rollout.num_tokens >= 32
    fixed = abs_diffs(model, rollout, **settings)
    old = abs_diffs(model, rollout)  # the learner before: temperature 1, no top-k / top-p
    print(f"\nsampling logprobs |vLLM - learner| over {rollout.num_tokens} tokens: "
          f"with the settings mean {fixed.mean():.2e} max {fixed.max():.2e}; "
          f"at temperature 1 mean {old.mean():.2e} max {old.max():.2e}")
    assert fixed.mean() < 1e-4 and fixed.max() < 1e-3
    assert old.mean() > 1e-2  # the old learner is off by orders of magnitude more


def test_plain_sampling_needs_no_processing(worker, model, batch):
    rollout = worker.generate(batch, max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0, n=N)
    diffs = abs_diffs(model, rollout)
    print(f"\nplain sampling |vLLM - learner| mean {diffs.mean():.2e} max {diffs.max():.2e}")
    assert diffs.max() < 1e-4


def test_prompt_logprobs_stay_raw_in_processed_mode(worker, model, batch):
    # score_sequence_logprobs reads prompt logprobs, which vLLM computes as the model's
    # log-softmax (gpu_model_runner._get_prompt_logprobs_dict) whatever logprobs_mode says.
    prompt = batch.prompt_ids[1]
    completion = worker.generate(batch, max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=50, n=N).completion_ids[2]
    scored = worker.score_sequence_logprobs(prompt.tolist(), completion.tolist())
    raw = np.abs(scored - learner_logprobs(model, prompt, completion))
    processed = np.abs(scored - learner_logprobs(model, prompt, completion, 0.7, 50, 0.9))
    print(f"\nprompt logprobs |vLLM - learner|: raw max {raw.max():.2e}, processed mean {processed.mean():.2e}")
    assert raw.max() < 1e-4
    assert processed.mean() > 1e-2

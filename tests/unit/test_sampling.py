"""The learner applies vLLM's sampling steps to its logits, exactly as vLLM does."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import logprobs_from_logits
from learner.sampling import sampling_logits
from tests.helpers import close

INF = float("-inf")


def test_hand_worked_temperature_top_k_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    # Temperature 0.5 doubles the logits: [4, 2, 0, -2].
    close(sampling_logits(logits, temperature=0.5), [4.0, 2.0, 0.0, -2.0])
    # Top-k 2 keeps the two largest.
    assert sampling_logits(logits, top_k=2).tolist() == [2.0, 1.0, INF, INF]
    # Top-p 0.7: softmax([2, 1, 0, -1]) = (0.644, 0.237, 0.087, 0.032); ascending cumulative sums
    # 0.032, 0.119, 0.356, 1.0; entries with cumsum <= 1 - 0.7 = 0.3 go: the two smallest.
    assert sampling_logits(logits, top_p=0.7).tolist() == [2.0, 1.0, INF, INF]
    # Top-p 0.9: only cumsum <= 0.1 goes, the smallest: logprob of token 0 = 2 - log(e^2 + e + 1) = -0.4076.
    out = sampling_logits(logits, top_p=0.9)
    assert out.tolist()[3] == INF
    close(torch.log_softmax(out, -1)[0], 2 - math.log(math.e**2 + math.e + 1))


def test_identity_when_sampling_is_off():
    logits = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    out = sampling_logits(logits)
    assert out.dtype == torch.float32 and torch.equal(out, logits.float())


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 50, 1.0), (0.7, 0, 0.9), (1.3, 20, 0.8),
                                                       (0.5, 5, 0.5)])
@pytest.mark.parametrize("integer_logits", [False, True])
def test_matches_vllm(temperature, top_k, top_p, integer_logits):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=gen) * 3
    if integer_logits:  # ties at every boundary
        logits = logits.round()
    theirs = (logits / temperature).clone()
    k = torch.full((64,), top_k, dtype=torch.long) if top_k else None
    p = torch.full((64,), top_p) if top_p < 1 else None
    theirs = apply_top_k_top_p_pytorch(theirs, k, p)
    ours = sampling_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], atol=1e-6, rtol=0)


def test_gradients_reach_only_kept_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], requires_grad=True)
    labels = torch.tensor([0])
    lp = logprobs_from_logits(sampling_logits(logits, 0.5, top_k=2)[:, None, :], labels[:, None])
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 2:].tolist() == [0.0, 0.0] and logits.grad[0, :2].abs().min() > 0


def test_the_sampled_token_stays_in_the_support():
    # vLLM sampled token 3; the learner's rounding puts it outside top-k 2: it must stay, finite.
    logits = torch.tensor([2.0, 1.0, 0.0, 0.9999])
    out = sampling_logits(logits, top_k=2, keep=torch.tensor(3))
    assert out.tolist()[:3] == [2.0, 1.0, INF] and out[3] == logits[3]
    assert torch.isfinite(logprobs_from_logits(out[None, None], torch.tensor([[3]]))).all()

"""The learner applies vLLM's sampling steps to its logits, exactly as vLLM does."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import logprobs_from_logits
from learner.sampling import sampling_logits, sampling_logprobs
from tests.helpers import close

INF = float("-inf")
LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0])


def test_temperature_divides_before_the_masks():
    # Temperature 0.5 doubles the logits: [4, 2, 0, -2].
    close(sampling_logits(LOGITS, temperature=0.5), [4.0, 2.0, 0.0, -2.0])
    # softmax([4, 2, 0, -2]) = (54.60, 7.39, 1, 0.135) / 63.12 = (0.8650, 0.1171, 0.0158, 0.0021).
    # Top-p 0.9: ascending cumulative sums 0.0021, 0.0180, 0.1350, 1; those <= 0.1 go: tokens 3, 2.
    assert sampling_logits(LOGITS, 0.5, top_p=0.9).tolist() == [4.0, 2.0, INF, INF]
    # At temperature 1 the same nucleus is wider: softmax([2, 1, 0, -1]) = (0.6439, 0.2369,
    # 0.0871, 0.0321), cumulative 0.0321, 0.1192, ...; only token 3 (0.0321 <= 0.1) goes.
    assert sampling_logits(LOGITS, 1.0, top_p=0.9).tolist() == [2.0, 1.0, 0.0, INF]
    # Top-p 0.7 at temperature 0.5: cumulative 0.0021, 0.0180, 0.1350 are all <= 0.3,
    # so only the top token is left and its logprob is 0.
    out = sampling_logits(LOGITS, 0.5, top_p=0.7)
    assert out.tolist() == [4.0, INF, INF, INF]
    close(torch.log_softmax(out, -1)[0], 0.0)


def test_top_k_then_top_p():
    # Top-k 2 at temperature 0.5 keeps [4, 2]: logprob of token 0 = -log(1 + e^-2) = -0.1269.
    out = sampling_logits(LOGITS, 0.5, top_k=2)
    assert out.tolist() == [4.0, 2.0, INF, INF]
    close(torch.log_softmax(out, -1)[:2], [-math.log1p(math.exp(-2)), -math.log1p(math.exp(2))])
    # Top-k 3 renormalises before top-p looks: softmax([2, 1, 0]) = (0.6652, 0.2447, 0.0900),
    # and 0.0900 <= 1 - 0.9, so token 2 goes too (top-p alone kept it, see above).
    assert sampling_logits(LOGITS, 1.0, top_k=3, top_p=0.9).tolist() == [2.0, 1.0, INF, INF]


def test_boundary_rules():
    # Top-k keeps every logit equal to the k-th largest: k = 2 keeps all three 1s.
    assert sampling_logits(torch.tensor([1.0, 1.0, 1.0, 0.0]), top_k=2).tolist() == [1.0, 1.0, 1.0, INF]
    # Top-p drops a cumulative sum equal to 1 - p: four equal logits have exact sums
    # 0.25, 0.5, 0.75, 1; p = 0.75 drops one (0.25 <= 0.25), p = 0.5 drops two.
    flat = torch.zeros(4)
    assert torch.isfinite(sampling_logits(flat, top_p=0.75)).sum() == 3
    assert torch.isfinite(sampling_logits(flat, top_p=0.5)).sum() == 2
    # However small p is, the most likely token stays.
    assert sampling_logits(LOGITS, top_p=1e-6).tolist() == [2.0, INF, INF, INF]
    # top_k 0, negative or >= V disables top-k.
    for k in (0, -1, 4, 10):
        assert sampling_logits(LOGITS, top_k=k).tolist() == LOGITS.tolist()


def test_identity_when_sampling_is_off():
    logits = torch.randn(3, 5, 7)
    assert sampling_logits(logits) is logits  # no copy on the default path
    bf16 = logits.bfloat16()
    out = sampling_logits(bf16)
    assert out.dtype == torch.float32 and torch.equal(out, bf16.float())


def test_rejects_invalid_settings():
    with pytest.raises(ValueError, match="temperature"):
        sampling_logits(LOGITS, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling_logits(LOGITS, top_p=0.0)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.7, 0, 1.0), (1.0, 50, 1.0), (0.7, 0, 0.9), (0.7, 50, 0.9), (1.3, 20, 0.8), (0.5, 5, 0.5), (1.0, 999, 0.99)],
)
@pytest.mark.parametrize("integer_logits", [False, True])
@pytest.mark.parametrize("allow_cpu_sync", [True, False])  # True is the CPU engine's top-k-only path
def test_matches_vllm(temperature, top_k, top_p, integer_logits, allow_cpu_sync):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=gen) * 3
    if integer_logits:  # ties at every boundary
        logits = logits.round()
    # vLLM's Sampler divides by a per-row temperature in place, then masks in place.
    theirs = logits.clone().div_(torch.full((64, 1), temperature))
    k = torch.full((64,), top_k, dtype=torch.long) if top_k else None
    p = torch.full((64,), top_p) if top_p < 1 else None
    theirs = apply_top_k_top_p_pytorch(theirs, k, p, allow_cpu_sync=allow_cpu_sync)
    # Ours on (B, T, V) = (8, 8, 1000): the same rows, the learner's shape.
    ours = sampling_logits(logits.view(8, 8, 1000), temperature, top_k, top_p).view(64, 1000)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = torch.isfinite(theirs)
    assert 0 < finite.sum() < finite.numel() or (top_k == 0 and top_p == 1)
    torch.testing.assert_close(ours[finite], theirs[finite], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.log_softmax(-1)[finite], theirs.log_softmax(-1)[finite], atol=1e-6, rtol=0)


def test_gradients_hand_worked():
    # logprob of token 0 at temperature 0.5, top-k 2 = 2 l0 - log(e^(2 l0) + e^(2 l1)), p0 = 0.8808:
    # d/dl0 = 2 (1 - p0) = 0.2384, d/dl1 = -2 p1 = -0.2384, and exactly 0 on the masked l2, l3.
    logits = LOGITS.clone().view(1, 1, 4).requires_grad_()
    sampling_logprobs(logits, torch.tensor([[0]]), 0.5, top_k=2).sum().backward()
    p1 = 1 / (1 + math.exp(2))
    close(logits.grad.view(4), [2 * p1, -2 * p1, 0.0, 0.0])
    assert logits.grad.view(4)[2:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("top_k, top_p", [(50, 1.0), (0, 0.9), (20, 0.8)])
def test_gradients_are_finite_and_zero_exactly_on_masked_entries(top_k, top_p):
    gen = torch.Generator().manual_seed(1)
    # Scale 1 keeps several tokens in every nucleus (with one, the logprob is 0 and so is its gradient).
    logits = torch.randn(2, 3, 200, generator=gen).requires_grad_()
    labels = logits.detach().argmax(-1)  # always in the support
    out = sampling_logits(logits, 0.7, top_k, top_p)
    logprobs_from_logits(out, labels).sum().backward()
    masked = torch.isinf(out.detach())
    assert torch.isfinite(logits.grad).all() and masked.any()
    assert (logits.grad[masked] == 0).all() and (logits.grad[~masked] != 0).all()


def test_the_sampled_token_stays_in_the_support():
    # vLLM sampled token 3; the learner's rounding puts it outside top-k 2: it must stay, finite.
    logits = torch.tensor([2.0, 1.0, 0.0, 0.9999])
    out = sampling_logits(logits, top_k=2, keep=torch.tensor(3))
    assert out.tolist()[:3] == [2.0, 1.0, INF] and out[3] == logits[3]
    lp = sampling_logprobs(logits.view(1, 1, 4), torch.tensor([[3]]), top_k=2)
    close(lp, [[0.9999 - math.log(math.e**2 + math.e + math.e**0.9999)]])

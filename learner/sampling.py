"""The rollout actors' sampling distribution, applied to the learner's logits.

vLLM's sampler (vllm/v1/sample/sampler.py, ops/topk_topp_sampler.py in 0.32)
turns logits into the distribution it samples from in this order: float32,
divide by the temperature, keep the top-k logits, keep the top-p nucleus
(masked entries become -inf), softmax. With `logprobs_mode="processed_logprobs"`
the logprob it reports for a sampled token is taken from that distribution.
`sampling_logits` repeats those steps on the learner's side, so the PPO ratio,
the KL to the reference and the entropy are those of the policy that sampled.
Prompt logprobs (`prompt_logprobs=`) skip these steps in vLLM: they stay the
model's own log-softmax at temperature 1 whatever the logprobs mode.
Imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.losses import logprobs_from_logits


def sampling_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    keep: Tensor | None = None,
) -> Tensor:
    """(..., V) logits -> (..., V) float32 logits of the sampling distribution.

    Works on (N, V) and (B, T, V) alike. Top-k keeps every logit >= the k-th
    largest (ties at the boundary stay, as in vLLM); top_k 0 (or < 0, or >= V)
    disables it. Top-p sorts ascending and masks the entries whose cumulative
    probability is <= 1 - top_p, always keeping the largest; top_p 1 disables
    it. Masked entries are -inf. With everything off the result is
    `logits.float()`, the input itself when it is already float32.

    `keep` (...) int64 names one token per position that stays in the support
    whatever the masks say: the token vLLM actually sampled, which the
    learner's slightly different rounding (bf16, other kernels) can push just
    outside the nucleus, where its logprob would be -inf.

    Out of place, so gradients reach the kept logits (and are 0 on masked ones).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (vLLM treats ~0 as greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature  # float32 / float32(temperature), bit-equal to vLLM's div_
    scaled = logits
    vocab = logits.shape[-1]
    top_k = top_k if 0 < top_k < vocab else 0
    if top_p < 1.0:
        # As vLLM: sort once, mask top-k then top-p in sorted order, scatter back (ties
        # at a boundary fall the same way because the same sort orders them).
        ordered, order = logits.sort(dim=-1, descending=False)
        if top_k:
            kth = ordered[..., vocab - top_k : vocab - top_k + 1]
            ordered = ordered.masked_fill(ordered < kth, float("-inf"))
        # vLLM computes 1 - p in float32 (1 - 0.9f = 0.10000002, not 0.1f): same here,
        # or a cumulative sum landing between the two would fall the other way.
        threshold = 1.0 - torch.tensor(top_p, dtype=torch.float32)
        drop = ordered.detach().softmax(dim=-1).cumsum(dim=-1) <= threshold
        drop[..., -1] = False  # the most likely token always stays
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    elif top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if keep is not None and logits is not scaled:
        index = keep.long().unsqueeze(-1)
        logits = logits.scatter(-1, index, scaled.gather(-1, index))
    return logits


def sampling_logprobs(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> Tensor:
    """Logprobs (B, T) float32 of the sampled `labels` (B, T) under the sampling
    distribution of `logits` (B, T, V), already shifted so logits[:, t] produced
    labels[:, t]. The labels are kept in the support (see `keep` above)."""
    picked = sampling_logits(logits, temperature, top_k, top_p, keep=labels)
    return logprobs_from_logits(picked, labels)

"""Turning scored rollouts into padded training tensors, and reading per-token
log-probabilities and values out of a model for them.

Imports only torch, numpy and the shared records.  Layout: every row is
`prompt_i + completion_i`, padded on the right to L tokens.  Completion
token j of row i sits at sequence position P_i + j, so the logits (and the
critic's value) that predict it are read at position P_i + j - 1; `gather_index`
holds those positions, giving completion-aligned (B, T) tensors where
T = max C_i, the layout `learner.losses` and `learner.advantages` expect.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from flywheel.records import SamplingSettings, ScoredRollout
from learner.losses import entropy_from_logits, logprobs_from_logits
from learner.sampling import sampling_logits


@dataclass
class TokenBatch:
    """Padded sequences of one rank's share of a step."""

    input_ids: Tensor  # (B, L) int64, prompt + completion, right-padded with pad_id
    attention_mask: Tensor  # (B, L) int64, 1 on real tokens
    gather_index: Tensor  # (B, T) int64, position whose logits predict completion token j
    mask: Tensor  # (B, T) float32, 1 on real completion tokens
    completion_ids: Tensor  # (B, T) int64, the completion tokens, pad_id after C_i

    def select(self, rows: Tensor) -> "TokenBatch":
        return TokenBatch(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class Experience:
    """Everything PPO needs for one rank's share of a step; completion-aligned."""

    tokens: TokenBatch
    scores: Tensor  # (B,) reward-service score per sequence
    sample_logprobs: Tensor  # (B, T) vLLM's logprobs when sampling (diagnostic only)
    old_logprobs: Tensor  # (B, T) learner policy logprobs before this step's updates
    ref_logprobs: Tensor  # (B, T) frozen reference logprobs
    values: Tensor  # (B, T) critic values before this step's updates
    kl: Tensor  # (B, T) per-token KL(policy || reference) estimate
    advantages: Tensor  # (B, T)
    returns: Tensor  # (B, T)
    # (B, T) behaviour-policy correction of each token's policy-loss term: 1 for samples of the
    # learner's current weights, min(pi_old / pi_sampler, cap) for stale ones (asynchronous mode)
    weights: Tensor

    def select(self, rows: Tensor) -> "Experience":
        picked = {f.name: getattr(self, f.name)[rows] for f in fields(self) if f.name != "tokens"}
        return Experience(tokens=self.tokens.select(rows), **picked)


def pad_batch(prompt_ids: list[np.ndarray], completion_ids: list[np.ndarray], pad_id: int) -> TokenBatch:
    """Right-pad ragged prompt + completion sequences into a TokenBatch."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    b = len(prompt_ids)
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    t = max(len(c) for c in completion_ids)
    input_ids = torch.full((b, max(lengths)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, max(lengths)), dtype=torch.long)
    gather_index = torch.zeros((b, t), dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.float32)
    completions = torch.full((b, t), pad_id, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if len(p) == 0:
            raise ValueError(f"row {i} has an empty prompt; every sequence needs at least one prompt token")
        seq = np.concatenate([p, c])
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        gather_index[i, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        # Padding points at the last prompt position: a valid index whose value is masked away.
        gather_index[i, len(c) :] = len(p) - 1
        mask[i, : len(c)] = 1.0
        # torch.tensor copies: arrays from Ray's object store are read-only.
        completions[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return TokenBatch(input_ids, attention_mask, gather_index, mask, completions)


def ragged_to_padded(rows: list[np.ndarray], width: int) -> Tensor:
    """B float arrays of length <= width -> (B, width) float32, zero padded."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions 0..n-1 over real tokens; right padding keeps them contiguous."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def policy_forward(
    model: torch.nn.Module,
    tokens: TokenBatch,
    sampling: SamplingSettings | None = None,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-token logprobs (B, T) of the completion tokens, and optionally entropy (B, T).

    With `sampling`, both are of the distribution the rollout actors sampled
    from (temperature, top-k, top-p applied to the logits as vLLM does);
    without, of the model's own softmax.
    """
    logits = model(
        input_ids=tokens.input_ids,
        attention_mask=tokens.attention_mask,
        position_ids=position_ids(tokens.attention_mask),
        use_cache=False,
    ).logits
    index = tokens.gather_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    picked = torch.gather(logits, 1, index)  # (B, T, V): logits predicting each completion token
    if sampling is not None:
        picked = sampling_logits(picked, sampling.temperature, sampling.top_k, sampling.top_p,
                                 keep=tokens.completion_ids)
    logprobs = logprobs_from_logits(picked, tokens.completion_ids)
    entropy = entropy_from_logits(picked.float()) if with_entropy else None
    return logprobs, entropy


def policy_value_forward(
    model: torch.nn.Module,
    tokens: TokenBatch,
    sampling: SamplingSettings | None = None,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """`policy_forward` of a policy carrying its own value head (`learner.models.add_value_head`),
    plus the values (B, T) of the states before each completion token, from the same pass."""
    logprobs, entropy = policy_forward(model, tokens, sampling, with_entropy)
    values = getattr(model, "module", model).last_values  # a DeepSpeed engine wraps the model
    return logprobs, entropy, torch.gather(values, 1, tokens.gather_index).float()


def critic_forward(critic: torch.nn.Module, tokens: TokenBatch) -> Tensor:
    """Values (B, T) of the states before each completion token."""
    values = critic(
        input_ids=tokens.input_ids,
        attention_mask=tokens.attention_mask,
        position_ids=position_ids(tokens.attention_mask),
    )  # (B, L)
    return torch.gather(values, 1, tokens.gather_index).float()


def tokens_from_scored(scored: ScoredRollout, pad_id: int) -> tuple[TokenBatch, Tensor, Tensor]:
    """TokenBatch, scores (B,) and vLLM sampling logprobs (B, T) of a scored rollout."""
    r = scored.rollout
    tokens = pad_batch(r.prompt_ids, r.completion_ids, pad_id)
    sample_logprobs = ragged_to_padded(r.logprobs, tokens.mask.shape[1])
    return tokens, torch.tensor(scored.scores, dtype=torch.float32), sample_logprobs

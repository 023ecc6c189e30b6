"""Advantage estimators as pure tensor functions, registered by name.

Owns: the per-token reward (sequence score at the last token minus a KL
penalty at every token), GAE with a critic, and the critic-free estimators
GRPO, RLOO and REINFORCE++. Every estimator is reached the same way,
`compute_advantages(name, AdvantageInputs(...))`, one dict lookup at the edge
(verl's core_algos style); a new estimator is one function and one entry in
ADVANTAGE_ESTIMATORS.

Imports only torch. Tensors are padded on the right: row i holds a completion
of length C_i >= 1 at positions [0, C_i) and `mask` (B, T) marks them. Padding
may hold anything; outputs are 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from learner.losses import masked_whiten


class AdvantageOutput(NamedTuple):
    advantages: Tensor  # (B, T) 0 on padding
    returns: Tensor  # (B, T) target of a critic (return-to-go); 0 on padding


@dataclass
class AdvantageInputs:
    """Everything any estimator may need; each uses what it names in its docstring."""

    token_rewards: Tensor  # (B, T) reward per token, see token_level_rewards
    mask: Tensor  # (B, T) 1/True on real completion tokens
    values: Tensor | None = None  # (B, T) critic's V(s_t) before token t; GAE only
    group_index: Tensor | None = None  # (B,) int, which prompt each row answers; GRPO, RLOO
    gamma: float = 1.0  # discount per token; GAE and REINFORCE++
    lam: float = 0.95  # GAE lambda: 1 = Monte-Carlo returns, 0 = one-step TD
    eps: float = 1e-6  # added to the group std in GRPO

    def require(self, field: str, estimator: str) -> Tensor:
        value = getattr(self, field)
        if value is None:
            raise ValueError(
                f"advantage estimator {estimator!r} needs AdvantageInputs.{field}, got None; "
                f"pass it, or choose another of {sorted(ADVANTAGE_ESTIMATORS)}"
            )
        return value


def token_level_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token reward: -kl_coef * kl at every real token, plus the sequence
    score at the last real token (Ziegler et al., "Fine-Tuning Language Models
    from Human Preferences", 2019).

    scores: (B,), kl: (B, T) per-token KL estimate (losses.kl_penalty), mask: (B, T) -> (B, T)
    """
    real = mask.bool()
    lengths = real.sum(-1)
    if bool((lengths == 0).any()):
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(
            f"rows {empty} have no completion token to carry their score; "
            "drop empty completions before making experience"
        )
    rewards = torch.where(real, kl, 0.0) * -kl_coef
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards.index_put((rows, lengths - 1), scores.to(rewards.dtype), accumulate=True)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Return-to-go G_t = sum_{k >= t} gamma^(k - t) r_k within each row. (B, T) -> (B, T)"""
    rewards = torch.where(mask.bool(), rewards, 0.0)
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out.append(running)
    return torch.stack(out[::-1], dim=1)


# ---------------------------------------------------------------- GAE


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> AdvantageOutput:
    """Generalised Advantage Estimation (Schulman et al., "High-Dimensional
    Continuous Control Using Generalized Advantage Estimation", 2016).

    Vectorised over B, reverse loop over T. The state after the last real token
    is terminal (its value is 0), also for completions cut at max length, as is
    usual in RLHF. Returns raw advantages (whiten them in the trainer if wanted)
    and returns = advantages + values. All tensors (B, T).
    """
    real = mask.bool()
    # With right padding and padding zeroed, delta = 0 on padding and the
    # value after the last real token reads as 0: the terminal state.
    rewards = torch.where(real, rewards, 0.0)
    values = torch.where(real, values, 0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    running = torch.zeros_like(deltas[:, 0])
    out = []
    for t in reversed(range(deltas.shape[1])):
        running = deltas[:, t] + gamma * lam * running
        out.append(running)
    advantages = torch.where(real, torch.stack(out[::-1], dim=1), 0.0)
    return AdvantageOutput(advantages, torch.where(real, advantages + values, 0.0))


def gae_reference_loop(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> AdvantageOutput:
    """GAE written as the textbook per-row python loop; a check on `gae`, not for training."""
    advantages = torch.zeros_like(rewards)
    returns = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        length = int(mask[i].bool().sum())
        running = 0.0
        for t in reversed(range(length)):
            next_value = float(values[i, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[i, t]) + gamma * next_value - float(values[i, t])
            running = delta + gamma * lam * running
            advantages[i, t] = running
            returns[i, t] = running + float(values[i, t])
    return AdvantageOutput(advantages, returns)


# ---------------------------------------------------------------- critic-free


def _group_stats(scores: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: size, sum and unbiased std of its group's scores. (B,) -> 3 x (B,)"""
    if group_index.shape != scores.shape:
        raise ValueError(
            f"group_index must be (B,) = {tuple(scores.shape)}, one prompt id per row; "
            f"got {tuple(group_index.shape)}"
        )
    _, group = torch.unique(group_index, return_inverse=True)
    num_groups = int(group.max()) + 1
    size = torch.bincount(group, minlength=num_groups).to(scores.dtype)
    total = scores.new_zeros(num_groups).index_add_(0, group, scores)
    mean = total / size
    sq_dev = scores.new_zeros(num_groups).index_add_(0, group, (scores - mean[group]) ** 2)
    # Unbiased, as torch.std in verl and TRL; singleton groups get nan here and are handled by callers.
    std = torch.sqrt(sq_dev / (size - 1))
    return size[group], total[group], std[group]


def _sequence_scores(token_rewards: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), token_rewards, 0.0).sum(-1)


def grpo(token_rewards: Tensor, mask: Tensor, group_index: Tensor, eps: float = 1e-6) -> AdvantageOutput:
    """GRPO (Shao et al., "DeepSeekMath", 2024): the sequence reward (sum of
    token rewards) normalised within its prompt's group, (r - mean) / (std + eps),
    with the unbiased std, broadcast to every token. A group of one has no
    baseline: its advantage is its raw reward (as in verl). Returns are the
    undiscounted return-to-go. (B, T), (B, T), (B,) -> (B, T) x 2
    """
    scores = _sequence_scores(token_rewards, mask)
    size, total, std = _group_stats(scores, group_index)
    alone = size == 1
    mean = torch.where(alone, 0.0, total / size)
    std = torch.where(alone, 1.0, std)
    advantages = (scores - mean) / (std + eps)
    return _broadcast(advantages, token_rewards, mask)


def rloo(token_rewards: Tensor, mask: Tensor, group_index: Tensor) -> AdvantageOutput:
    """RLOO (Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs", 2024): the sequence
    reward minus the mean reward of the other completions of the same prompt,
    broadcast to every token. A group of one keeps its raw reward. Returns are
    the undiscounted return-to-go. (B, T), (B, T), (B,) -> (B, T) x 2
    """
    scores = _sequence_scores(token_rewards, mask)
    size, total, _ = _group_stats(scores, group_index)
    baseline = torch.where(size > 1, (total - scores) / (size - 1).clamp(min=1), 0.0)
    return _broadcast(scores - baseline, token_rewards, mask)


def _broadcast(seq_advantages: Tensor, token_rewards: Tensor, mask: Tensor) -> AdvantageOutput:
    real = mask.bool()
    advantages = torch.where(real, seq_advantages[:, None], 0.0)
    returns = torch.where(real, discounted_returns(token_rewards, mask, 1.0), 0.0)
    return AdvantageOutput(advantages, returns)


def grpo_reference_loop(token_rewards: Tensor, mask: Tensor, group_index: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO's per-row advantage (B,) written as plain loops over groups; a check on `grpo`."""
    scores = [float(token_rewards[i][mask[i].bool()].sum()) for i in range(len(group_index))]
    out = []
    for i, g in enumerate(group_index.tolist()):
        members = [scores[j] for j, h in enumerate(group_index.tolist()) if h == g]
        if len(members) == 1:
            out.append(scores[i])
            continue
        mean = sum(members) / len(members)
        std = (sum((x - mean) ** 2 for x in members) / (len(members) - 1)) ** 0.5
        out.append((scores[i] - mean) / (std + eps))
    return torch.tensor(out)


def rloo_reference_loop(token_rewards: Tensor, mask: Tensor, group_index: Tensor) -> Tensor:
    """RLOO's per-row advantage (B,) written as plain loops over groups; a check on `rloo`."""
    scores = [float(token_rewards[i][mask[i].bool()].sum()) for i in range(len(group_index))]
    out = []
    for i, g in enumerate(group_index.tolist()):
        others = [scores[j] for j, h in enumerate(group_index.tolist()) if h == g and j != i]
        out.append(scores[i] - (sum(others) / len(others) if others else 0.0))
    return torch.tensor(out)


def reinforce_pp(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> AdvantageOutput:
    """REINFORCE++ (Hu, "REINFORCE++: A Simple and Efficient Approach for
    Aligning Large Language Models", 2025): the discounted return-to-go of the
    token rewards, whitened over all real tokens of the batch. Returns are the
    return-to-go before whitening. (B, T), (B, T) -> (B, T) x 2
    """
    returns = torch.where(mask.bool(), discounted_returns(token_rewards, mask, gamma), 0.0)
    return AdvantageOutput(masked_whiten(returns, mask), returns)


def reinforce_pp_baseline(
    token_rewards: Tensor, mask: Tensor, group_index: Tensor, gamma: float = 1.0
) -> AdvantageOutput:
    """REINFORCE++ with a group baseline (Hu, 2025, the "REINFORCE++-baseline"
    variant): the mean sequence reward of the prompt's group is subtracted at
    each row's last token before the return-to-go is taken and whitened over
    the batch. It removes the prompt's difficulty from the signal, as GRPO does,
    without dividing by the group's std. (B, T), (B, T), (B,) -> (B, T) x 2
    """
    scores = _sequence_scores(token_rewards, mask)
    size, total, _ = _group_stats(scores, group_index)
    baseline = torch.where(size > 1, total / size, 0.0)
    real = mask.bool()
    rows = torch.arange(scores.shape[0], device=scores.device)
    shifted = torch.where(real, token_rewards, 0.0).index_put(
        (rows, real.sum(-1) - 1), -baseline.to(token_rewards.dtype), accumulate=True
    )
    return reinforce_pp(shifted, mask, gamma)


# ---------------------------------------------------------------- registry


def _gae_entry(x: AdvantageInputs) -> AdvantageOutput:
    return gae(x.token_rewards, x.require("values", "gae"), x.mask, x.gamma, x.lam)


def _grpo_entry(x: AdvantageInputs) -> AdvantageOutput:
    return grpo(x.token_rewards, x.mask, x.require("group_index", "grpo"), x.eps)


def _rloo_entry(x: AdvantageInputs) -> AdvantageOutput:
    return rloo(x.token_rewards, x.mask, x.require("group_index", "rloo"))


def _reinforce_pp_entry(x: AdvantageInputs) -> AdvantageOutput:
    return reinforce_pp(x.token_rewards, x.mask, x.gamma)


def _reinforce_pp_baseline_entry(x: AdvantageInputs) -> AdvantageOutput:
    return reinforce_pp_baseline(x.token_rewards, x.mask, x.require("group_index", "reinforce_pp_baseline"), x.gamma)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[AdvantageInputs], AdvantageOutput]] = {
    "gae": _gae_entry,
    "grpo": _grpo_entry,
    "rloo": _rloo_entry,
    "reinforce_pp": _reinforce_pp_entry,
    "reinforce_pp_baseline": _reinforce_pp_baseline_entry,
}


def compute_advantages(name: str, inputs: AdvantageInputs) -> AdvantageOutput:
    """Run the estimator registered under `name`. -> (advantages (B, T), returns (B, T))"""
    try:
        estimator = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}: valid names are {sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    return estimator(inputs)

"""Loss functions of RLHF as pure tensor math: masked reductions, KL estimators,
the PPO clipped policy and value losses, entropy and log-probabilities from
logits, the Bradley-Terry reward-model loss and the DPO loss.

Imports only torch, so loading it costs nothing beyond torch itself.

Conventions: a batch of completions is padded on the right. Row i holds a
completion of length C_i at positions [0, C_i); `mask` (B, T) is 1 (or True)
on real tokens and 0 on padding. Padding may hold any value, even inf or 1e9:
every function here selects real tokens with `torch.where` before computing,
so padding changes neither the result nor the gradients.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------- masked reductions


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over entries where `mask` is 1; over all dims if `dim` is None.

    x: (B, T) or any shape `mask` broadcasts to; mask: 0/1 float or bool.
    """
    # where, not multiply: 0 * inf in padding would be nan.
    x = torch.where(mask.bool(), x, 0.0)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over entries where `mask` is 1; 0 where nothing is masked in.

    An all-padding microbatch thus contributes a zero loss instead of nan.
    """
    count = mask.bool().expand_as(x).sum() if dim is None else mask.bool().expand_as(x).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and variance over masked entries only.

    The variance is the population one (divide by N), so the whitened masked
    entries have mean 0 and variance 1 exactly. With shift_mean=False the mean
    is added back (only the scale changes). Padding positions come out as 0.
    x, mask: (B, T) -> (B, T)
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


# ---------------------------------------------------------------- KL estimators
# Per-token estimators of KL(policy || reference) from tokens sampled by the
# policy, in the notation of J. Schulman, "Approximating KL Divergence" (2020):
# with log r = ref_logprobs - logprobs, k1 = -log r (unbiased, can be negative),
# k2 = (log r)^2 / 2 (biased, low variance), k3 = (r - 1) - log r (unbiased,
# never negative, low variance). All map (B, T), (B, T) -> (B, T).
#
# In the reward (kl_mode=reward) only the value matters, and k1 is unbiased.
# As a loss (kl_mode=loss) the gradient matters, taken on tokens the policy
# sampled: grad k1 = grad log pi has expectation 0, so k1 does nothing; grad k2
# = (log pi - log ref) grad log pi has expectation grad KL(pi || ref), the
# penalty we want; grad k3 = (1 - ref/pi) grad log pi has expectation
# grad KL(ref || pi), the reverse divergence (used by GRPO). The config
# therefore rejects k1 in the loss and points to k2
# (tests/unit/test_losses.py works the three out on a 3-token example).


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_r = ref_logprobs - logprobs
    return torch.exp(log_r) - log_r - 1.0


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL(policy || reference) estimate by the named estimator.

    logprobs, ref_logprobs: (B, T) log-probabilities of the sampled tokens
    under the sampling policy and the reference -> (B, T). Padding is not
    masked here; the caller masks (see advantages.token_level_rewards).
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}: valid names are {sorted(KL_ESTIMATORS)}"
        ) from None
    return fn(logprobs, ref_logprobs)


# ---------------------------------------------------------------- PPO


class PolicyLossOutput(NamedTuple):
    loss: Tensor  # () token-mean of the clipped surrogate over the mask; has grad
    clipfrac: Tensor  # () fraction of real tokens where the clipped term was chosen
    approx_kl: Tensor  # () token-mean k3 estimate of KL(old || new); a step-size check


def behavior_weights(proximal_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Per-token importance weights min(pi_prox / pi_behav, cap), detached; 0 on padding.

    For samples an older policy drew (asynchronous RL): the decoupled PPO objective of
    Hilton, Cobbe and Schulman, "Batch size-invariance for policy optimization" (2022),
    clips the ratio against the proximal policy (the learner's weights when the step's
    experience is made) and corrects for the behaviour policy (the weights that sampled)
    with this ratio, as AReaL (Fu et al., 2025) does for LLM rollouts a bounded number of
    versions stale. The weight is truncated at `cap` (as IMPALA's V-trace truncates its
    importance weights, Espeholt et al., 2018), so a token the old policy found unlikely
    cannot dominate the update. Inputs (B, T).
    """
    real = mask.bool()
    log_w = torch.where(real, proximal_logprobs - behavior_logprobs, 0.0)
    return torch.where(real, torch.clamp(torch.exp(log_w), max=cap), 0.0).detach()


def policy_loss_clipped(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    weights: Tensor | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate, -min(r A, clip(r, 1 - eps, 1 + eps_high) A), token-mean.

    r = exp(logprobs - old_logprobs). Schulman et al., "Proximal Policy
    Optimization Algorithms" (2017); a separate `clip_eps_high` is the
    "clip-higher" of DAPO (Yu et al., 2025), default the same as `clip_eps`.
    `weights` (B, T), when given, multiply each token's term: the behaviour-policy
    correction of `behavior_weights` for stale samples (the mean still divides by
    the real tokens, so weights of 1 give the plain loss).
    approx_kl is k3 of KL(old || new) on the sampled tokens, detached.
    All inputs (B, T); only `logprobs` needs grad.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    real = mask.bool()
    # Zero the log-ratio on padding before exp: exp(garbage) = inf would make
    # the gradient nan even where the value is masked away. Garbage advantages
    # need no masking: their gradient path to logprobs runs through this where().
    log_ratio = torch.where(real, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token if weights is None else weights * per_token, mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        # k3 with the old policy as the sampler: KL(old || new).
        approx_kl = masked_mean(kl_k3(old_logprobs.detach(), logprobs.detach()), mask)
    return PolicyLossOutput(loss, clipfrac, approx_kl)


class ValueLossOutput(NamedTuple):
    loss: Tensor  # () has grad
    clipfrac: Tensor  # () fraction of real tokens where the clipped error was larger


def value_loss_clipped(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None,
) -> ValueLossOutput:
    """0.5 * max((v - R)^2, (old_v + clip(v - old_v, -eps, eps) - R)^2), token-mean.

    The clipped value loss of PPO as in OpenAI baselines ppo2; clip_eps=None
    gives the plain 0.5 * (v - R)^2. All inputs (B, T); only `values` needs grad.
    """
    # Garbage on padding would give nan gradients through (v - R)^2; cutting
    # the path at `values` is enough, as old_values and returns carry no grad.
    values = torch.where(mask.bool(), values, 0.0)
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return ValueLossOutput(0.5 * masked_mean(unclipped, mask), unclipped.new_zeros(()))
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return ValueLossOutput(loss, clipfrac)


# ---------------------------------------------------------------- from logits


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position, in fp32. (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    # A -inf logit gives p = 0 and logp = -inf; clamping makes 0 * (-inf) a 0, not nan.
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels], computed in fp32 even when logits are bf16.

    logits: (B, T, V) where logits[:, t] is the distribution that produced
    labels[:, t] (shift by one before calling); labels: (B, T) int64, valid ids
    everywhere (use the pad id on padding, not -100). Returns (B, T) float32.
    """
    logits = logits.float()
    # gather - logsumexp avoids materialising a second (B, T, V) log_softmax tensor.
    picked = torch.gather(logits, -1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


# ---------------------------------------------------------------- preference losses


class BradleyTerryOutput(NamedTuple):
    loss: Tensor  # () mean over pairs; has grad
    accuracy: Tensor  # () fraction of pairs with chosen > rejected (ties count as wrong)


def bradley_terry_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Tensor | float | None = None,
    weights: Tensor | None = None,
) -> BradleyTerryOutput:
    """Reward-model loss -log sigmoid(r_chosen - r_rejected - margin), mean over pairs.

    Bradley & Terry (1952) as used by Ouyang et al., "Training language models
    to follow instructions with human feedback" (2022); the optional margin is
    Llama 2's (Touvron et al., 2023). Scores (B,), margin a float or (B,).
    `weights` (B,) make it a weighted mean: the pairs expanded from one ranking
    of K completions share weight 1, as InstructGPT weighs each prompt once.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    loss = losses.mean() if weights is None else (weights * losses).sum() / weights.sum()
    with torch.no_grad():
        accuracy = (chosen_scores > rejected_scores).float().mean()
    return BradleyTerryOutput(loss, accuracy)


class DPOOutput(NamedTuple):
    loss: Tensor  # () mean over pairs; has grad
    chosen_rewards: Tensor  # (B,) beta * (policy - ref) logp of chosen, detached
    rejected_rewards: Tensor  # (B,) beta * (policy - ref) logp of rejected, detached


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """DPO loss of Rafailov et al., "Direct Preference Optimization" (2023).

    Inputs are sequence log-probabilities summed over completion tokens, (B,)
    (e.g. masked_sum(logprobs, mask, dim=-1)). label_smoothing > 0 is the
    conservative DPO of Mitchell (2023): the label is wrong with that probability.
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen - rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return DPOOutput(losses.mean(), beta * chosen.detach(), beta * rejected.detach())


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> DPOOutput:
    """IPO loss of Azar et al., "A General Theoretical Paradigm to Understand
    Learning from Human Preferences" (2023): (h - 1 / (2 beta))^2 with
    h = (policy - ref) logp of chosen minus that of rejected. Unlike DPO's
    sigmoid it does not keep pushing h once the pair is separated by 1 / (2 beta),
    which curbs overfitting to deterministic preferences. Inputs (B,) are
    completion logprobs averaged over tokens, as in TRL's IPO: with sums, h
    spreads with completion length and the squared loss chases the long pairs.
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return DPOOutput(losses.mean(), beta * chosen.detach(), beta * rejected.detach())


# The preference losses trained on pairs directly, chosen by `dpo.loss`, and whether each
# takes completion logprobs averaged over tokens (True) or summed (False).
PREFERENCE_LOSSES: dict[str, Callable[..., DPOOutput]] = {"dpo": dpo_loss, "ipo": ipo_loss}
AVERAGED_LOGPS: dict[str, bool] = {"dpo": False, "ipo": True}

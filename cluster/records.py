"""Record types that cross a process boundary.

Every package may import this module; it imports only the standard library and
numpy, so a Ray worker, the reward service and a unit test can all load it in
milliseconds.  Token sequences have ragged lengths, so they travel as lists of
numpy arrays (Ray returns numpy zero-copy from its object store).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PromptBatch:
    """Prompts handed to the rollout actors for one step."""

    prompts: list[str]  # (B,) prompt text, as the reward service will see it
    prompt_ids: list[np.ndarray]  # B arrays of int32 (P_i,), tokenised prompts
    index: np.ndarray | None = None  # (B,) row of each prompt in its dataset


@dataclass
class Rollout:
    """What one rollout actor returns for a batch of prompts."""

    prompts: list[str]  # (B,)
    prompt_ids: list[np.ndarray]  # B arrays of int32 (P_i,)
    completions: list[str]  # (B,) decoded completion text
    completion_ids: list[np.ndarray]  # B arrays of int32 (C_i,)
    logprobs: list[np.ndarray]  # B arrays of float32 (C_i,), sampling logprobs
    finish_reasons: list[str]  # (B,) "stop" (EOS) or "length"
    policy_version: int  # version of the weights that generated every sequence
    gen_s: float  # wall time of the generate call in the actor
    actor_rank: int = 0  # which rollout actor produced it

    @property
    def num_tokens(self) -> int:
        return int(sum(len(c) for c in self.completion_ids))

    @staticmethod
    def concat(parts: list["Rollout"]) -> "Rollout":
        """Join the rollouts of several actors, in the order given."""
        versions = {p.policy_version for p in parts}
        if len(versions) != 1:
            raise ValueError(f"rollouts mix policy versions {sorted(versions)}")
        return Rollout(
            prompts=[s for p in parts for s in p.prompts],
            prompt_ids=[s for p in parts for s in p.prompt_ids],
            completions=[s for p in parts for s in p.completions],
            completion_ids=[s for p in parts for s in p.completion_ids],
            logprobs=[s for p in parts for s in p.logprobs],
            finish_reasons=[s for p in parts for s in p.finish_reasons],
            policy_version=parts[0].policy_version,
            gen_s=max(p.gen_s for p in parts),
            actor_rank=-1,
        )


@dataclass
class ScoredRollout:
    """A rollout with one scalar reward per sequence from the reward service."""

    rollout: Rollout
    scores: np.ndarray  # (B,) float32 reward-service scores
    score_s: float = 0.0  # wall time of the scoring call


@dataclass
class TrainStats:
    """Scalars from one learner update, averaged over its minibatches."""

    policy_loss: float
    value_loss: float
    kl: float  # mean per-sequence KL(policy || reference), summed over tokens
    entropy: float
    clipfrac: float
    approx_kl: float  # mean KL(old policy || new policy), a step-size check
    grad_norm: float
    reward_mean: float  # mean total reward (score - KL penalty if in reward)
    advantage_mean: float
    return_mean: float
    value_mean: float
    make_experience_s: float
    train_s: float
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class WeightSpec:
    """Name, dtype and shape of one tensor in a weight update."""

    name: str  # Hugging Face parameter name, e.g. "model.layers.0.mlp.up_proj.weight"
    dtype: str  # torch dtype name without the prefix, e.g. "bfloat16"
    shape: tuple[int, ...]


@dataclass
class WeightSyncMeta:
    """Announces one versioned weight update to the rollout actors.

    The tensors themselves follow over the weight-transfer process group, in
    the order of `specs`, packed into flat buckets of at most `bucket_bytes`.
    """

    version: int  # policy version the actors report after applying it
    specs: list[WeightSpec]
    bucket_bytes: int

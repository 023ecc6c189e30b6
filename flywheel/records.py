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
    seeds: np.ndarray | None = None  # (B, n) int64, one sampling seed per prompt and sample

    def __len__(self) -> int:
        return len(self.prompts)

    def split(self, parts: int) -> list["PromptBatch"]:
        """`parts` consecutive slices whose sizes differ by at most one, the larger
        first (10 over 3: 4, 3, 3); none is cut off."""
        sizes = [len(self) // parts + (i < len(self) % parts) for i in range(parts)]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return [
            PromptBatch(
                prompts=self.prompts[a:b],
                prompt_ids=self.prompt_ids[a:b],
                seeds=None if self.seeds is None else self.seeds[a:b],
            )
            for a, b in zip(bounds[:-1], bounds[1:])
        ]


@dataclass(frozen=True)
class SamplingSettings:
    """How the rollout actors sample; the learner applies the same to its logits,
    so that its logprobs are those of the distribution vLLM sampled from."""

    temperature: float = 1.0
    top_p: float = 1.0  # nucleus mass; 1 disables
    top_k: int = 0  # keep the k most likely tokens; 0 disables


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
    actor_tokens_per_s: list[float] = field(default_factory=list)  # (A,) per contributing actor, set by concat
    actor_restarts: int = 0  # rollout actors that died while generating it and were replaced (set by the driver)

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
            # Each actor's own pace (its tokens over its own generate time), in the order given.
            actor_tokens_per_s=[p.num_tokens / max(p.gen_s, 1e-9) for p in parts],
        )


@dataclass
class ScoredRollout:
    """A rollout with one scalar reward per sequence from the reward service."""

    rollout: Rollout
    scores: np.ndarray  # (B,) float32 reward-service scores
    score_s: float = 0.0  # wall time of the scoring call
    failed_attempts: int = 0  # HTTP attempts that failed (connection error, timeout, 5xx) and were retried
    restarts: int = 0  # times the run's own reward service exited and was started again while scoring


@dataclass
class ExperienceStats:
    """Scalars from making one step's experience, over the whole step's batch."""

    kl: float  # mean per-sequence KL(policy || reference) estimate, summed over tokens
    kl_coef: float  # the KL coefficient this step used (adapted between steps when learner.kl_target is set)
    reward_mean: float  # mean total reward per sequence (score minus the KL penalty if in the reward)
    score_mean: float  # mean reward-service score
    advantage_mean: float  # token mean of the advantages before whitening
    return_mean: float  # token mean of the returns
    value_mean: float  # token mean of the critic's values
    sample_logprob_diff: float  # token mean |vLLM sampling logprob - learner logprob|
    behavior_weight_mean: float  # token mean of the stale-sample correction (1 when the samples are fresh)
    behavior_weight_capped: float  # share of tokens whose correction hit learner.behavior_weight_cap
    response_len: float  # mean completion length in tokens
    make_experience_s: float


@dataclass
class TrainStats:
    """Scalars from one step's PPO update, averaged over its minibatches and ranks."""

    policy_loss: float
    value_loss: float
    value_clipfrac: float  # fraction of tokens where the clipped value error was larger
    entropy: float  # token mean entropy of the sampling distribution
    clipfrac: float  # fraction of tokens where the clipped ratio was chosen
    approx_kl: float  # token mean KL(old policy || new policy), a step-size check
    kl_loss: float  # the KL term of the loss (0 unless learner.kl_mode is loss)
    grad_norm: float
    train_s: float


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

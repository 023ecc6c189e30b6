"""The learner's settings: the PPO hyperparameters every learner rank reads.

Declared here, beside the code that reads them, and composed by
`cluster/config.py` into the run config (section `learner:`), which loads and
validates them. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flywheel.settings import setting


@dataclass
class LearnerConfig:
    world_size: int = setting(1, "DeepSpeed ranks, one Ray actor each", min=1)
    num_cpus_per_rank: float = setting(1.0, "Ray CPUs reserved per learner rank", gt=0)
    num_threads: int | None = setting(None, "torch threads per learner rank; null follows num_cpus_per_rank", min=1)
    zero_stage: int = setting(2, "DeepSpeed ZeRO stage", min=0, max=3)
    allocator: Literal["auto", "jemalloc", "system"] = setting(
        "auto", "memory allocator of the learner processes: jemalloc (Ray's) keeps the pages it frees, so each "
        "training step reuses its buffers' pages instead of faulting them in again; auto is jemalloc on CPU runs "
        "unless LD_PRELOAD is already set, system is the C library's (flywheel/allocator.py)")
    lr: float = setting(1e-4, "policy learning rate (AdamW)", gt=0)
    critic_lr: float = setting(2e-4, "critic learning rate (AdamW); with critic_trunk=shared, the value head's", gt=0)
    critic_trunk: Literal["separate", "shared"] = setting(
        "separate", "the critic's transformer trunk (gae only): separate is a second trunk initialised from the "
        "policy, with its own optimiser; shared puts the value head on the policy's own trunk, trained by one "
        "loss (policy + value_coef x value), so no second trunk, its gradients or AdamW states are held; "
        "scale the value loss down there (value_coef about 0.1, as TRL's value-head PPO did)")
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0)
    ppo_epochs: int = setting(2, "passes over each step's experience", min=1)
    minibatch_size: int = setting(32, "sequences per optimiser step (across all ranks)", min=1)
    clip_eps: float = setting(0.2, "PPO ratio clip", gt=0)
    behavior_weight_cap: float = setting(
        2.0, "truncation of the per-token weight pi_learner / pi_sampler that corrects samples drawn by older "
        "weights (rollout.max_staleness > 0); decoupled PPO, Hilton et al. 2022", gt=0)
    value_clip_eps: float | None = setting(0.2, "value clip around old values; null disables", gt=0)
    value_coef: float = setting(1.0, "scale of the value loss", min=0)
    gamma: float = setting(1.0, "discount", min=0, max=1)
    lam: float = setting(0.95, "GAE lambda", min=0, max=1)
    kl_coef: float = setting(0.05, "weight of the KL(policy || reference) penalty (the start value when kl_target is set)", min=0)
    kl_target: float | None = setting(
        None, "KL per sequence (nats) the adaptive controller of Ziegler et al. (2019) steers kl_coef towards; "
        "null keeps kl_coef fixed", gt=0)
    kl_horizon: int = setting(10_000, "samples over which the adaptive controller makes a full 20% correction", min=1)
    kl_estimator: Literal["k1", "k2", "k3"] = setting("k1", "per-token KL estimator")
    kl_mode: Literal["reward", "loss"] = setting("reward", "KL penalty subtracted from the reward, or added to the policy loss")
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = setting(
        "gae", "advantage estimator: gae (with a critic), or the critic-free grpo, rloo, reinforce_pp, "
        "reinforce_pp_baseline (no critic is built)")
    whiten_advantages: bool = setting(
        True, "normalise gae and rloo advantages over the whole batch (grpo and reinforce_pp normalise their own)")
    max_grad_norm: float = setting(1.0, "gradient clipping norm", gt=0)
    critic_warmup_steps: int = setting(0, "steps that train only the critic", min=0)


# Estimators that read a critic's values; for the others no critic is built or trained.
NEEDS_CRITIC = frozenset({"gae"})
# Estimators whose baseline is the other samples of the same prompt (rollout.samples_per_prompt >= 2).
NEEDS_GROUPS = frozenset({"grpo", "rloo", "reinforce_pp_baseline"})
# Estimators that already normalise their output; whiten_advantages applies to the others.
SELF_NORMALISING = frozenset({"grpo", "reinforce_pp", "reinforce_pp_baseline"})

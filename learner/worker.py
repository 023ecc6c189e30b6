"""One learner rank: the policy and critic under DeepSpeed, the frozen reference,
PPO's experience making and updates, HF checkpoints, and sending weights.

`LearnerWorker` is a plain class; `cluster/` places one Ray actor per rank.
All ranks join one torch.distributed group through `deepspeed.init_distributed`
(gloo on CPU, NCCL on GPU). Every rank receives the whole step's rollout, runs
the forward passes for its own equal share of the rows, and gathers the rest
(`learner.distributed`), so advantages are whitened over the whole batch and
every rank sees the same numbers. Training cuts the same global minibatches on
every rank (same permutation), each rank takes its equal slice of each, and
losses are scaled so that DeepSpeed's gradient average is the token mean over
the global minibatch: the update does not depend on the number of ranks.
Calls that touch ZeRO-3 parameters (forward passes, gathering weights for a
sync or a checkpoint) run on every rank in lockstep: under stage 3 each
parameter is partitioned and a gather is a collective. Rank 0 alone also joins
the weight-transfer group with the rollout actors and sends.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from typing import Iterator

import numpy as np
import torch

from flywheel.records import ExperienceStats, ScoredRollout, TrainStats, WeightSpec, WeightSyncMeta
from learner.advantages import AdvantageInputs, compute_advantages, token_level_rewards
from learner.config import NEEDS_CRITIC, SELF_NORMALISING, LearnerConfig
from learner.distributed import all_gather_rows, all_reduce_mean
from learner.engine import (
    LearnerSetup, full_parameters, join_group, leave_group, load_engine, make_engine, make_frozen, pad_token_id,
    restore_rng_states, rng_states, save_engine, save_hf,
)
from learner.kl_control import KLController
from learner.experience import (
    Experience, TokenBatch, critic_forward, pad_batch, policy_forward, policy_value_forward, tokens_from_scored,
)
from learner.losses import (
    behavior_weights, kl_penalty, masked_mean, masked_sum, masked_whiten, policy_loss_clipped, value_loss_clipped,
)
from learner.models import VALUE_HEAD, Critic, add_value_head, is_value_head, load_causal_lm

log = logging.getLogger("flywheel.learner")


class LearnerWorker:
    def __init__(self, setup: LearnerSetup, ppo: LearnerConfig):
        if ppo.kl_mode == "loss" and ppo.kl_estimator == "k1":
            raise ValueError(
                "learner.kl_estimator=k1 with learner.kl_mode=loss has zero expected gradient on the "
                "policy's own samples, so the KL term would do nothing; use k2 (its gradient is the KL's)"
            )
        # With a critic on the policy's own trunk, one loss trains both (see _train_minibatch).
        self.shared_critic = ppo.advantage in NEEDS_CRITIC and ppo.critic_trunk == "shared"
        if self.shared_critic and ppo.critic_warmup_steps:
            raise ValueError(
                "learner.critic_warmup_steps must be 0 with learner.critic_trunk=shared: the value loss "
                "trains the policy's own trunk, so warm-up steps would change the policy"
            )
        self.setup = setup
        self.ppo = ppo
        self.rank = setup.rank
        self.step = 0
        self.device = join_group(setup)
        self.pad_id = pad_token_id(setup.model_path)

        mb_per_rank = ppo.minibatch_size // setup.world_size
        policy = load_causal_lm(setup.model_path, "float32")
        if self.shared_critic:
            add_value_head(policy)
        self.policy = self._engine(policy, ppo.lr, mb_per_rank,
                                   {VALUE_HEAD + ".": ppo.critic_lr} if self.shared_critic else None)
        # Critic-free estimators (GRPO, RLOO, REINFORCE++) and a shared trunk need no second trunk at all.
        self.critic = (self._engine(Critic(setup.model_path, "float32"), ppo.critic_lr, mb_per_rank)
                       if ppo.advantage in NEEDS_CRITIC and not self.shared_critic else None)
        self.kl = KLController(coef=ppo.kl_coef, target=ppo.kl_target, horizon=ppo.kl_horizon)
        self.ref = make_frozen(load_causal_lm(self.reference_model(), setup.dtype), setup, self.device, mb_per_rank)
        self._experience: Experience | None = None
        self._stale = False  # whether this step's samples came from older weights than the learner's
        self._sender = None
        log.info("learner rank %d ready (ZeRO-%d, %s)", setup.rank, setup.zero_stage, setup.dtype)

    # ---------------------------------------------------------------- set-up

    def _engine(self, model: torch.nn.Module, lr: float, micro_batch: int, lr_by_prefix: dict | None = None):
        return make_engine(model, self.setup, lr, self.ppo.weight_decay, micro_batch, self.ppo.max_grad_norm,
                           lr_by_prefix=lr_by_prefix)

    def _policy_pass(self, tokens: TokenBatch, with_entropy: bool = False):
        """Logprobs, entropy (or None) and, with a shared trunk, values (else None) of one policy forward."""
        if self.shared_critic:
            return policy_value_forward(self.policy, tokens, self.setup.sampling, with_entropy)
        return (*policy_forward(self.policy, tokens, self.setup.sampling, with_entropy), None)

    def _value_loss(self, values: torch.Tensor, mb: Experience, scale: float, out: dict[str, float]) -> torch.Tensor:
        """value_coef x the clipped value loss of a minibatch; its stats go into `out` as scaled shares."""
        vl = value_loss_clipped(values, mb.values, mb.returns, mb.tokens.mask, self.ppo.value_clip_eps)
        out.update(value_loss=scale * vl.loss.item(), value_clipfrac=scale * vl.clipfrac.item())
        return self.ppo.value_coef * vl.loss

    # ---------------------------------------------------------------- experience

    def _my_rows(self, n: int) -> torch.Tensor:
        """This rank's equal share of n rows (consecutive, in rank order)."""
        w = self.setup.world_size
        if n % w:
            raise ValueError(
                f"a step of {n} sequences does not divide over {w} learner ranks; make "
                "data.prompts_per_step x rollout.samples_per_prompt a multiple of learner.world_size"
            )
        share = n // w
        return torch.arange(self.rank * share, (self.rank + 1) * share)

    def _chunks(self, tokens: TokenBatch) -> Iterator[TokenBatch]:
        n = tokens.input_ids.shape[0]
        size = max(1, self.ppo.minibatch_size // self.setup.world_size)
        for start in range(0, n, size):
            yield tokens.select(torch.arange(start, min(n, start + size)))

    @torch.no_grad()
    def make_experience(self, scored: ScoredRollout) -> ExperienceStats:
        """Reference logprobs, values, KL and advantages of the whole step; kept for train().

        Every rank gets the whole step's rollout and runs the forward passes for
        its own rows; the gathered result is identical on every rank.
        """
        t0 = time.perf_counter()
        tokens, scores, sample_logprobs = tokens_from_scored(scored, self.pad_id)
        if not torch.isfinite(scores).all():
            bad = torch.nonzero(~torch.isfinite(scores)).flatten().tolist()
            raise ValueError(f"scores of samples {bad[:10]} are not finite; the learner refuses to train on them")
        tokens = tokens.to(self.device)
        mine = tokens.select(self._my_rows(tokens.input_ids.shape[0]).to(self.device))
        sampling = self.setup.sampling
        old, ref, values = [], [], []
        for chunk in self._chunks(mine):
            logprobs, _, chunk_values = self._policy_pass(chunk)
            if chunk_values is None:
                chunk_values = critic_forward(self.critic, chunk) if self.critic else torch.zeros_like(logprobs)
            old.append(logprobs)
            ref.append(policy_forward(self.ref, chunk, sampling)[0])
            values.append(chunk_values)
        old_logprobs = all_gather_rows(torch.cat(old), self.device)
        ref_logprobs = all_gather_rows(torch.cat(ref), self.device)
        values = all_gather_rows(torch.cat(values), self.device)

        mask = tokens.mask
        scores = scores.to(self.device)
        kl = torch.where(mask.bool(), kl_penalty(old_logprobs, ref_logprobs, self.ppo.kl_estimator), 0.0)
        kl_coef = self.kl.coef  # this step's coefficient; the controller adapts it for the next
        token_rewards = token_level_rewards(scores, kl, mask, kl_coef if self.ppo.kl_mode == "reward" else 0.0)
        n = scores.shape[0]
        groups = torch.arange(n, device=self.device) // self.setup.group_size
        adv = compute_advantages(
            self.ppo.advantage,
            AdvantageInputs(token_rewards=token_rewards, mask=mask, values=values, group_index=groups,
                            gamma=self.ppo.gamma, lam=self.ppo.lam),
        )
        advantages = adv.advantages
        if self.ppo.whiten_advantages and self.ppo.advantage not in SELF_NORMALISING:
            # The whole batch is here, so this is the global whitening on every rank.
            advantages = masked_whiten(advantages, mask)
        seq_kl = masked_sum(kl, mask, dim=-1).mean().item()
        self.kl.update(seq_kl, n)
        sample_logprobs = sample_logprobs.to(self.device)
        # Samples drawn by older weights than the learner's (asynchronous mode) are corrected
        # towards them token by token; fresh samples keep weight 1, the plain PPO loss.
        self._stale = self.step > scored.rollout.policy_version
        weights = (behavior_weights(old_logprobs, sample_logprobs, mask, self.ppo.behavior_weight_cap)
                   if self._stale else mask.to(old_logprobs.dtype))
        self._experience = Experience(
            tokens=tokens, scores=scores, sample_logprobs=sample_logprobs,
            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=values, kl=kl,
            advantages=advantages, returns=adv.returns, weights=weights,
        )
        return ExperienceStats(
            kl=seq_kl,
            kl_coef=kl_coef,
            reward_mean=masked_sum(token_rewards, mask, dim=-1).mean().item(),
            score_mean=scores.mean().item(),
            advantage_mean=masked_mean(adv.advantages, mask).item(),
            return_mean=masked_mean(adv.returns, mask).item(),
            value_mean=masked_mean(values, mask).item(),
            # vLLM's sampling logprobs against the learner's: sync, sampling-settings and kernel health.
            sample_logprob_diff=masked_mean((sample_logprobs - old_logprobs).abs(), mask).item(),
            behavior_weight_mean=masked_mean(weights, mask).item(),
            behavior_weight_capped=masked_mean((weights >= self.ppo.behavior_weight_cap).to(mask.dtype), mask).item(),
            response_len=mask.sum(-1).mean().item(),
            make_experience_s=time.perf_counter() - t0,
        )

    # ---------------------------------------------------------------- training

    def train(self) -> TrainStats:
        """PPO epochs over this step's experience; returns stats averaged over minibatches and ranks.

        Each epoch draws one permutation (the same on every rank) and cuts it
        into global minibatches of `minibatch_size` sequences; each rank trains
        on its equal slice of each.
        """
        if self._experience is None:
            raise RuntimeError("train() called before make_experience() for this step")
        t0 = time.perf_counter()
        exp, ppo = self._experience, self.ppo
        n, w = exp.scores.shape[0], self.setup.world_size
        size, share = ppo.minibatch_size, ppo.minibatch_size // w
        gen = torch.Generator().manual_seed(self.setup.seed * 100_003 + self.step)
        train_policy = self.step >= ppo.critic_warmup_steps
        sums: dict[str, float] = {}
        count = 0
        self.policy.train()
        if self.critic is not None:
            self.critic.train()
        for _ in range(ppo.ppo_epochs):
            perm = torch.randperm(n, generator=gen).to(self.device)
            for start in range(0, n, size):
                global_rows = perm[start : start + size]
                mb = exp.select(global_rows[self.rank * share : (self.rank + 1) * share])
                # DeepSpeed averages gradients over ranks; scaling each rank's token
                # mean by world_size * its tokens / the minibatch's tokens turns that
                # average into the token mean over the whole minibatch.
                global_tokens = exp.tokens.mask[global_rows].sum().clamp(min=1)
                scale = (w * mb.tokens.mask.sum() / global_tokens).item()
                for k, v in self._train_minibatch(mb, train_policy, scale).items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        stats = all_reduce_mean({k: v / count for k, v in sums.items()}, self.device)
        broken = sorted(k for k, v in stats.items() if not np.isfinite(v))
        if broken:
            raise FloatingPointError(
                f"learner step {self.step}: {', '.join(broken)} not finite; the update is not sent to the "
                "actors. Lower learner.lr or check the rewards and sampling settings"
            )
        self.step += 1
        self._experience = None
        return TrainStats(**stats, train_s=time.perf_counter() - t0)

    def _train_minibatch(self, mb: Experience, train_policy: bool, scale: float) -> dict[str, float]:
        """One optimiser step of policy and critic; stats are this rank's scaled shares.

        With a shared trunk the value loss (times value_coef) joins the policy loss: one backward
        through the trunk, one step, one gradient clip over both."""
        mask = mb.tokens.mask
        out = dict(policy_loss=0.0, clipfrac=0.0, approx_kl=0.0, entropy=0.0, kl_loss=0.0, grad_norm=0.0,
                   value_loss=0.0, value_clipfrac=0.0)
        if train_policy:
            logprobs, entropy, values = self._policy_pass(mb.tokens, with_entropy=True)
            pl = policy_loss_clipped(logprobs, mb.old_logprobs, mb.advantages, mask, self.ppo.clip_eps,
                                     weights=mb.weights if self._stale else None)
            loss = pl.loss
            kl_loss = torch.zeros(())
            if self.ppo.kl_mode == "loss":
                kl_loss = self.kl.coef * masked_mean(kl_penalty(logprobs, mb.ref_logprobs, self.ppo.kl_estimator), mask)
                loss = loss + kl_loss
            if values is not None:  # a shared trunk: the value loss joins the policy's
                loss = loss + self._value_loss(values, mb, scale, out)
            self.policy.backward(scale * loss)
            self.policy.step()
            out.update(
                policy_loss=scale * pl.loss.item(), clipfrac=scale * pl.clipfrac.item(),
                approx_kl=scale * pl.approx_kl.item(), entropy=scale * masked_mean(entropy, mask).item(),
                kl_loss=scale * kl_loss.item(), grad_norm=float(self.policy.get_global_grad_norm() or 0.0),
            )
        if self.critic is not None:
            self.critic.backward(scale * self._value_loss(critic_forward(self.critic, mb.tokens), mb, scale, out))
            self.critic.step()
        return out

    # ---------------------------------------------------------------- weights out

    def _full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor in the run's dtype) for every policy parameter; all ranks must iterate."""
        return full_parameters(self.policy.module, self.setup.dtype, skip=is_value_head)

    def weight_specs(self) -> list[WeightSpec]:
        specs = []
        for name, param in self.policy.module.named_parameters():
            if is_value_head(name):  # a shared trunk's value head is the learner's alone
                continue
            shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
            specs.append(WeightSpec(name=name, dtype=self.setup.dtype, shape=shape))
        return specs

    def init_weight_transfer(self, master_addr: str, master_port: int, world_size: int, backend: str, timeout_s: float,
                             transport: str = "auto") -> None:
        """Rank 0 joins the weight-transfer group as its rank 0; other ranks do nothing."""
        if self.rank != 0:
            return
        from learner.weight_sync import WeightSender

        self._sender = WeightSender(backend, transport)
        self._sender.init_group(master_addr, master_port, world_size, timeout_s)

    def close_weight_transfer(self) -> None:
        """Rank 0 leaves the weight-transfer group (to form it again with a replaced actor)."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def send_weights(self, meta: WeightSyncMeta) -> float:
        """Broadcast the current policy to the rollout actors (rank 0 sends, all ranks gather)."""
        t0 = time.perf_counter()
        params = self._full_parameters()
        if self.rank == 0:
            self._sender.send(params, meta)
        else:
            for _ in params:  # take part in each ZeRO-3 gather
                pass
        return time.perf_counter() - t0

    def weight_digests(self) -> dict[str, str]:
        """A digest of every policy weight as the actors receive it (the run's dtype, widened to
        float32 bytes), for `sync.verify_weights`; all ranks call it (ZeRO-3 gathers)."""
        from flywheel.weight_buckets import weight_digest

        params = self._full_parameters()
        if self.rank != 0:  # only rank 0's answer is used: take part in each ZeRO-3 gather, hash nothing
            for _ in params:
                pass
            return {}
        return {name: weight_digest(t.float().cpu().contiguous().numpy()) for name, t in params}

    @torch.no_grad()
    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
        """The policy's own logprobs (C,) of `completion_ids` after `prompt_ids`, at
        temperature 1 (the weight-sync check); all ranks call it."""
        tokens = pad_batch([np.asarray(prompt_ids)], [np.asarray(completion_ids)], self.pad_id).to(self.device)
        self.policy.eval()
        logprobs, _ = policy_forward(self.policy, tokens)
        return logprobs[0].float().cpu().numpy()

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, folder: str) -> dict[str, str]:
        """Write this rank's share of a checkpoint into `folder`; all ranks call it together.

        The engines hold weights and AdamW states; the rank's own file holds the step (which also
        seeds the minibatch permutations), the KL controller and the RNG states. Returns what was
        written, for the manifest. The reference model is frozen: its path is its whole state.
        """
        holds = {"policy/": "DeepSpeed engine of the policy: weights and AdamW states, one file per ZeRO partition"
                            + (" (with the critic's value head on its trunk)" if self.shared_critic else "")}
        save_engine(self.policy, os.path.join(folder, "policy"))
        if self.critic is not None:
            save_engine(self.critic, os.path.join(folder, "critic"))
            holds["critic/"] = "DeepSpeed engine of the critic: weights and AdamW states"
        name = f"learner_rank{self.rank}.pt"
        torch.save({"step": self.step, "kl": asdict(self.kl), "rng": rng_states()}, os.path.join(folder, name))
        holds["learner_rank*.pt"] = "each rank's step (seeds its minibatch permutations), KL controller, RNG states"
        return holds

    def load_checkpoint(self, folder: str) -> int:
        """Restore what save_checkpoint wrote (into freshly built engines); returns the step."""
        load_engine(self.policy, os.path.join(folder, "policy"))
        if self.critic is not None:
            load_engine(self.critic, os.path.join(folder, "critic"))
        # Our own file: it holds numpy and python RNG tuples, which weights_only loading refuses.
        state = torch.load(os.path.join(folder, f"learner_rank{self.rank}.pt"), weights_only=False)
        self.step = state["step"]
        self.kl = KLController(**state["kl"])
        restore_rng_states(state["rng"])
        return self.step

    def peak_memory_gib(self) -> float:
        """This rank's peak resident memory since it started (Linux reports ru_maxrss in KiB)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def allocator(self) -> str:
        """The memory allocator this rank runs with ("jemalloc" or "system"; `learner.allocator`)."""
        from flywheel.allocator import process_allocator

        return process_allocator()

    def reference_model(self) -> str:
        return self.setup.ref_model_path or self.setup.model_path

    def save_hf(self, out_dir: str) -> str | None:
        """Write the policy in Hugging Face format (rank 0 writes; all ranks gather)."""
        return save_hf(self.policy.module, self.rank, self.setup.dtype, self.setup.model_path, out_dir,
                       skip=is_value_head)

    def shutdown(self, destroy_process_group: bool = True) -> list[str]:
        """Leave the groups and remove this rank's shared memory; returns the files removed."""
        self.close_weight_transfer()
        return leave_group(self.setup, destroy_process_group)

"""One learner rank: the policy and critic under DeepSpeed, the frozen reference,
PPO's experience making and updates, HF checkpoints, and sending weights.

`LearnerWorker` is a plain class; `cluster/` places one Ray actor per rank.
All ranks join one torch.distributed group through `deepspeed.init_distributed`
(gloo on CPU, NCCL on GPU); each rank trains on its own shard of the step's
sequences and DeepSpeed averages the gradients.  Calls that touch ZeRO-3
parameters (forward passes, gathering weights for a sync or a checkpoint) run
on every rank in lockstep: under stage 3 each parameter is partitioned and a
gather is a collective.  Rank 0 alone additionally joins the weight-transfer
group with the rollout actors and sends.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import numpy as np
import torch

from cluster.records import ScoredRollout, TrainStats, WeightSpec, WeightSyncMeta
from learner.advantages import AdvantageInputs, compute_advantages, token_level_rewards
from learner.experience import Experience, TokenBatch, critic_forward, pad_batch, policy_forward, tokens_from_scored
from learner.losses import kl_penalty, masked_mean, masked_sum, masked_whiten, policy_loss_clipped, value_loss_clipped
from learner.models import DTYPES, Critic, load_causal_lm

log = logging.getLogger("flywheel.learner")


@dataclass
class LearnerSetup:
    """What one rank needs to start; built by cluster/ from the run config."""

    model_path: str
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    device: str  # "cpu" or "cuda"
    dtype: str  # "bfloat16" or "float32"
    zero_stage: int
    seed: int
    dist_timeout_s: float


class LearnerWorker:
    def __init__(self, setup: LearnerSetup, ppo):
        """`ppo` is the run's LearnerConfig (cluster.config); read-only here."""
        self.setup = setup
        self.ppo = ppo
        self.rank = setup.rank
        self.step = 0
        torch.manual_seed(setup.seed + setup.rank)
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            # Ray's worker may have started torch with its own thread count.
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        os.environ.update(
            RANK=str(setup.rank),
            WORLD_SIZE=str(setup.world_size),
            LOCAL_RANK="0" if setup.device == "cpu" else os.environ.get("LOCAL_RANK", "0"),
            MASTER_ADDR=setup.master_addr,
            MASTER_PORT=str(setup.master_port),
        )
        import deepspeed

        self._ds = deepspeed
        deepspeed.init_distributed(
            dist_backend="nccl" if setup.device == "cuda" else "gloo",
            timeout=timedelta(seconds=setup.dist_timeout_s),
            verbose=False,
        )
        self.device = torch.device("cuda", torch.cuda.current_device()) if setup.device == "cuda" else torch.device("cpu")
        self.pad_id = self._pad_id(setup.model_path)

        mb_per_rank = ppo.minibatch_size // setup.world_size
        policy = load_causal_lm(setup.model_path, "float32")
        critic = Critic(setup.model_path, "float32")
        self.policy = self._engine(policy, ppo.lr, mb_per_rank)
        self.critic = self._engine(critic, ppo.critic_lr, mb_per_rank)
        self.ref = load_causal_lm(setup.model_path, setup.dtype).to(self.device).eval().requires_grad_(False)
        self._experience: Experience | None = None
        self._sender = None
        log.info("learner rank %d ready (ZeRO-%d, %s)", setup.rank, setup.zero_stage, setup.dtype)

    # ---------------------------------------------------------------- set-up

    @staticmethod
    def _pad_id(path: str) -> int:
        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token_id is not None:
            return int(tok.pad_token_id)
        eos = AutoConfig.from_pretrained(path).eos_token_id
        return int(eos[0] if isinstance(eos, list) else eos or 0)

    def _engine(self, model: torch.nn.Module, lr: float, micro_batch: int):
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.ppo.max_grad_norm,
            "zero_optimization": {"stage": self.setup.zero_stage},
            "bf16": {"enabled": self.setup.dtype == "bfloat16"},
            # torch's AdamW: DeepSpeed's fused CPU Adam would need a C++ build at start.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=self.ppo.weight_decay)
        engine, *_ = self._ds.initialize(model=model, optimizer=optimizer, config=config)
        return engine

    # ---------------------------------------------------------------- experience

    def _chunks(self, tokens: TokenBatch) -> Iterator[TokenBatch]:
        n = tokens.input_ids.shape[0]
        size = max(1, self.ppo.minibatch_size // self.setup.world_size)
        for start in range(0, n, size):
            yield tokens.select(torch.arange(start, min(n, start + size)))

    @torch.no_grad()
    def make_experience(self, shard: ScoredRollout) -> dict[str, float]:
        """Reference logprobs, values, KL, advantages for this rank's shard; kept for train()."""
        t0 = time.perf_counter()
        tokens, scores, sample_logprobs = tokens_from_scored(shard, self.pad_id)
        tokens = tokens.to(self.device)
        old, ref, values = [], [], []
        for chunk in self._chunks(tokens):
            old.append(policy_forward(self.policy, chunk)[0])
            ref.append(policy_forward(self.ref, chunk)[0])
            values.append(critic_forward(self.critic, chunk))
        old_logprobs, ref_logprobs, values = torch.cat(old), torch.cat(ref), torch.cat(values)
        mask = tokens.mask
        scores = scores.to(self.device)
        kl = torch.where(mask.bool(), kl_penalty(old_logprobs, ref_logprobs, self.ppo.kl_estimator), 0.0)
        kl_in_reward = self.ppo.kl_coef if self.ppo.kl_mode == "reward" else 0.0
        token_rewards = token_level_rewards(scores, kl, mask, kl_in_reward)
        adv = compute_advantages(
            self.ppo.advantage_estimator,
            AdvantageInputs(token_rewards=token_rewards, mask=mask, values=values, gamma=self.ppo.gamma, lam=self.ppo.lam),
        )
        advantages = masked_whiten(adv.advantages, mask) if self.ppo.whiten_advantages else adv.advantages
        self._experience = Experience(
            tokens=tokens, scores=scores, sample_logprobs=sample_logprobs.to(self.device),
            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, values=values, kl=kl,
            advantages=advantages, returns=adv.returns,
        )
        stats = {
            "kl": masked_sum(kl, mask, dim=-1).mean().item(),
            "reward_mean": masked_sum(token_rewards, mask, dim=-1).mean().item(),
            "score_mean": scores.mean().item(),
            "advantage_mean": masked_mean(adv.advantages, mask).item(),
            "return_mean": masked_mean(adv.returns, mask).item(),
            "value_mean": masked_mean(values, mask).item(),
            # How far vLLM's sampling logprobs are from the learner's: sync and kernel health.
            "sample_logprob_diff": masked_mean((sample_logprobs.to(self.device) - old_logprobs).abs(), mask).item(),
            "response_len": mask.sum(-1).mean().item(),
        }
        stats = self._all_reduce_mean(stats)
        stats["make_experience_s"] = time.perf_counter() - t0
        return stats

    # ---------------------------------------------------------------- training

    def train(self) -> dict[str, float]:
        """PPO epochs over this step's experience; returns rank-averaged stats."""
        if self._experience is None:
            raise RuntimeError("train() called before make_experience() for this step")
        t0 = time.perf_counter()
        exp, ppo = self._experience, self.ppo
        n = exp.scores.shape[0]
        size = ppo.minibatch_size // self.setup.world_size
        gen = torch.Generator().manual_seed(self.setup.seed * 100_003 + self.step)
        train_policy = self.step >= ppo.critic_warmup_steps
        sums: dict[str, float] = {}
        count = 0
        self.policy.train()
        self.critic.train()
        for _ in range(ppo.ppo_epochs):
            perm = torch.randperm(n, generator=gen).to(self.device)
            for start in range(0, n, size):
                mb = exp.select(perm[start : start + size])
                step_stats = self._train_minibatch(mb, train_policy)
                for k, v in step_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        stats = {k: v / count for k, v in sums.items()}
        stats = self._all_reduce_mean(stats)
        self.step += 1
        self._experience = None
        stats["train_s"] = time.perf_counter() - t0
        return stats

    def _train_minibatch(self, mb: Experience, train_policy: bool) -> dict[str, float]:
        mask = mb.tokens.mask
        out: dict[str, float] = {}
        if train_policy:
            logprobs, entropy = policy_forward(self.policy, mb.tokens, with_entropy=True)
            pl = policy_loss_clipped(logprobs, mb.old_logprobs, mb.advantages, mask, self.ppo.clip_eps)
            loss = pl.loss
            if self.ppo.kl_mode == "loss":
                kl = kl_penalty(logprobs, mb.ref_logprobs, self.ppo.kl_estimator)
                loss = loss + self.ppo.kl_coef * masked_mean(kl, mask)
            self.policy.backward(loss)
            self.policy.step()
            out.update(
                policy_loss=pl.loss.item(), clipfrac=pl.clipfrac.item(), approx_kl=pl.approx_kl.item(),
                entropy=masked_mean(entropy, mask).item(), grad_norm=float(self.policy.get_global_grad_norm() or 0.0),
            )
        else:
            out.update(policy_loss=0.0, clipfrac=0.0, approx_kl=0.0, entropy=0.0, grad_norm=0.0)
        values = critic_forward(self.critic, mb.tokens)
        vl = value_loss_clipped(values, mb.values, mb.returns, mask, self.ppo.value_clip_eps)
        self.critic.backward(self.ppo.value_coef * vl.loss)
        self.critic.step()
        out.update(value_loss=vl.loss.item(), value_clipfrac=vl.clipfrac.item())
        return out

    def _all_reduce_mean(self, stats: dict[str, float]) -> dict[str, float]:
        if self.setup.world_size == 1:
            return stats
        keys = sorted(stats)
        t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.setup.world_size for k, v in zip(keys, t.tolist())}

    # ---------------------------------------------------------------- weights out

    def _full_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for every policy parameter; all ranks must iterate.

        Under ZeRO-3 each parameter is gathered for the duration of one item, so
        the consumer must copy it before asking for the next.
        """
        for name, param in self.policy.module.named_parameters():
            if hasattr(param, "ds_id"):
                with self._ds.zero.GatheredParameters([param], modifier_rank=None):
                    yield name, param.data.detach().to(DTYPES[self.setup.dtype]).cpu().clone()
            else:
                yield name, param.data.detach().to(DTYPES[self.setup.dtype]).cpu()

    def weight_specs(self) -> list[WeightSpec]:
        specs = []
        for name, param in self.policy.module.named_parameters():
            shape = tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)
            specs.append(WeightSpec(name=name, dtype=self.setup.dtype, shape=shape))
        return specs

    def init_weight_transfer(self, master_addr: str, master_port: int, world_size: int, backend: str, timeout_s: float) -> None:
        """Rank 0 joins the weight-transfer group as its rank 0; other ranks do nothing."""
        if self.rank != 0:
            return
        from learner.weight_sync import WeightSender

        self._sender = WeightSender(backend)
        self._sender.init_group(master_addr, master_port, world_size, timeout_s)

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

    @torch.no_grad()
    def sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
        """The policy's logprobs (C,) of `completion_ids` after `prompt_ids`; all ranks call it."""
        tokens = pad_batch([np.asarray(prompt_ids)], [np.asarray(completion_ids)], self.pad_id).to(self.device)
        self.policy.eval()
        logprobs, _ = policy_forward(self.policy, tokens)
        return logprobs[0].float().cpu().numpy()

    def save_hf(self, out_dir: str) -> str | None:
        """Write the policy in Hugging Face format (rank 0 writes; all ranks gather)."""
        state = {name: tensor for name, tensor in self._full_parameters()}
        if self.rank != 0:
            return None
        from transformers import AutoTokenizer

        module = self.policy.module
        module.config.torch_dtype = DTYPES[self.setup.dtype]
        module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(self.setup.model_path).save_pretrained(out_dir)
        return out_dir

    def shutdown(self, destroy_process_group: bool = True) -> None:
        """Leave the groups. In-process tests keep the DeepSpeed group: DeepSpeed
        caches its sub-groups globally and cannot re-create them in one process."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if destroy_process_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

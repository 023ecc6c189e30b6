"""The learner ranks of the stages before and beside RL: supervised fine-tuning,
reward-model training on preference pairs, and DPO.

Each worker is a plain class, one per DeepSpeed rank, as `LearnerWorker` is for
PPO (`cluster/` places them). Every call gets the whole global batch; each rank
computes its equal share of the rows, and losses are scaled so that DeepSpeed's
gradient average equals the mean over the whole batch (the same rule as PPO:
the update does not depend on the number of ranks). Evaluation sums over every
rank's rows. Saved models are plain Hugging Face directories: an SFT or DPO
policy loads in vLLM and transformers as it is, and a reward model is served by
`reward_service` with no conversion (it scores `prompt + completion` text,
right-padded, left-truncated, exactly as `reward_service.scorers.ModelScorer`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from learner.engine import LearnerSetup, LRSchedule, join_group, leave_group, make_engine, make_frozen, pad_token_id, save_hf
from learner.experience import TokenBatch, pad_batch, policy_forward
from learner.losses import AVERAGED_LOGPS, PREFERENCE_LOSSES, bradley_terry_loss, masked_mean, masked_sum
from learner.models import load_causal_lm


def _my_rows(n: int, rank: int, world: int) -> slice:
    if n % world:
        raise ValueError(f"a batch of {n} does not divide over {world} learner ranks; make the batch size a multiple")
    share = n // world
    return slice(rank * share, (rank + 1) * share)


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


class SFTWorker:
    """Supervised fine-tuning: next-token loss on the response tokens only (prompt tokens masked out)."""

    def __init__(self, setup: LearnerSetup, lr: float, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                 schedule: LRSchedule | None = None):
        self.setup = setup
        self.device = join_group(setup)
        self.pad_id = pad_token_id(setup.model_path)
        self.model = make_engine(load_causal_lm(setup.model_path, "float32"), setup, lr, weight_decay, 1, max_grad_norm,
                                 schedule)

    def _tokens(self, prompt_ids: list[np.ndarray], response_ids: list[np.ndarray]) -> TokenBatch:
        rows = _my_rows(len(prompt_ids), self.setup.rank, self.setup.world_size)
        return pad_batch(prompt_ids[rows], response_ids[rows], self.pad_id).to(self.device)

    def train_batch(self, prompt_ids: list[np.ndarray], response_ids: list[np.ndarray]) -> float:
        """One optimiser step on the whole batch; returns its token-mean loss (nats per response token)."""
        tokens = self._tokens(prompt_ids, response_ids)
        total_tokens = float(sum(len(r) for r in response_ids))
        self.model.train()
        logprobs, _ = policy_forward(self.model, tokens)
        nll_sum = -masked_sum(logprobs, tokens.mask)
        # world_size * (local sum / global count): DeepSpeed's rank average is the global token mean.
        self.model.backward(self.setup.world_size * nll_sum / total_tokens)
        self.model.step()
        return _sum_over_ranks([nll_sum.item()], self.device)[0] / total_tokens

    @torch.no_grad()
    def eval_loss(self, prompt_ids: list[np.ndarray], response_ids: list[np.ndarray]) -> tuple[float, float]:
        """(summed NLL, response tokens) over the whole batch, so a caller can average over batches."""
        tokens = self._tokens(prompt_ids, response_ids)
        self.model.eval()
        logprobs, _ = policy_forward(self.model, tokens)
        nll, count = _sum_over_ranks([-masked_sum(logprobs, tokens.mask).item(), tokens.mask.sum().item()], self.device)
        return nll, count

    def save_hf(self, out_dir: str) -> str | None:
        return save_hf(self.model.module, self.setup.rank, self.setup.dtype, self.setup.model_path, out_dir)

    def shutdown(self, destroy_process_group: bool = True) -> list[str]:
        return leave_group(self.setup, destroy_process_group)


class RewardModelWorker:
    """A scalar judge trained on preference pairs with the Bradley-Terry loss.

    The backbone is any local Hugging Face model loadable as a sequence
    classifier with one output: the tiny causal LM (a Llama with a score head
    on the last real token) or an encoder such as all-MiniLM-L6-v2 (a BERT
    with a head on the pooled first token). It tokenises text with its own
    tokenizer, so its vocabulary need not be the policy's.
    """

    def __init__(self, setup: LearnerSetup, lr: float, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                 max_length: int = 256, schedule: LRSchedule | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.setup = setup
        self.device = join_group(setup)
        self.tokenizer = AutoTokenizer.from_pretrained(setup.model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The same text handling as reward_service.scorers.ModelScorer: the judge is served as trained.
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialised score head" is expected here
        try:
            model = AutoModelForSequenceClassification.from_pretrained(setup.model_path, num_labels=1,
                                                                       dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = min(max_length, self.tokenizer.model_max_length)
        self.model = make_engine(model, setup, lr, weight_decay, 1, max_grad_norm, schedule)

    def _scores(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits[:, 0].float()

    def _pairs(self, prompts, chosen, rejected, weights):
        rows = _my_rows(len(prompts), self.setup.rank, self.setup.world_size)
        c = self._scores([p + x for p, x in zip(prompts[rows], chosen[rows])])
        r = self._scores([p + x for p, x in zip(prompts[rows], rejected[rows])])
        return c, r, torch.tensor(weights[rows], dtype=torch.float32, device=self.device)

    def train_batch(self, prompts: list[str], chosen: list[str], rejected: list[str],
                    weights: list[float]) -> tuple[float, float]:
        """One optimiser step; returns the batch's weighted loss and pairwise accuracy."""
        self.model.train()
        c, r, w = self._pairs(prompts, chosen, rejected, weights)
        out = bradley_terry_loss(c, r, weights=w)
        total_w = float(sum(weights))
        local_w = w.sum()
        self.model.backward(self.setup.world_size * out.loss * local_w / total_w)
        self.model.step()
        loss_sum, correct = _sum_over_ranks([(out.loss * local_w).item(), (c > r).sum().item()], self.device)
        return loss_sum / total_w, correct / len(prompts)

    @torch.no_grad()
    def evaluate(self, prompts: list[str], chosen: list[str], rejected: list[str],
                 gold_margins: list[float | None] | None = None) -> tuple[float, float, float, float]:
        """Over the whole batch: (pairs ordered as labelled, pairs, pairs ordered as the gold labeller
        orders them, pairs with a gold order). A pair's gold order is the sign of its gold margin;
        pairs without one, or tied, are left out of the last two counts."""
        self.model.eval()
        c, r, _ = self._pairs(prompts, chosen, rejected, [1.0] * len(prompts))
        rows = _my_rows(len(prompts), self.setup.rank, self.setup.world_size)
        margins = (gold_margins or [None] * len(prompts))[rows]
        gold = torch.tensor([0.0 if m is None else float(np.sign(m)) for m in margins], device=self.device)
        agrees = torch.sign(c - r) == gold
        return tuple(_sum_over_ranks([(c > r).sum().item(), float(len(c)),
                                      (agrees & (gold != 0)).sum().item(), (gold != 0).sum().item()], self.device))

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        """Scores of whole texts on this rank (no sharding): a check against the served model."""
        self.model.eval()
        return self._scores(texts).tolist()

    def save_hf(self, out_dir: str) -> str | None:
        return save_hf(self.model.module, self.setup.rank, self.setup.dtype, self.setup.model_path, out_dir)

    def shutdown(self, destroy_process_group: bool = True) -> list[str]:
        return leave_group(self.setup, destroy_process_group)


class DPOWorker:
    """DPO (or IPO) on preference pairs against a frozen reference.

    The reference's sequence logprobs do not change, so the caller computes them
    once per pair (`reference_logps`) and passes them with every batch.
    """

    def __init__(self, setup: LearnerSetup, lr: float, beta: float, loss: str = "dpo", weight_decay: float = 0.0,
                 max_grad_norm: float = 1.0, schedule: LRSchedule | None = None):
        if loss not in PREFERENCE_LOSSES:
            raise ValueError(f"dpo loss must be one of {sorted(PREFERENCE_LOSSES)}, got {loss!r}")
        self.setup, self.beta, self.loss_fn = setup, beta, PREFERENCE_LOSSES[loss]
        self.average = AVERAGED_LOGPS[loss]
        self.device = join_group(setup)
        self.pad_id = pad_token_id(setup.model_path)
        self.model = make_engine(load_causal_lm(setup.model_path, "float32"), setup, lr, weight_decay, 1, max_grad_norm,
                                 schedule)
        ref_path = setup.ref_model_path or setup.model_path
        self.ref = make_frozen(load_causal_lm(ref_path, setup.dtype), setup, self.device, 1)

    def _logps(self, model, prompt_ids, completion_ids) -> torch.Tensor:
        """Completion logprobs (b,) of this rank's rows, summed (DPO) or averaged over tokens (IPO)."""
        rows = _my_rows(len(prompt_ids), self.setup.rank, self.setup.world_size)
        tokens = pad_batch(prompt_ids[rows], completion_ids[rows], self.pad_id).to(self.device)
        logprobs, _ = policy_forward(model, tokens)
        reduce = masked_mean if self.average else masked_sum
        return reduce(logprobs, tokens.mask, dim=-1)

    @torch.no_grad()
    def reference_logps(self, prompt_ids, chosen_ids, rejected_ids) -> tuple[np.ndarray, np.ndarray]:
        """The reference's logprobs of chosen and rejected (reduced as the loss wants), (B,) each,
        for the whole batch."""
        parts = []
        for ids in (chosen_ids, rejected_ids):
            local = self._logps(self.ref, prompt_ids, ids).float()
            gathered = [torch.empty_like(local) for _ in range(self.setup.world_size)]
            if self.setup.world_size > 1:
                dist.all_gather(gathered, local)
            else:
                gathered = [local]
            parts.append(torch.cat(gathered).cpu().numpy())
        return parts[0], parts[1]

    @torch.no_grad()
    def evaluate(self, prompt_ids, chosen_ids, rejected_ids, ref_chosen: np.ndarray,
                 ref_rejected: np.ndarray) -> tuple[float, float]:
        """(pairs whose implicit reward prefers chosen, pairs) over the whole batch."""
        self.model.eval()
        rows = _my_rows(len(prompt_ids), self.setup.rank, self.setup.world_size)
        margin = ((self._logps(self.model, prompt_ids, chosen_ids) - torch.as_tensor(ref_chosen[rows]))
                  - (self._logps(self.model, prompt_ids, rejected_ids) - torch.as_tensor(ref_rejected[rows])))
        right, count = _sum_over_ranks([(margin > 0).sum().item(), float(len(margin))], self.device)
        return right, count

    def train_batch(self, prompt_ids, chosen_ids, rejected_ids, ref_chosen: np.ndarray,
                    ref_rejected: np.ndarray) -> dict[str, float]:
        """One optimiser step; returns the batch's loss, accuracy (implicit reward of chosen above
        rejected) and mean reward margin."""
        self.model.train()
        rows = _my_rows(len(prompt_ids), self.setup.rank, self.setup.world_size)
        chosen = self._logps(self.model, prompt_ids, chosen_ids)
        rejected = self._logps(self.model, prompt_ids, rejected_ids)
        out = self.loss_fn(chosen, rejected, torch.as_tensor(ref_chosen[rows], device=self.device),
                           torch.as_tensor(ref_rejected[rows], device=self.device), self.beta)
        # Equal shares of the batch: DeepSpeed's rank average of per-rank means is the batch mean.
        self.model.backward(out.loss)
        self.model.step()
        margin = out.chosen_rewards - out.rejected_rewards
        n = len(prompt_ids)
        loss_sum, right, margin_sum = _sum_over_ranks(
            [out.loss.item() * len(margin), (margin > 0).sum().item(), margin.sum().item()], self.device)
        return {"loss": loss_sum / n, "accuracy": right / n, "margin": margin_sum / n}

    def save_hf(self, out_dir: str) -> str | None:
        return save_hf(self.model.module, self.setup.rank, self.setup.dtype, self.setup.model_path, out_dir)

    def shutdown(self, destroy_process_group: bool = True) -> list[str]:
        return leave_group(self.setup, destroy_process_group)

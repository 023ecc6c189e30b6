"""Scorers: what turns a batch of (prompt, completion) texts into one float each.

`RuleScorer` wraps a rule from `reward_service.rules`; `ModelScorer` runs a
Hugging Face sequence-classification reward model (num_labels=1) on CPU.
The server holds exactly one scorer; both are plain classes usable in-process.

Text format seen by a reward model: `prompt + completion`, concatenated with no
separator, because the policy's completion continues the prompt text exactly
as generated.  A reward model trained elsewhere must use the same format.
"""

from __future__ import annotations

from typing import Protocol

from reward_service.rules import get_rule


class Scorer(Protocol):
    name: str  # shown by /health and in every /score answer, e.g. "rule:length"

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One float per (prompt, completion) pair, in order."""
        ...


class RuleScorer:
    """Scores each pair with a named rule, looked up once here."""

    def __init__(self, rule: str):
        self.rule = get_rule(rule)  # ValueError naming the valid rules
        self.name = f"rule:{rule}"

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [float(self.rule(p, c)) for p, c in zip(prompts, completions, strict=True)]


class ModelScorer:
    """A reward model from a local Hugging Face directory, run on CPU.

    The score of a pair is the model's single logit for `prompt + completion`,
    equal (to float rounding) to the logit of that text scored alone: batches
    are right-padded with an attention mask, so every text keeps positions
    0..n-1 (models with absolute position embeddings would see shifted
    positions under left padding).  Texts longer than `max_length` tokens lose
    their beginning (left truncation): the end of the completion is judged.
    """

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        max_length: int = 1024,
        batch_size: int = 16,
        num_threads: int = 1,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        # One thread by default: the service shares the machine's cores with the
        # rollout actors and the learner.
        torch.set_num_threads(num_threads)
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if dtype not in dtypes:
            raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(
                    f"tokenizer in {path} has neither a pad nor an eos token; "
                    "add a pad token to its tokenizer_config.json"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=dtypes[dtype]
        )
        self.model.eval()
        # The classification head pools at the last token that is not padding,
        # found through the config's pad id; without one it refuses batches > 1.
        text_config = self.model.config.get_text_config()
        if text_config.pad_token_id is None:
            text_config.pad_token_id = self.tokenizer.pad_token_id
        # Never feed more tokens than the model has positions for.
        limits = [max_length, self.tokenizer.model_max_length]
        limits.append(getattr(text_config, "max_position_embeddings", None) or max_length)
        self.max_length = int(min(limits))
        self.batch_size = batch_size
        self.name = f"model:{path}"
        self._torch = torch

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        with self._torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                logits = self.model(**enc).logits  # (b, 1)
                scores.extend(logits[:, 0].float().tolist())
        return scores

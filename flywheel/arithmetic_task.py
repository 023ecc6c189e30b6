"""A verifiable arithmetic task: one-digit sums and differences, scored by exact match.

The synthetic task (flywheel/synthetic_task.py) is judged by a simulated
labeller's preference; this one has a checkable answer, the setting where the
critic-free estimators (GRPO, RLOO, REINFORCE++) are used most. It owns:

- prompts that ask one problem in one of four phrasings ("What is 3 + 5?
  Answer:", "Compute 3 + 5. Answer:", ...), split into disjoint train and eval
  pools by a stable hash of the prompt text;
- `answer`, which reads the problem back out of a prompt, and
  `exact_match_reward`, the rule: 1.0 if the completion's first integer is the
  answer, else 0.0;
- SFT demonstrations (completion " 8", then the policy's EOS) and JSONL writers.

Operands are 0-9 (`MAX_OPERAND`): addition of any two, and subtraction only
when the result is non-negative, so 155 problems with answers 0-18. The
embedded policy has 2M parameters and its tokenizer spells every digit as its
own byte token; one-digit operands need no carrying across digit positions,
and an answer is at most two tokens, which such a model can learn from a few
thousand demonstrations. Held-out prompts ask problems in a phrasing that
training never paired with them (for almost every problem another phrasing of
it is in training), so eval accuracy measures whether what the policy learnt
about the numbers carries over to a new wording. A split by operand pairs
instead (hold out 3 + 5, train on 5 + 3) asks a 2M-parameter model to
generalise addition itself from about 120 facts, which it does not do in
minutes: eval accuracy stayed at chance (0.065 with 19 possible answers).

All generation is deterministic given a seed and uses its own generator
(`numpy.random.default_rng(seed)`). Only the standard library and numpy are
imported at module import. The prompt files have the layout
`synthetic_task.load_prompts` reads.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flywheel.task_splits import draw_cycled, split_pool, write_jsonl

# ---------------------------------------------------------------------------- problems

MAX_OPERAND = 9  # operands are 0..MAX_OPERAND; see the module docstring for why
OPERATORS: tuple[str, ...] = ("+", "-")
TEMPLATES: tuple[str, ...] = (
    "What is {a} {op} {b}? Answer:",
    "Compute {a} {op} {b}. Answer:",
    "Calculate {a} {op} {b}. Answer:",
    "Find {a} {op} {b}. Answer:",
)
TEMPLATE = TEMPLATES[0]

# Reads a prompt back: the first "A op B" anywhere in the text (every template has one).
# Digit runs are ASCII only and bounded, so int() never sees a huge or non-ASCII number.
_PROBLEM_RE = re.compile(r"(?<![0-9])([0-9]{1,18}) ([+-]) ([0-9]{1,18})(?![0-9])")
# The first integer of a completion: an optional minus sign directly before a
# run of ASCII digits. The run is taken whole (so "123" is 123, never 12).
_INTEGER_RE = re.compile(r"-?[0-9]+")
_MAX_ANSWER_DIGITS = 18  # a longer run cannot equal any answer; skip int() on it


def _as_text(text: str | bytes) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    return str(text)


def answer(prompt: str | bytes) -> int | None:
    """The result of the problem the prompt names, or None if it names none.

    "What is 3 + 5? Answer:" -> 8; "What is 7 - 9? Answer:" -> -2 (never
    generated, but parsed); "Write about animals" -> None.
    """
    match = _PROBLEM_RE.search(_as_text(prompt))
    if match is None:
        return None
    a, op, b = int(match[1]), match[2], int(match[3])
    return a + b if op == "+" else a - b


def first_integer(completion: str | bytes) -> int | None:
    """The first integer in the text, or None; total on any input.

    The first match of `-?[0-9]+` anywhere in the text: leading spaces and
    words are skipped (" the answer is 8" -> 8), a minus sign counts only
    directly before the digits (" -3" -> -3, " - 3" -> 3), leading zeros are
    allowed (" 08" -> 8), and the run stops at the first non-digit
    (" 8 9" -> 8, " 1.5" -> 1). Non-ASCII digits are not digits. Bytes are
    decoded as UTF-8 with replacement. A run of more than 18 digits gives
    None (it cannot be an answer, and int() would refuse very long ones).
    """
    match = _INTEGER_RE.search(_as_text(completion))
    if match is None or len(match[0].lstrip("-")) > _MAX_ANSWER_DIGITS:
        return None
    return int(match[0])


def exact_match_reward(prompt: str | bytes, completion: str | bytes) -> float:
    """1.0 if the completion's first integer equals the prompt's answer, else 0.0.

    The integer is read by `first_integer` (so " 8", "8", " 08" and " 8 9"
    all answer 8). A prompt naming no problem, or a completion with no
    integer, scores 0.0. Total on any input: never raises.
    """
    expected = answer(prompt)
    return float(expected is not None and first_integer(completion) == expected)


def exact_match_rewards(prompts: list[str], completions: list[str]) -> np.ndarray:
    """`exact_match_reward` of each pair, as float32 (B,)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return np.array([exact_match_reward(p, c) for p, c in zip(prompts, completions)], np.float32)


# ---------------------------------------------------------------------------- prompts

def all_prompts() -> list[str]:
    """Every prompt of the task (both splits), in a fixed order: each of the 155 problems
    (100 sums, 55 differences) in each phrasing of TEMPLATES."""
    return [t.format(a=a, op=op, b=b) for t in TEMPLATES for a, op, b in problems()]


def problems() -> list[tuple[int, str, int]]:
    """The 155 problems (a, op, b): every sum of two operands, and differences with b <= a."""
    operands = range(MAX_OPERAND + 1)
    sums = [(a, "+", b) for a in operands for b in operands]
    return sums + [(a, "-", b) for a in operands for b in operands if b <= a]


def prompt_pool(split: str) -> list[str]:
    """All prompts of one split ("train" or "eval"); the two pools are disjoint."""
    return split_pool(all_prompts(), split)


def make_prompts(n: int, seed: int, split: str = "train") -> list[str]:
    """n prompts of one split: the pool shuffled by `seed`, cycled if n exceeds it."""
    return draw_cycled(prompt_pool(split), n, seed)


# ---------------------------------------------------------------------- demonstrations


@dataclass
class Demonstration:
    """A prompt and its correct completion, for SFT."""

    prompt: str
    completion: str  # " " + str(answer) and nothing else: the policy's EOS ends it


def make_sft_demonstrations(n: int, seed: int) -> list[Demonstration]:
    """n demonstrations on train-split prompts, each answered correctly."""
    out = []
    for prompt in make_prompts(n, seed, "train"):
        result = answer(prompt)
        assert result is not None, prompt  # every generated prompt names a problem
        out.append(Demonstration(prompt, f" {result}"))
    return out


# ------------------------------------------------------------------------------- files

DEFAULT_SIZES: dict[str, int] = {
    "prompts_train": 4096,
    "prompts_eval": len(prompt_pool("eval")),  # one pass over the small eval pool
    "sft": 2048,
}


def write_datasets(
    out_dir: str | os.PathLike, seed: int, sizes: dict[str, int] | None = None
) -> dict[str, Path]:
    """Write the named data sets as .jsonl files; return their paths.

    `sizes` names the sets to write and their row counts (default: all of
    DEFAULT_SIZES); only those are written. Prompt rows are {"prompt"}, SFT
    rows {"prompt", "completion"}.
    """
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown data set names {sorted(unknown)}; valid: {sorted(DEFAULT_SIZES)}")
    makers = {
        "prompts_train": lambda n: [{"prompt": p} for p in make_prompts(n, seed, "train")],
        "prompts_eval": lambda n: [{"prompt": p} for p in make_prompts(n, seed, "eval")],
        "sft": lambda n: [asdict(d) for d in make_sft_demonstrations(n, seed)],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, n in sizes.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], makers[name](n))
    return paths

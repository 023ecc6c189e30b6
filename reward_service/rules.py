"""Rule rewards: plain functions of (prompt, completion) text, registered by name.

The service looks a rule up once, at start-up (`get_rule`), and then calls it
per item.  A rule returns a Python float; it must not depend on call order,
so the client may split a batch however it likes.
"""

from __future__ import annotations

from typing import Callable

RuleFn = Callable[[str, str], float]

# One "full" completion for the length rule: long enough to be non-trivial in
# tests, short enough that tiny models reach it.
LENGTH_TARGET_WORDS = 32


def length_reward(prompt: str, completion: str) -> float:
    """Whitespace words in the completion / 32, capped at 1.

    A task-free rule for tests: "a b c" scores 3 / 32 = 0.09375; 40 words score 1.0.
    """
    return min(len(completion.split()) / LENGTH_TARGET_WORDS, 1.0)


def synthetic_gold_reward(prompt: str, completion: str) -> float:
    """The gold reward of the project's synthetic task (flywheel/synthetic_task.py)."""
    # Imported here so that the length rule, and the service itself, work
    # before or without the task module.
    from flywheel.synthetic_task import gold_reward

    return float(gold_reward(prompt, completion))


def arithmetic_exact_reward(prompt: str, completion: str) -> float:
    """Exact match on the arithmetic task (flywheel/arithmetic_task.py): 1.0 or 0.0."""
    # Imported here for the same reason as the synthetic task's rule.
    from flywheel.arithmetic_task import exact_match_reward

    return float(exact_match_reward(prompt, completion))


RULES: dict[str, RuleFn] = {
    "length": length_reward,
    "synthetic_gold": synthetic_gold_reward,
    "arithmetic_exact": arithmetic_exact_reward,
}


def get_rule(name: str) -> RuleFn:
    """The rule registered as `name`; a ValueError listing the valid names otherwise."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown reward rule {name!r}; valid rules: {', '.join(sorted(RULES))}"
        ) from None

"""The embedded tasks by name, behind one interface.

- `preference`: the synthetic preference task (`flywheel/synthetic_task.py`):
  prompts asking for words on a topic, a simulated labeller's gold reward in
  [0, 1], demonstrations and noisy preference pairs; served rule `synthetic_gold`.
- `arithmetic`: the verifiable task (`flywheel/arithmetic_task.py`): small sums
  and differences, exact match of the answer; served rule `arithmetic_exact`.

A run names its task in `data.task`; prompts, SFT demonstrations and the gold
figure logged beside the proxy reward all come from it. Standard library and
numpy only (the task modules are imported when asked for).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import numpy as np


@dataclass(frozen=True)
class Task:
    name: str
    module: str  # the flywheel module that generates it
    gold_function: str  # (prompts, completions) -> (B,) float32 gold reward in that module
    rule: str  # the reward service's rule for its gold reward

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def gold(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        return getattr(self.load(), self.gold_function)(prompts, completions)

    def demonstrations(self, n: int, seed: int) -> list[tuple[str, str]]:
        """(prompt, completion) pairs the gold reward scores highly, for SFT."""
        return [(d.prompt, d.completion) for d in self.load().make_sft_demonstrations(n, seed)]


TASKS: dict[str, Task] = {
    "preference": Task("preference", "flywheel.synthetic_task", "gold_rewards", "synthetic_gold"),
    "arithmetic": Task("arithmetic", "flywheel.arithmetic_task", "exact_match_rewards", "arithmetic_exact"),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None

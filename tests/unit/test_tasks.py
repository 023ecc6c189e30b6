"""The embedded tasks by name: each gives prompts, demonstrations its gold reward likes, and its rule."""

from __future__ import annotations

import pytest

from flywheel.tasks import TASKS, get_task
from reward_service.rules import RULES


@pytest.mark.parametrize("name", sorted(TASKS))
def test_demonstrations_score_high_under_the_tasks_gold(name):
    task = get_task(name)
    demos = task.demonstrations(64, seed=0)
    gold = task.gold([p for p, _ in demos], [c for _, c in demos])
    assert gold.shape == (64,) and gold.min() >= 0.75 and gold.mean() > 0.9  # arithmetic: all 1; preference: 0.8 to 1
    wrong = task.gold([p for p, _ in demos], [" zzz"] * 64)
    assert wrong.max() == 0.0
    assert task.rule in RULES


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown task 'chess'; valid tasks: arithmetic, preference"):
        get_task("chess")

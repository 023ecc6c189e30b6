"""The stages' learning-rate schedule, against values worked by hand."""

import math

import pytest

from learner.engine import LRSchedule


def test_constant_is_one_after_warmup():
    s = LRSchedule("constant", warmup_steps=3, total_steps=10)
    # Warm-up factors (step + 1) / (warmup + 1): 1/4, 2/4, 3/4, then the peak.
    assert [s.factor(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_linear_decays_to_zero_at_the_last_step():
    s = LRSchedule("linear", warmup_steps=0, total_steps=4)
    # done = step / 4: 1, 3/4, 1/2, 1/4, and 0 from step 4 on.
    assert [s.factor(i) for i in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_cosine_after_warmup():
    s = LRSchedule("cosine", warmup_steps=2, total_steps=6)
    # After 2 warm-up steps, done = (step - 2) / 4; factor = (1 + cos(pi * done)) / 2.
    expected = [1 / 3, 2 / 3, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]
    assert [s.factor(i) for i in range(7)] == pytest.approx(expected)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="constant"):
        LRSchedule("step")

"""The ppo_step benchmark's choice of samples per prompt from its two probe runs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
ppo_step = importlib.import_module("ppo_step")


def _probes(gen1: float, rest1: float, gen4: float, rest4: float) -> list[dict]:
    return [{"samples": 4, "generate_s": gen4, "rest_s": rest4}, {"samples": 1, "generate_s": gen1, "rest_s": rest1}]


def test_a_learner_heavy_machine_gets_one_sample():
    # The AMD machine's figures of 2026-12-03 (bf16): one sample gave 0.44, four 0.34.
    samples, share = ppo_step.choose_samples(_probes(5.74, 7.24, 9.38, 18.4))
    assert samples == 1
    assert share == pytest.approx(5.74 / (5.74 + 7.24))


def test_a_generation_heavy_machine_gets_more_samples():
    # Intel with AMX: one sample gave 0.74 of a step, four 0.56; the lines cross 0.5 near six.
    samples, share = ppo_step.choose_samples(_probes(7.26, 2.57, 8.61, 6.8))
    assert samples == 6
    assert 0.45 < share < 0.55


def test_the_choice_stays_within_the_allowed_counts():
    # Generation always dominates: the most samples allowed; the rest always does: one.
    assert ppo_step.choose_samples(_probes(10.0, 1.0, 10.5, 1.2))[0] == ppo_step.MAX_SAMPLES
    assert ppo_step.choose_samples(_probes(1.0, 10.0, 1.2, 30.0))[0] == 1


def test_noise_cannot_make_a_phase_free():
    # Generation measured faster at four samples than at one: extrapolating the line would reach
    # zero seconds; the clip keeps every predicted share positive.
    samples, share = ppo_step.choose_samples(_probes(4.0, 4.0, 1.0, 1.1))
    assert 0 < share < 1
    assert 1 <= samples <= ppo_step.MAX_SAMPLES


def test_two_probes_of_one_count_are_refused():
    with pytest.raises(ValueError, match="two different sample counts"):
        ppo_step.choose_samples([{"samples": 2, "generate_s": 1, "rest_s": 1}] * 2)

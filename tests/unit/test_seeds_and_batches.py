"""Sampling seeds are unique per (run, stream, step, prompt, sample); prompt
batches split over actors without losing a prompt."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.records import PromptBatch
from flywheel.seeds import sample_seeds


def test_seeds_are_unique_over_steps_prompts_samples_and_streams():
    seeds = [sample_seeds(run_seed, step, 64, 4, stream) for run_seed in (0, 1) for step in range(50)
             for stream in ("train", "eval")]
    flat = np.concatenate([s.ravel() for s in seeds])
    assert len(flat) == 2 * 50 * 2 * 256
    assert len(np.unique(flat)) == len(flat)
    assert flat.min() >= 0 and seeds[0].dtype == np.int64


def test_seeds_are_deterministic_and_shaped():
    a = sample_seeds(7, 3, 5, 2)
    assert a.shape == (5, 2)
    np.testing.assert_array_equal(a, sample_seeds(7, 3, 5, 2))
    # The first rows do not depend on how many prompts the call had: actors may split the batch anywhere.
    np.testing.assert_array_equal(sample_seeds(7, 3, 8, 2)[:5], a)


@pytest.mark.parametrize("n, parts, sizes", [(10, 3, [4, 3, 3]), (64, 1, [64]), (2, 4, [1, 1, 0, 0]), (8, 2, [4, 4])])
def test_split_is_balanced_and_loses_nothing(n, parts, sizes):
    batch = PromptBatch(prompts=[f"p{i}" for i in range(n)], prompt_ids=[np.array([i]) for i in range(n)],
                        seeds=np.arange(2 * n).reshape(n, 2))
    pieces = batch.split(parts)
    assert [len(p) for p in pieces] == sizes
    assert [x for p in pieces for x in p.prompts] == batch.prompts
    np.testing.assert_array_equal(np.concatenate([p.seeds for p in pieces]), batch.seeds)

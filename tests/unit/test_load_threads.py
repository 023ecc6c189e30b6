"""How many threads a rollout actor applies a weight update with (`sync.load_threads`):
the default shares a machine's cores among the rollout actors on it, an explicit value wins,
and the threads are given back after the update."""

from __future__ import annotations

import os

import pytest
import torch

from actors.rollout import update_load_threads
from cluster.groups import RolloutGroup
from flywheel.hardware import torch_threads

CORES = len(os.sched_getaffinity(0))


def test_the_default_divides_the_cores_among_the_actors_of_the_machine():
    with torch_threads(1):  # a rollout actor generates on one thread by default
        assert update_load_threads(None, 1) == CORES
        assert update_load_threads(None, CORES) == 1
        assert update_load_threads(None, 4 * CORES) == 1  # never fewer than one


def test_the_default_is_never_fewer_than_generation_uses():
    with torch_threads(2):
        assert update_load_threads(None, 8 * CORES) == 2


def test_an_explicit_value_wins():
    assert update_load_threads(3, 1) == 3
    assert update_load_threads(1, 1) == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_torch_threads_are_restored_after_the_block_even_when_it_fails(threads):
    before = torch.get_num_threads()
    with torch_threads(threads):
        assert torch.get_num_threads() == threads
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="load failed"), torch_threads(threads):
        raise RuntimeError("load failed")
    assert torch.get_num_threads() == before


def _group(bundles_to_node: dict, first_bundle: int, actors: int, monkeypatch) -> RolloutGroup:
    """A RolloutGroup without Ray: only what `actors_sharing_node` reads."""
    import ray.util

    group = RolloutGroup.__new__(RolloutGroup)
    group.pg, group.first_bundle, group.actors = "pg", first_bundle, [f"actor {i}" for i in range(actors)]
    monkeypatch.setattr(ray.util, "placement_group_table", lambda pg: {"bundles_to_node_id": bundles_to_node})
    return group


def test_actors_are_counted_per_machine_from_the_placement_group(monkeypatch):
    # Bundles 0-2 are rollout actors (two on node a, one on b); bundle 3 is a learner rank on b.
    group = _group({0: "a", 1: "b", 2: "a", 3: "b"}, first_bundle=0, actors=3, monkeypatch=monkeypatch)
    assert group.actors_sharing_node() == [2, 1, 2]


def test_an_unplaced_bundle_counts_every_actor_as_sharing(monkeypatch):
    group = _group({0: "a"}, first_bundle=0, actors=2, monkeypatch=monkeypatch)
    assert group.actors_sharing_node() == [2, 2]

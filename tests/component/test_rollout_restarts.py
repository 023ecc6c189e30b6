"""The bound on replacing rollout actors within one batch (cluster/groups.py `RolloutGroup`).

The replacement itself runs through the real stack in tests/e2e/test_failures.py; here, only
that a death beyond `rollout.max_restarts` stops the batch with an error naming the key, before
anything is killed or started.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.groups import RemoteCallError, RolloutGroup


def test_a_death_beyond_max_restarts_stops_the_batch_naming_the_key():
    group = RolloutGroup.__new__(RolloutGroup)  # no Ray: the limit is checked before any actor is touched
    group.cfg = SimpleNamespace(rollout=SimpleNamespace(max_restarts=1))
    group.actors = ["actor 0", "actor 1"]
    with pytest.raises(RemoteCallError, match=r"rollout actor 1 died \(RuntimeError\), death 2 in this batch, "
                                              r"beyond rollout.max_restarts=1"):
        group._replace(1, RuntimeError("killed"), restarts=2, prompts=4)
    assert group.actors == ["actor 0", "actor 1"]

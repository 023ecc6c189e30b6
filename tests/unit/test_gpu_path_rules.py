"""Rules of the GPU path that a CPU machine can check.

On a GPU cluster every collective runs on NCCL, which accepts only CUDA
tensors, and weights should travel GPU to GPU. No test here has a GPU, so the
device is treated as one value that flows through: each helper is run with the
"meta" device standing for CUDA, and every tensor it hands to a collective, or
packs for the weight broadcast, must be on that device.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import learner.distributed as ld
from flywheel.collectives import check_device, group_device
from flywheel.records import WeightSpec
from flywheel.weight_buckets import plan_buckets

GPU = torch.device("meta")  # stands for the CUDA device of an NCCL group


class _Stop(Exception):
    pass


@pytest.fixture
def two_ranks(monkeypatch):
    """torch.distributed as a 2-rank group whose collectives record their tensors' devices."""
    seen: list[torch.device] = []

    def record(*args, **kwargs):
        for a in args:
            for t in a if isinstance(a, list) else [a]:
                if isinstance(t, torch.Tensor):
                    seen.append(t.device)
        raise _Stop  # meta tensors hold no values to reduce: the device is all we check

    monkeypatch.setattr(ld.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ld.dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(ld.dist, "all_reduce", record)
    monkeypatch.setattr(ld.dist, "all_gather", record)
    return seen


def test_group_devices():
    assert group_device("nccl").type == "cuda" and group_device("gloo").type == "cpu"
    with pytest.raises(ValueError, match="'gloo' .* or 'nccl'"):
        group_device("mpi")


def test_statistics_are_reduced_on_the_group_device(two_ranks):
    with pytest.raises(_Stop):
        ld.all_reduce_mean({"loss": 1.0, "kl": 2.0}, GPU)
    with pytest.raises(_Stop):
        ld.all_gather_rows(torch.zeros(4, 3, device=GPU), GPU)
    assert two_ranks and all(d.type == GPU.type for d in two_ranks)


def test_a_cpu_tensor_given_to_a_gpu_group_is_refused_with_a_message(two_ranks):
    with pytest.raises(ValueError, match="tensor on cpu but the group's collectives run on meta"):
        ld.all_gather_rows(torch.zeros(4, 3), GPU)
    with pytest.raises(ValueError, match="move it to the group's device"):
        check_device(torch.zeros(1), torch.device("cuda"), "broadcast")


def test_weight_buckets_are_packed_on_the_group_device():
    from learner.weight_sync import WeightSender

    sender = WeightSender("gloo")
    sender.device = GPU  # as an NCCL sender would have torch.device("cuda")
    specs = [WeightSpec("a", "float32", (4, 4)), WeightSpec("b", "float32", (3,))]
    tensors = iter([("a", torch.zeros(4, 4, device=GPU)), ("b", torch.zeros(3, device=GPU))])
    [bucket] = plan_buckets(specs, 1 << 20)
    payload = sender._pack(bucket, tensors, specs)
    assert payload.device.type == GPU.type and payload.dtype == torch.uint8


def test_learner_weights_stay_on_the_learner_device():
    from learner.worker import LearnerWorker

    worker = LearnerWorker.__new__(LearnerWorker)  # only the parameter stream is exercised
    worker.setup = SimpleNamespace(dtype="bfloat16")
    worker.policy = SimpleNamespace(module=torch.nn.Linear(4, 2, device=GPU))
    out = list(worker._full_parameters())
    assert [name for name, _ in out] == ["weight", "bias"]
    assert all(t.device.type == GPU.type and t.dtype == torch.bfloat16 for _, t in out)

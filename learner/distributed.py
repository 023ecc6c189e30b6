"""Collectives of the learner's data-parallel group (the DeepSpeed group).

Every rank of a step holds the whole step's batch but computes forward passes
for its own rows; these helpers put the rows back together and average
statistics. Each takes the group's device explicitly: NCCL accepts only CUDA
tensors and gloo only CPU ones, so a tensor built on the wrong device would
fail (or silently cross the bus) on a GPU cluster that no CPU test runs.
Imports only torch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from flywheel.collectives import check_device


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_gather_rows(local: Tensor, device: torch.device) -> Tensor:
    """Concatenate every rank's (b, ...) rows in rank order; all ranks pass the same shape."""
    if world_size() == 1:
        return local
    check_device(local, device, "all_gather_rows")
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean over ranks of each named scalar (every rank passes the same names)."""
    if world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}

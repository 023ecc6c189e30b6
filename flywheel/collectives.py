"""Collectives on a stateless process group (the weight-transfer group).

The learner's sender (`learner/weight_sync.py`) and the actors' receiver
(`actors/weight_receiver.py`) speak over a group built outside
torch.distributed's global state, so they call the group object directly
rather than `torch.distributed.broadcast`. Both sides use these helpers; every
tensor must live on the group's device (CPU for gloo, CUDA for NCCL), which
`group_device` names and `check_device` enforces with a message instead of a
backend error deep inside the collective. Imports only torch.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup


def group_device(backend: str) -> torch.device:
    """Where the buffers of a collective on this backend must live."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight-transfer backend must be 'gloo' (CPU) or 'nccl' (GPU), got {backend!r}")
    return torch.device("cuda") if backend == "nccl" else torch.device("cpu")


def check_device(tensor: torch.Tensor, device: torch.device, what: str) -> None:
    """Raise if `tensor` is not on the group's device type (NCCL rejects CPU tensors, gloo CUDA ones)."""
    if tensor.device.type != torch.device(device).type:
        raise ValueError(
            f"{what}: tensor on {tensor.device} but the group's collectives run on {device}; "
            "move it to the group's device before the collective"
        )


def broadcast_from_0(pg: ProcessGroup, tensor: torch.Tensor, device: torch.device) -> None:
    """In-place broadcast of `tensor` from group rank 0."""
    from torch.distributed import BroadcastOptions

    check_device(tensor, device, "broadcast")
    opts = BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    pg.broadcast([tensor], opts).wait()


def max_all_ranks(pg: ProcessGroup, value: int, device: torch.device) -> int:
    """The maximum of `value` over the group (the verdict and ack steps of a weight update)."""
    from torch.distributed import AllreduceOptions, ReduceOp

    t = torch.tensor([value], dtype=torch.int64, device=device)
    opts = AllreduceOptions()
    opts.reduceOp = ReduceOp.MAX
    pg.allreduce([t], opts).wait()
    return int(t.item())

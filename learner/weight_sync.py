"""Sending side of the learner -> rollout-actor weight sync (learner rank 0 only).

Topology: learner rank 0 and every rollout actor form one weight-transfer
process group, separate from the learner's own DeepSpeed group.  Rank 0 is the
learner; rollout actor i is rank 1 + i.  The backend is "gloo" on CPU and
"nccl" on GPU; the code is the same, only buffers live on "cuda" instead of
"cpu" for NCCL.  The group is "stateless" (built from its own TCPStore, never
touching torch.distributed's global state), the same construction as
`vllm.distributed.utils.stateless_init_torch_distributed_process_group`, which
the actors call; this module rebuilds it in plain torch because the learner
must not import vllm.  Rank 0 hosts the store at (master_addr, master_port),
and every rank must call its init at the same time.

One update, in order (the receiving half is `actors/weight_receiver.py`):
  0. the driver hands the same `WeightSyncMeta` to the sender and every actor
     (over Ray); the byte layout follows from it (`flywheel/weight_buckets.py`);
  1. verdict: all_reduce(MAX) of one int64 — each actor contributes 1 if it
     rejects the meta (unknown name, wrong shape or dtype), so nobody starts
     a transfer that someone will not finish;
  2. per bucket: broadcast a header [DATA, nbytes], then the flat uint8 bucket;
  3. a final header [DONE, 0] (or [ABORT, 0] if the learner failed while
     producing tensors, so the actors stop waiting instead of timing out);
  4. ack: all_reduce(MAX) of one int64 — each actor contributes 1 if loading
     failed, so the learner learns of it.
Every collective times out after `timeout_s` (set on the group).

Transport (`sync.transport`).  With gloo and every actor on the learner's
machine, a bucket need not cross a socket: rank 0 packs it into a shared
region (`flywheel/shared_region.py`) that every actor maps, and step 2's
header says HEADER_SHARED instead of HEADER_DATA, with no payload broadcast.
The region holds a whole update (`region_layout`).  Rank 0 creates it at the
first update: a header [MAP, size] and the region's address (pid, descriptor,
token) go to every actor, which maps it, and all_reduce(MAX) says whether one
could not (another machine); rank 0 then closes the address.  "auto" falls
back to the broadcast for good when an actor could not map it or the machine
could not hold it; "shm" stops the update instead; "broadcast" never tries.
NCCL always broadcasts.  Rank 0 writes the region again only after the next
update's verdict, which an actor joins only once its engine has finished the
last reload (vLLM keeps views of some buckets until then).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import TypeVar

import torch
from torch.distributed import PrefixStore, ProcessGroup
from torch.distributed.rendezvous import rendezvous

from flywheel.collectives import broadcast_from_0, group_device, max_all_ranks
from flywheel.hardware import torch_threads
from flywheel.records import WeightSpec, WeightSyncMeta
from flywheel.shared_region import SharedRegion
from flywheel.weight_buckets import (
    HEADER_ABORT,
    HEADER_DATA,
    HEADER_DONE,
    HEADER_MAP,
    HEADER_SHARED,
    Bucket,
    plan_buckets,
    region_layout,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
TRANSPORTS = ("auto", "shm", "broadcast")
# Torch threads that pack buckets into the shared region (see `WeightSender.send`).
PACK_THREADS_SHARED = 1


def tcp_uri(host: str, port: int) -> str:
    """Rendezvous URI, spelled exactly as vLLM's `get_tcp_uri` (the store prefix
    must match the actors' byte for byte)."""
    if ":" in host:  # IPv6 literal
        return f"tcp://[{host}]:{port}"
    return f"tcp://{host}:{port}"


def init_stateless_group(
    host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float
) -> ProcessGroup:
    """A process group that leaves torch.distributed's global state alone.

    Mirrors vLLM's `stateless_init_torch_distributed_process_group` (0.32):
    TCPStore through tcp:// rendezvous, a PrefixStore keyed by the URI, and one
    gloo or NCCL backend registered on a bare ProcessGroup, so that it
    interoperates with the actors, which call vLLM's own function.
    """
    timeout = timedelta(seconds=timeout_s)
    uri = tcp_uri(host, port)
    store, rank, world_size = next(rendezvous(uri, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    prefix_store = PrefixStore(uri, store)
    pg = ProcessGroup(prefix_store, rank, world_size)
    if backend == "gloo":
        from torch.distributed.distributed_c10d import ProcessGroupGloo

        impl = ProcessGroupGloo(prefix_store, rank, world_size, timeout=timeout)
        backend_type, device = ProcessGroup.BackendType.GLOO, torch.device("cpu")
    elif backend == "nccl":
        from torch.distributed.distributed_c10d import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        impl = ProcessGroupNCCL(prefix_store, rank, world_size, options)
        backend_type, device = ProcessGroup.BackendType.NCCL, torch.device("cuda")
    else:
        raise ValueError(
            f"weight-transfer backend must be 'gloo' (CPU) or 'nccl' (GPU), got {backend!r}"
        )
    pg._set_default_backend(backend_type)
    impl._set_sequence_number_for_group()
    pg._register_backend(device, backend_type, impl)
    return pg


def dtype_name(dtype: torch.dtype | str) -> str:
    """'torch.bfloat16' or torch.bfloat16 -> 'bfloat16' (the WeightSpec form)."""
    return str(dtype).removeprefix("torch.")


def _or_abort(pg: ProcessGroup, header: torch.Tensor, tensors: Iterator, produce: Callable[[], T]) -> T:
    """Run `produce` (which pulls tensors from the stream); if it raises, tell
    the actors to stop waiting for buckets (an ABORT header) and keep pace with
    the stream's remaining gathers before re-raising, so every process fails at
    once with a clear error instead of timing out."""
    try:
        return produce()
    except Exception:
        try:
            header.copy_(torch.tensor([HEADER_ABORT, 0]))
            broadcast_from_0(pg, header, header.device)
        finally:  # even if the group itself failed: the other learner ranks wait in their gathers
            _drain(tensors)
        raise


def _drain(tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Consume the rest of the stream after a failure: under ZeRO-3 each item
    is a gather the other learner ranks are waiting in, so rank 0 must keep
    pace with them or they hang."""
    try:
        for _ in tensors:
            pass
    except Exception:  # the stream itself failed; nothing more to keep pace with
        pass


def _expect_exhausted(tensors: Iterator[tuple[str, torch.Tensor]], count: int) -> None:
    extra = next(tensors, None)
    if extra is not None:
        raise ValueError(
            f"named_tensors yielded {extra[0]!r} after the {count} tensors the meta "
            "announced; the meta must list every tensor sent"
        )


class WeightSender:
    """Learner rank 0's end of the weight-transfer group."""

    def __init__(self, backend: str, transport: str = "auto"):
        """`transport`: "auto", "shm" or "broadcast" (see the module's docstring); an
        attribute a caller may change between updates."""
        self.backend = backend
        self.device = group_device(backend)
        if transport not in TRANSPORTS:
            raise ValueError(f"sync.transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if transport == "shm" and backend != "gloo":
            raise ValueError("sync.transport=shm carries CPU tensors and needs the gloo backend; "
                             "use sync.transport=auto or broadcast with nccl")
        self.transport = transport
        self._pg: ProcessGroup | None = None
        # One packing buffer, kept across buckets and updates: a fresh one per bucket
        # spent as long in page faults as in copying (the 77M model, bf16, on CPU).
        self._staging = torch.empty(0, dtype=torch.uint8, device=self.device)
        self._region: SharedRegion | None = None  # mapped by every actor of the group
        self._shm_refused = False  # an actor could not map a region, or /dev/shm could not hold one

    @property
    def transport_in_use(self) -> str:
        """"shm" while updates go through a shared region every actor has mapped, else "broadcast"."""
        return "shm" if self._region is not None and self._wants_shm() else "broadcast"

    def _wants_shm(self) -> bool:
        if self.backend != "gloo":
            return False
        return self.transport == "shm" or (self.transport == "auto" and not self._shm_refused)

    def init_group(
        self, master_addr: str, master_port: int, world_size: int, timeout_s: float
    ) -> None:
        """Join as rank 0 (and host the store); blocks until all actors join.

        Call it while every rollout actor calls `init_weight_transfer` with ranks
        1..world_size-1; world_size = 1 + number of rollout actors.
        """
        self._pg = init_stateless_group(
            master_addr, master_port, 0, world_size, self.backend, timeout_s
        )

    @staticmethod
    def make_meta(
        named_shapes_dtypes: Iterable[tuple[str, tuple[int, ...], torch.dtype | str]],
        version: int,
        bucket_bytes: int,
    ) -> WeightSyncMeta:
        """Describe an update: (HF name, shape, dtype) per tensor, in send order.

        The dtype must be the rollout engine's dtype (cast on the learner side):
        the actors reject a mismatch rather than cast silently.
        """
        specs = [
            WeightSpec(name=name, dtype=dtype_name(dtype), shape=tuple(int(s) for s in shape))
            for name, shape, dtype in named_shapes_dtypes
        ]
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise ValueError(f"weight {spec.name!r} appears twice in one update")
            seen.add(spec.name)
        plan_buckets(specs, bucket_bytes)  # validates bucket_bytes and dtypes now
        return WeightSyncMeta(version=int(version), specs=specs, bucket_bytes=int(bucket_bytes))

    def send(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], meta: WeightSyncMeta
    ) -> None:
        """Broadcast one update; runs while every actor runs `receive_weights(meta)`.

        `named_tensors` yields full tensors in `meta.specs` order, one at a time
        (a ZeRO-3 gather may produce each on demand); at most one bucket of them
        is held at once.  Raises if an actor rejected the meta or failed to load.
        """
        pg = self._require_group()
        if max_all_ranks(pg, 0, self.device):
            _drain(named_tensors)
            raise RuntimeError(
                f"a rollout actor rejected weight update version {meta.version} before "
                "any tensor was sent; its receive_weights error names the parameter"
            )
        tensors = iter(named_tensors)
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        buckets = plan_buckets(meta.specs, meta.bucket_bytes)
        offsets, size = region_layout(buckets)
        region = None
        if self._wants_shm() and size:
            region = _or_abort(pg, header, tensors, lambda: self._shared_region(pg, header, size))
        elif self._region is not None:  # the transport was changed to broadcast
            self._drop_region()
        for bucket, offset in zip(buckets, offsets):
            into = None if region is None else region.tensor[offset : offset + bucket.nbytes]
            # Into shared memory, the actors on this machine load bucket k (repacking it, several
            # times a copy's work, on their `sync.load_threads`) while bucket k+1 is packed: one
            # thread packs, so the copy does not take their cores.
            with torch_threads(PACK_THREADS_SHARED if region is not None else None):
                payload = _or_abort(pg, header, tensors, lambda: self._pack(bucket, tensors, meta.specs, into))
            header.copy_(torch.tensor([HEADER_DATA if region is None else HEADER_SHARED, bucket.nbytes]))
            broadcast_from_0(pg, header, self.device)
            if region is None:
                broadcast_from_0(pg, payload, self.device)
        _or_abort(pg, header, tensors, lambda: _expect_exhausted(tensors, len(meta.specs)))
        header.copy_(torch.tensor([HEADER_DONE, 0]))
        broadcast_from_0(pg, header, self.device)
        if max_all_ranks(pg, 0, self.device):
            raise RuntimeError(
                f"a rollout actor failed to load weight update version {meta.version}; "
                "see its receive_weights error"
            )

    def _pack(
        self,
        bucket: Bucket,
        tensors: Iterator[tuple[str, torch.Tensor]],
        specs: list[WeightSpec],
        into: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pull the bucket's tensors from the stream, check them, and lay them
        out as one flat uint8 tensor on the group's device (`into`, the bucket's
        place in the shared region, when given)."""
        flat_views = []
        for slot in bucket.slots:
            spec = specs[slot.index]
            try:
                name, tensor = next(tensors)
            except StopIteration:
                raise ValueError(
                    f"named_tensors ended before {spec.name!r} (tensor {slot.index} of "
                    f"{len(specs)} in the meta)"
                ) from None
            got = (name, dtype_name(tensor.dtype), tuple(tensor.shape))
            if got != (spec.name, spec.dtype, spec.shape):
                raise ValueError(
                    f"tensor {slot.index} of the update is {got[0]!r} {got[1]} {got[2]} but "
                    f"the meta announced {spec.name!r} {spec.dtype} {spec.shape}; yield "
                    "tensors in meta order with the announced dtype and shape"
                )
            flat_views.append(tensor.detach().reshape(-1).view(torch.uint8))
        if into is not None:
            payload = into
        elif len(flat_views) == 1:
            # Alone in its bucket (offset 0): send the tensor's own bytes, no copy.
            return flat_views[0].to(self.device).contiguous()
        else:
            if self._staging.numel() < bucket.nbytes:
                self._staging = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
            # Reused safely: every broadcast of a bucket has completed (waited) before the next is packed.
            payload = self._staging[: bucket.nbytes]
        for slot, flat in zip(bucket.slots, flat_views):
            payload[slot.offset : slot.offset + slot.nbytes].copy_(flat)
        return payload

    def _shared_region(self, pg: ProcessGroup, header: torch.Tensor, size: int) -> SharedRegion | None:
        """The region every actor has mapped, made and shared now if there is none of `size`;
        None when "auto" has to fall back to the broadcast."""
        if self._region is not None and self._region.nbytes == size:
            return self._region
        self._drop_region()
        try:
            region = SharedRegion.create(size)
        except OSError as exc:
            return self._no_region(f"could not make a shared region of {size / 2**20:.0f} MiB ({exc})")
        try:
            header.copy_(torch.tensor([HEADER_MAP, size]))
            broadcast_from_0(pg, header, self.device)
            broadcast_from_0(pg, torch.tensor(region.address(), dtype=torch.int64), self.device)
            unmapped = max_all_ranks(pg, 0, self.device)
        finally:
            region.release_address()  # every actor has mapped it or given up
        if unmapped:
            region.close()
            return self._no_region("a rollout actor could not map the learner's shared memory (it runs on "
                                   "another machine or in another pid namespace; its log says why)")
        log.info("weight sync: every actor mapped a %.0f MiB shared region; buckets go through it", size / 2**20)
        self._region = region
        return region

    def _no_region(self, why: str) -> None:
        if self.transport == "shm":  # _or_abort tells the actors to stop waiting
            raise RuntimeError(f"sync.transport=shm: {why}; set sync.transport=auto (falls back to the "
                               "broadcast) or broadcast")
        log.warning("weight sync: %s; updates go over the group (broadcast) from now on", why)
        self._shm_refused = True
        return None

    def _drop_region(self) -> None:
        if self._region is not None:
            self._region.close()
            self._region = None

    def _require_group(self) -> ProcessGroup:
        if self._pg is None:
            raise RuntimeError("WeightSender.send called before init_group")
        return self._pg

    def close(self) -> None:
        """Leave the group (the actors should drop theirs too)."""
        if self._pg is not None:
            self._pg.shutdown()
            self._pg = None
        self._drop_region()
        self._staging = torch.empty(0, dtype=torch.uint8, device=self.device)

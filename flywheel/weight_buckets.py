"""The wire layout of a weight update: which tensor goes in which bucket, where.

The learner (`learner/weight_sync.py`) and the rollout actors
(`actors/weight_receiver.py`) must cut the byte stream identically, and neither
may import the other, so the layout is defined once here.  Both sides compute
it from the same `WeightSyncMeta`; nothing about the layout travels on the wire.

Rule: tensors are taken in spec order and packed greedily into flat byte
buckets of at most `bucket_bytes`; each tensor starts at a multiple of `ALIGN`
bytes so the receiver can view its slice as the tensor's dtype without a copy;
a tensor larger than `bucket_bytes` travels alone in a bucket of its own size.

Standard library only: importing it costs nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from math import prod

from flywheel.records import WeightSpec

# Largest element size of any dtype we send (float64/int64) rounded up to 16, so
# every slice is aligned for a zero-copy `view(dtype)`.
ALIGN = 16

# Bytes per element of the dtypes a weight update may carry (torch names).
ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}

# Header codes of the wire protocol (one int64 pair [code, nbytes] before each
# bucket), shared by learner/weight_sync.py and actors/weight_receiver.py.
HEADER_DATA = 1  # the bucket's bytes follow over the group
HEADER_SHARED = 2  # the bucket's bytes lie in the mapped shared region, at its region offset
HEADER_MAP = 3  # map the shared region of nbytes named by the int64 pair that follows
HEADER_DONE = 0
HEADER_ABORT = -1


def spec_nbytes(spec: WeightSpec) -> int:
    """Size in bytes of the tensor `spec` describes."""
    if spec.dtype not in ITEMSIZE:
        raise ValueError(
            f"weight {spec.name!r}: dtype {spec.dtype!r} cannot be sent; "
            f"supported: {sorted(ITEMSIZE)}"
        )
    return ITEMSIZE[spec.dtype] * prod(spec.shape)


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives inside its bucket."""

    index: int  # position of the tensor in WeightSyncMeta.specs
    offset: int  # byte offset inside the bucket, a multiple of ALIGN
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    """One broadcast: a flat uint8 buffer of `nbytes` holding `slots`."""

    nbytes: int
    slots: tuple[Slot, ...]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(specs: list[WeightSpec], bucket_bytes: int) -> list[Bucket]:
    """Cut `specs` (in order) into buckets of at most `bucket_bytes` each.

    Worked example, bucket_bytes=64, ALIGN=16: tensors of 40, 8, 100 and 4 bytes
    give [0:40 at 0, 1:8 at 48] (56 bytes), then [2:100] alone (100 > 64),
    then [3:4] (4 bytes).
    """
    if bucket_bytes < ALIGN:
        raise ValueError(
            f"bucket_bytes must be >= {ALIGN}, got {bucket_bytes} "
            "(set weight_sync.bucket_bytes to a few MiB)"
        )
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    end = 0  # bytes used in the bucket being filled
    for index, spec in enumerate(specs):
        nbytes = spec_nbytes(spec)
        offset = _align(end)
        if slots and offset + nbytes > bucket_bytes:
            buckets.append(Bucket(nbytes=end, slots=tuple(slots)))
            slots, offset = [], 0
        slots.append(Slot(index=index, offset=offset, nbytes=nbytes))
        end = offset + nbytes
    if slots:
        buckets.append(Bucket(nbytes=end, slots=tuple(slots)))
    return buckets


def region_layout(buckets: list[Bucket]) -> tuple[list[int], int]:
    """Where each bucket lies in a shared region holding a whole update, and the region's size:
    the buckets one after another, each at a multiple of ALIGN."""
    offsets, end = [], 0
    for bucket in buckets:
        offsets.append(_align(end))
        end = offsets[-1] + bucket.nbytes
    return offsets, end


# ------------------------------------------------------------------ verification

def weight_digest(data) -> str:
    """A digest of one weight's bytes (anything with the buffer protocol: the float32
    array both sides widen a weight to), to compare weights across processes without
    sending them."""
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


def differing_weights(expected: dict[str, str], got: dict[str, str]) -> list[str]:
    """Names whose digests differ, are missing from `got`, or are not in `expected`, sorted."""
    return sorted(n for n in expected.keys() | got.keys() if expected.get(n) != got.get(n))

"""The weight-sync byte layout (flywheel/weight_buckets.py) and the sender's meta,
on hand-worked sizes; no process group, no vLLM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flywheel.records import WeightSpec
from flywheel.shared_region import SharedRegion
from flywheel.weight_buckets import ALIGN, differing_weights, plan_buckets, region_layout, weight_digest
from learner.weight_sync import WeightSender

ROOT = Path(__file__).resolve().parents[2]


def _spec(name: str, dtype: str, *shape: int) -> WeightSpec:
    return WeightSpec(name=name, dtype=dtype, shape=tuple(shape))


def test_plan_packs_in_order_aligns_and_isolates_big_tensors():
    assert ALIGN == 16
    specs = [
        _spec("a", "float32", 10),  # 40 bytes
        _spec("b", "bfloat16", 4),  # 8 bytes
        _spec("c", "float32", 25),  # 100 bytes > 64: alone
        _spec("d", "bfloat16", 2),  # 4 bytes
    ]
    buckets = plan_buckets(specs, bucket_bytes=64)
    # a at 0..40; b at align(40) = 48..56; c alone; d alone after it.
    assert [[(s.index, s.offset, s.nbytes) for s in b.slots] for b in buckets] == [
        [(0, 0, 40), (1, 48, 8)],
        [(2, 0, 100)],
        [(3, 0, 4)],
    ]
    assert [b.nbytes for b in buckets] == [56, 100, 4]
    # In a shared region the buckets follow one another, each aligned: 0..56, 64..164, 176..180.
    assert region_layout(buckets) == ([0, 64, 176], 180)


def test_plan_fills_a_bucket_exactly():
    # 16 + 16 + 32 = 64 bytes, all aligned: one bucket; the next tensor starts a new one.
    specs = [_spec("a", "float32", 4), _spec("b", "float32", 4), _spec("c", "float64", 4), _spec("d", "int8", 1)]
    assert [len(b.slots) for b in plan_buckets(specs, 64)] == [3, 1]


def test_plan_rejects_unknown_dtype_and_tiny_buckets():
    with pytest.raises(ValueError, match="'x'.*complex64"):
        plan_buckets([_spec("x", "complex64", 2)], 1024)
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([_spec("x", "float32", 2)], 8)


def test_make_meta_names_dtypes_and_duplicates():
    meta = WeightSender.make_meta(
        [("w", torch.Size([2, 3]), torch.bfloat16), ("b", (3,), "float32")], version=4, bucket_bytes=1024
    )
    assert meta.version == 4 and meta.bucket_bytes == 1024
    assert meta.specs == [_spec("w", "bfloat16", 2, 3), _spec("b", "float32", 3)]
    with pytest.raises(ValueError, match="'w' appears twice"):
        WeightSender.make_meta([("w", (1,), torch.float32)] * 2, version=1, bucket_bytes=1024)


def test_digests_tell_weights_apart_by_one_bit_and_name_every_difference():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = a.clone()
    b.view(torch.int32)[1, 2] ^= 1  # the lowest mantissa bit of one element
    digests = {"w": weight_digest(a.numpy()), "v": weight_digest(a.numpy())}
    assert weight_digest(a.clone().numpy()) == digests["w"]  # a copy of the same bytes
    assert weight_digest(b.numpy()) != digests["w"]
    # bf16 widened to float32 on both sides: equal bf16 weights give equal digests
    assert weight_digest(a.bfloat16().float().numpy()) == weight_digest(a.bfloat16().float().contiguous().numpy())
    got = {"w": weight_digest(b.numpy()), "u": digests["v"]}
    # w differs, v is missing from the actor's, u is one the learner does not have
    assert differing_weights(digests, got) == ["u", "v", "w"]
    assert differing_weights(digests, dict(digests)) == []


def test_sender_imports_no_vllm_ray_or_deepspeed():
    code = "import sys, learner.weight_sync; print(sorted({'vllm', 'ray', 'deepspeed'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_a_shared_region_is_one_memory_for_its_maker_and_a_mapper_and_has_no_name():
    made = SharedRegion.create(4096)
    pid, fd, token = made.address()
    mapped = SharedRegion.attach(pid, fd, token, 4096)
    made.tensor[100:104] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert mapped.tensor[100:104].tolist() == [1, 2, 3, 4]
    with pytest.raises(OSError, match="the update's layout 8192"):
        SharedRegion.attach(pid, fd, token, 8192)  # a layout of another size: an error, not garbage
    with pytest.raises(FileNotFoundError, match="another machine"):
        SharedRegion.attach(pid, fd, token ^ 1, 4096)  # another region at that address
    assert not [n for n in os.listdir("/dev/shm") if "flywheel" in n]  # nothing named to leave behind
    made.release_address()
    with pytest.raises(RuntimeError, match="released"):
        made.address()
    assert mapped.tensor[100:104].tolist() == [1, 2, 3, 4]  # the mappings outlive the address
    assert f"flywheel-weights-{token:016x}" in Path("/proc/self/maps").read_text()
    view = mapped.tensor[:8]
    mapped.close()  # a view outlives the close: the mapping goes with it
    made.close()
    assert view.sum().item() == 0
    del view
    assert f"flywheel-weights-{token:016x}" not in Path("/proc/self/maps").read_text()  # unmapped with the last view
    with pytest.raises(FileNotFoundError):
        SharedRegion.attach(2**22 + 7, 3, token, 4096)  # no such process here

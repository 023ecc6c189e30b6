"""The packing kernel for engines on zentorch (actors/zen_pack.py): bit for bit zentorch's own
packing where it applies, and False (the loader then uses zentorch's packing) everywhere else."""

from __future__ import annotations

import ctypes

import pytest
import torch

from actors import zen_pack
from actors.zen_pack import PACK_ENV, _fits, _Packer
from flywheel.hardware import zentorch_unavailable

needs_zentorch = pytest.mark.skipif(zentorch_unavailable() is not None, reason=f"{zentorch_unavailable()}")


def _bf16(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_the_kernel_takes_only_what_it_was_written_for():
    w = _bf16(128, 64)
    assert _fits(torch.empty_like(w), w)
    assert not _fits(torch.empty(128, 64), w.float())  # float32: zentorch lays it out otherwise
    assert not _fits(torch.empty(96, 64, dtype=torch.bfloat16), _bf16(96, 64))  # N not a multiple of 64
    assert not _fits(torch.empty(128, 63, dtype=torch.bfloat16), _bf16(128, 63))  # K odd: a pair would straddle rows
    assert not _fits(torch.empty(64, 128, dtype=torch.bfloat16).t(), w)  # the destination must be contiguous
    assert not _fits(torch.empty_like(w), _bf16(128, 128)[:, 1:65])  # rows not on 4-byte pairs


def test_without_a_compiler_the_loader_is_told_to_use_zentorchs_packing(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    packer, w = _Packer(), _bf16(64, 32)
    dst = torch.zeros_like(w)
    assert "could not be built" in packer.unavailable()
    assert not packer.pack_into(dst, w)
    assert not dst.view(torch.int16).any()  # untouched


@needs_zentorch
@pytest.mark.parametrize(("n", "k"), [(64, 30), (128, 768), (1280, 768), (768, 2048)])
def test_the_kernel_writes_exactly_what_zentorch_packs(n, k, monkeypatch):
    import zentorch  # noqa: F401  (its ops)

    monkeypatch.delenv(PACK_ENV, raising=False)
    wide = _bf16(n, k + 6)
    w = wide[:, 2 : 2 + k]  # a view with a longer row stride, as a part of a bucket or a fused layer can be
    theirs = torch.ops.zentorch.zentorch_weight_prepack_for_linear(w.contiguous())
    dst = torch.zeros_like(theirs)
    assert _Packer().pack_into(dst, w)
    assert torch.equal(dst.view(torch.int16), theirs.view(torch.int16))


@needs_zentorch
def test_a_kernel_that_disagrees_with_zentorch_is_not_used(monkeypatch):
    monkeypatch.delenv(PACK_ENV, raising=False)
    packer = _Packer()
    assert packer.unavailable() is None

    def plain_copy(src, ld, dst, k2, p0, p1):  # rows as they are: not zentorch's layout
        n = (p1 - p0) * zen_pack.PANEL
        out = torch.frombuffer((ctypes.c_uint32 * (n * k2)).from_address(dst), dtype=torch.int32)
        inp = torch.frombuffer((ctypes.c_uint32 * (n * ld)).from_address(src), dtype=torch.int32)
        out.view(n, k2).copy_(inp.view(n, ld)[:, :k2])

    packer._fn = plain_copy
    w, dst = _bf16(128, 64), torch.zeros(128, 64, dtype=torch.bfloat16)
    assert not packer.pack_into(dst, w)
    assert not dst.view(torch.int16).any()


@needs_zentorch
def test_the_switch_forces_zentorchs_packing(monkeypatch):
    monkeypatch.setenv(PACK_ENV, "zentorch")
    w, dst = _bf16(128, 64), torch.zeros(128, 64, dtype=torch.bfloat16)
    assert _Packer().unavailable() == f"{PACK_ENV}=zentorch"
    assert not _Packer().pack_into(dst, w)
    assert not dst.view(torch.int16).any()

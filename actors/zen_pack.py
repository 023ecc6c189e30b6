"""zentorch's blocked layout for bf16 linear weights, written straight into place by a small C
kernel: how the in-place loader (`actors/cpu_weights.py`) updates an engine on zentorch.

zentorch's own packing (`zentorch_weight_prepack_for_linear`) returns a new tensor, which then
has to be copied into the one the engine computes with: two passes over every weight, on the
actor's cores, in every sync.  zentorch 2.13 lays an (N, K) bf16 weight out as
[N/64][K/2][64][2]: panels of 64 output rows, and in each the rows' pairs of neighbouring inputs
(the pairs an AVX512-BF16 dot product takes) one after another.  Within a panel that is a
transpose of 4-byte pairs, which the kernel below does in one pass: SSE2 4x4 transposes (SSE2 is
on every x86-64 CPU, so no build flags tie the library to one CPU), with non-temporal stores,
since nothing reads the packed weight again before the next generation.  It runs on the
loading thread alone: during a sync the learner copies the next bucket on the other core, and
splitting the panels over two threads made one-actor syncs no faster (benchmarks/weight_sync.py
with sync.load_threads 1 and 2).

The layout is zentorch's and could change with it: `pack_into` first checks, once per weight
shape, that the kernel's output equals zentorch's packing bit for bit.  For anything else (a
dtype other than bf16, N not a multiple of 64, a layout that no longer matches, no C compiler)
it returns False and the loader uses zentorch's packing.  `FLYWHEEL_ZENTORCH_PACK=zentorch`
forces that (the benchmark's baseline, benchmarks/weight_sync.py).

The library is built once per machine with the system C compiler (about half a second) into
the Flywheel cache (`FLYWHEEL_CACHE`, default ~/.cache/flywheel/native/).

Imports torch only; zentorch only to check a shape, which only happens in an engine on zentorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# "auto": the kernel wherever it is checked to match zentorch; "zentorch": zentorch's packing always.
PACK_ENV = "FLYWHEEL_ZENTORCH_PACK"
PANEL = 64  # output rows per panel of zentorch's bf16 layout
BUILD_TIMEOUT_S = 120.0

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <emmintrin.h>

/* Panels [p0, p1) of an (N, 2 * k2) bf16 weight whose rows lie `ld` 4-byte pairs apart, into
   dst laid out [N / 64][k2][64] in 4-byte pairs. dst must be 16-byte aligned. */
void flywheel_zen_pack_bf16(const uint32_t *src, int64_t ld, uint32_t *dst, int64_t k2,
                            int64_t p0, int64_t p1) {
  const int64_t k4 = k2 & ~(int64_t)3;
  for (int64_t nb = p0; nb < p1; ++nb) {
    const uint32_t *sp = src + nb * 64 * ld;
    uint32_t *dp = dst + nb * k2 * 64;
    for (int64_t k = 0; k < k4; k += 4) {
      for (int r = 0; r < 64; r += 4) {
        __m128 a0 = _mm_castsi128_ps(_mm_loadu_si128((const __m128i *)(sp + (r + 0) * ld + k)));
        __m128 a1 = _mm_castsi128_ps(_mm_loadu_si128((const __m128i *)(sp + (r + 1) * ld + k)));
        __m128 a2 = _mm_castsi128_ps(_mm_loadu_si128((const __m128i *)(sp + (r + 2) * ld + k)));
        __m128 a3 = _mm_castsi128_ps(_mm_loadu_si128((const __m128i *)(sp + (r + 3) * ld + k)));
        _MM_TRANSPOSE4_PS(a0, a1, a2, a3); /* shuffles only: the bits move unchanged */
        _mm_stream_si128((__m128i *)(dp + (k + 0) * 64 + r), _mm_castps_si128(a0));
        _mm_stream_si128((__m128i *)(dp + (k + 1) * 64 + r), _mm_castps_si128(a1));
        _mm_stream_si128((__m128i *)(dp + (k + 2) * 64 + r), _mm_castps_si128(a2));
        _mm_stream_si128((__m128i *)(dp + (k + 3) * 64 + r), _mm_castps_si128(a3));
      }
    }
    for (int64_t k = k4; k < k2; ++k)
      for (int r = 0; r < 64; ++r) memcpy(dp + k * 64 + r, sp + r * ld + k, 4);
  }
  _mm_sfence();
}
"""


class _Packer:
    """The built kernel and the shapes checked against zentorch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fn = None
        self._unavailable: str | None = None  # why the kernel cannot be used at all, once known
        self._checked: dict[tuple[int, int], bool] = {}

    def unavailable(self) -> str | None:
        """Why the kernel is not used at all (the environment, the build), or None."""
        if os.environ.get(PACK_ENV, "auto").strip().lower() == "zentorch":
            return f"{PACK_ENV}=zentorch"
        with self._lock:
            if self._fn is None and self._unavailable is None:
                try:
                    self._fn = _load_library()
                except Exception as exc:  # no compiler, a read-only cache: zentorch's packing still works
                    self._unavailable = f"the packing kernel could not be built ({exc})"
                    log.warning("zentorch layers: %s; zentorch's own packing is used", self._unavailable)
            return self._unavailable

    def pack_into(self, dst: torch.Tensor, weight: torch.Tensor) -> bool:
        """Write `weight` (N, K) into `dst` (N, K, contiguous) in zentorch's bf16 layout; False, with
        `dst` untouched, where the kernel does not apply (the caller then uses zentorch's packing)."""
        if not _fits(dst, weight) or self.unavailable() is not None:
            return False
        shape = tuple(weight.shape)
        if shape not in self._checked:
            self._checked[shape] = self._matches_zentorch(shape)
        if not self._checked[shape]:
            return False
        self._run(dst, weight)
        return True

    def _run(self, dst: torch.Tensor, weight: torch.Tensor) -> None:
        n, k = weight.shape
        self._fn(weight.data_ptr(), weight.stride(0) // 2, dst.data_ptr(), k // 2, 0, n // PANEL)

    def _matches_zentorch(self, shape: tuple[int, int]) -> bool:
        import zentorch  # noqa: F401  (its ops)

        weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        ours = torch.empty_like(weight)
        self._run(ours, weight)
        theirs = torch.ops.zentorch.zentorch_weight_prepack_for_linear(weight)
        same = tuple(theirs.shape) == shape and torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
        if not same:
            log.warning("zentorch layers of shape %s: zentorch lays them out otherwise than [N/64][K/2][64][2]; "
                        "zentorch's own packing is used for them", shape)
        return same


def _fits(dst: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernel's preconditions: bf16 (N, K) with N a multiple of 64 and K even, rows of 4-byte
    aligned pairs; `dst` a 16-byte aligned contiguous tensor of the same shape and dtype."""
    if weight.dtype != torch.bfloat16 or dst.dtype != torch.bfloat16 or weight.dim() != 2:
        return False
    n, k = weight.shape
    return (tuple(dst.shape) == (n, k) and n % PANEL == 0 and k % 2 == 0 and n > 0
            and weight.stride(1) == 1 and weight.stride(0) % 2 == 0 and weight.data_ptr() % 4 == 0
            and dst.is_contiguous() and dst.data_ptr() % 16 == 0)


def _load_library():
    """The kernel, built into the cache on first use (atomically: several actors may start at once)."""
    from flywheel.tiny_model import default_cache_root

    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
    out = default_cache_root() / "native" / f"zen_pack-{digest}.so"
    if not out.exists():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise RuntimeError("no C compiler (cc or gcc) on PATH; install gcc")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            source, built = Path(tmp) / "zen_pack.c", Path(tmp) / "zen_pack.so"
            source.write_text(_SOURCE)
            done = subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-o", str(built), str(source)],
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(built, out)
    fn = ctypes.CDLL(str(out)).flywheel_zen_pack_bf16
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    fn.restype = None
    return fn


PACKER = _Packer()

"""What the machine can compute, and the dtype a run chooses for it.

CPUs differ in a way that changes a run's speed by an order of magnitude:
some compute bf16 natively (AVX512-BF16 or AMX), others emulate it and run
about 70x slower per matrix product than in float32 (about 25x slower end to
end). `resolve_dtype` turns `model.dtype` (auto, bfloat16, float32) into the
dtype a run uses, with the reason, and a warning when an explicit bfloat16 will
be slow. Standard library only; torch is imported inside functions that ask
about CUDA.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

DTYPES = ("auto", "bfloat16", "float32")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU facts a run's choices depend on."""

    model: str  # e.g. "AMD EPYC" or "Intel(R) Xeon(R) Platinum 8480+"
    vendor: str  # e.g. "AuthenticAMD", "GenuineIntel"
    flags: frozenset[str] = field(default_factory=frozenset)
    cores: int = 1  # logical cores this process may run on
    cores_total: int = 1  # logical cores of the machine
    memory_bytes: int = 0  # total memory; 0 if unknown
    memory_available_bytes: int = 0

    @property
    def has_avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def has_avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def has_amx(self) -> bool:
        return bool({"amx_bf16", "amx_tile"} & self.flags)

    @property
    def native_bf16(self) -> bool:
        """True where bf16 matrix products run in hardware (AVX512-BF16 dot products or AMX tiles)."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def kind(self) -> str:
        """A short name of the capability class, as the docs and benchmark results use it."""
        if self.has_amx and self.native_bf16:
            return "AVX-512 + AMX (native bf16)"
        if self.has_avx512 and self.native_bf16:
            return "AVX-512 + AVX512_BF16 (native bf16)"
        if self.has_avx512:
            return "AVX-512 (no native bf16)"
        if self.has_avx2:
            return "AVX2 only (no native bf16)"
        return "no AVX2"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _meminfo_bytes(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            parts = line.split()
            return int(parts[1]) * (1024 if len(parts) > 2 and parts[2].lower() == "kb" else 1)
    return 0


def read_cpu_info(cpuinfo_text: str | None = None, meminfo_text: str | None = None) -> CpuInfo:
    """Parse /proc/cpuinfo and /proc/meminfo (or the given texts); falls back to
    `platform` and `os` where /proc is missing."""
    text = cpuinfo_text if cpuinfo_text is not None else _read("/proc/cpuinfo") or ""
    model = vendor = ""
    flags: frozenset[str] = frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    mem = meminfo_text if meminfo_text is not None else _read("/proc/meminfo") or ""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return CpuInfo(
        model=model or platform.processor() or platform.machine() or "unknown",
        vendor=vendor or "unknown",
        flags=flags,
        cores=cores,
        cores_total=os.cpu_count() or cores,
        memory_bytes=_meminfo_bytes(mem, "MemTotal"),
        memory_available_bytes=_meminfo_bytes(mem, "MemAvailable"),
    )


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run uses, why, and a warning when the choice will be slow."""

    dtype: str  # "bfloat16" or "float32"
    reason: str
    warning: str | None = None


def cuda_bf16_supported() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except Exception:  # no torch, or a broken CUDA set-up: treat as no bf16
        return False


def resolve_dtype(
    requested: str, device: str, cpu: CpuInfo | None = None, cuda_bf16: bool | None = None
) -> DtypeChoice:
    """Turn `model.dtype` into "bfloat16" or "float32" for `device` ("cpu" or "cuda").

    auto: bfloat16 where the device computes it natively, float32 elsewhere.
    An explicit dtype is kept; an explicit bfloat16 on a CPU without native bf16
    comes with a warning that says why it is slow and what to set.
    """
    if requested not in DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    if device == "cuda":
        native = cuda_bf16_supported() if cuda_bf16 is None else cuda_bf16
        where = "this GPU computes bf16" if native else "this GPU has no bf16 support"
        if requested == "auto":
            return DtypeChoice("bfloat16" if native else "float32", f"auto: {where}")
        return DtypeChoice(requested, f"set explicitly ({where})")
    cpu = cpu or read_cpu_info()
    where = f"{cpu.model}, {cpu.kind}"
    if requested == "auto":
        dtype = "bfloat16" if cpu.native_bf16 else "float32"
        return DtypeChoice(dtype, f"auto: {where}")
    warning = None
    if requested == "bfloat16" and not cpu.native_bf16:
        warning = (
            f"model.dtype=bfloat16 on a CPU without native bf16 ({where}): bf16 matrix products are "
            "emulated there, about 70x slower than float32, and a run about 25x slower end to end. "
            "Set model.dtype=auto (or float32) unless you are checking bf16 numerics"
        )
    return DtypeChoice(requested, f"set explicitly ({where})", warning)

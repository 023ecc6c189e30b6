"""CPU capability from /proc/cpuinfo, and the dtype `model.dtype` resolves to.

The three kinds seen on development machines: Intel with AMX, AMD EPYC with
AVX512-BF16 but no AMX (bf16 matmul ~850 GFLOP/s on 2 threads against ~200 in
fp32), and AMD EPYC with AVX2 only (bf16 ~70x slower than fp32).
"""

from __future__ import annotations

import pytest

from flywheel.hardware import read_cpu_info, resolve_dtype

MEMINFO = "MemTotal:       24600000 kB\nMemFree:        20000000 kB\nMemAvailable:   23000000 kB\n"


def _cpuinfo(model: str, vendor: str, flags: str) -> str:
    block = f"processor\t: {{i}}\nvendor_id\t: {vendor}\nmodel name\t: {model}\nflags\t\t: fpu sse2 {flags}\n\n"
    return block.format(i=0) + block.format(i=1)


INTEL_AMX = _cpuinfo("Intel(R) Xeon(R) Platinum 8480+", "GenuineIntel", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
EPYC_BF16 = _cpuinfo("AMD EPYC", "AuthenticAMD", "avx2 avx512f avx512_bf16")
EPYC_AVX2 = _cpuinfo("AMD EPYC", "AuthenticAMD", "avx2 fma")


@pytest.mark.parametrize("text, kind, native", [
    (INTEL_AMX, "AVX-512 + AMX (native bf16)", True),
    (EPYC_BF16, "AVX-512 + AVX512_BF16 (native bf16)", True),
    (EPYC_AVX2, "AVX2 only (no native bf16)", False),
])
def test_kinds(text, kind, native):
    cpu = read_cpu_info(text, MEMINFO)
    assert cpu.kind == kind and cpu.native_bf16 is native and cpu.has_avx2
    assert cpu.memory_bytes == 24600000 * 1024 and cpu.memory_available_bytes == 23000000 * 1024


@pytest.mark.parametrize("text, auto", [(INTEL_AMX, "bfloat16"), (EPYC_BF16, "bfloat16"), (EPYC_AVX2, "float32")])
def test_auto_picks_bf16_only_where_native(text, auto):
    cpu = read_cpu_info(text, MEMINFO)
    choice = resolve_dtype("auto", "cpu", cpu)
    assert choice.dtype == auto and choice.warning is None and cpu.kind in choice.reason
    assert resolve_dtype("float32", "cpu", cpu) .dtype == "float32"


def test_explicit_bf16_without_native_support_runs_with_a_warning():
    slow = resolve_dtype("bfloat16", "cpu", read_cpu_info(EPYC_AVX2, MEMINFO))
    assert slow.dtype == "bfloat16"
    assert "25x slower" in slow.warning and "model.dtype=auto" in slow.warning
    assert resolve_dtype("bfloat16", "cpu", read_cpu_info(INTEL_AMX, MEMINFO)).warning is None
    assert resolve_dtype("float32", "cpu", read_cpu_info(EPYC_AVX2, MEMINFO)).warning is None


def test_cuda_follows_the_gpu():
    assert resolve_dtype("auto", "cuda", cuda_bf16=True).dtype == "bfloat16"
    assert resolve_dtype("auto", "cuda", cuda_bf16=False).dtype == "float32"


def test_unknown_dtype_names_the_valid_ones():
    with pytest.raises(ValueError, match="model.dtype must be one of auto, bfloat16, float32, got 'fp16'"):
        resolve_dtype("fp16", "cpu")


def test_this_machine_parses():
    cpu = read_cpu_info()
    assert cpu.cores >= 1 and cpu.model

"""CPU capability from /proc/cpuinfo, and the dtype `model.dtype` resolves to.

The four kinds seen on development machines: Intel with AMX, AMD EPYC with
AVX512-BF16 but no AMX (bf16 matmul ~850 GFLOP/s on 2 threads against ~200 in
fp32), an Intel Xeon with AVX512-BF16 whose hypervisor hides AMX (bf16 ~135
GFLOP/s against ~190 in fp32: slower), and AMD EPYC with AVX2 only (bf16 ~70x
slower than fp32).  Where AVX512-BF16 comes without AMX, `auto` asks measured
matrix-multiply rates; these tests hand it fixed ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flywheel.hardware import (EMULATE_ENV, GemmRates, actor_threads, apply_cpu_emulation, cpu_gemm_choice,
                               emulation_env, gemm_rates, measure_gemm_rates, read_cpu_info, resolve_dtype)

# 24,600,000 kB total and 23,000,000 kB available, in bytes: x 1024.
MEMINFO = "MemTotal:       24600000 kB\nMemFree:        20000000 kB\nMemAvailable:   23000000 kB\n"


def _cpuinfo(model: str, vendor: str, flags: str) -> str:
    """Two processor blocks, as /proc/cpuinfo lists them on a 2-core machine."""
    block = f"processor\t: {{i}}\nvendor_id\t: {vendor}\nmodel name\t: {model}\nflags\t\t: fpu sse2 {flags}\n\n"
    return block.format(i=0) + block.format(i=1)


INTEL_AMX = _cpuinfo("Intel(R) Xeon(R) Platinum 8480+", "GenuineIntel", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
EPYC_BF16 = _cpuinfo("AMD EPYC", "AuthenticAMD", "avx2 avx512f avx512_bf16")
EPYC_AVX2 = _cpuinfo("AMD EPYC", "AuthenticAMD", "avx2 fma")
SKYLAKE = _cpuinfo("Intel(R) Xeon(R) Gold 6148", "GenuineIntel", "avx2 avx512f")  # AVX-512, no bf16
OLD = _cpuinfo("Intel(R) Xeon(R) E5-2670", "GenuineIntel", "avx")  # before AVX2


@pytest.mark.parametrize("text, model, vendor, kind, avx512, amx, native", [
    (INTEL_AMX, "Intel(R) Xeon(R) Platinum 8480+", "GenuineIntel", "AVX-512 + AMX (native bf16)", True, True, True),
    (EPYC_BF16, "AMD EPYC", "AuthenticAMD", "AVX-512 + AVX512_BF16 (native bf16)", True, False, True),
    (EPYC_AVX2, "AMD EPYC", "AuthenticAMD", "AVX2 only (no native bf16)", False, False, False),
    (SKYLAKE, "Intel(R) Xeon(R) Gold 6148", "GenuineIntel", "AVX-512 (no native bf16)", True, False, False),
])
def test_parses_each_kind(text, model, vendor, kind, avx512, amx, native):
    cpu = read_cpu_info(text, MEMINFO)
    assert (cpu.model, cpu.vendor, cpu.kind) == (model, vendor, kind)
    assert (cpu.has_avx2, cpu.has_avx512, cpu.has_amx, cpu.native_bf16) == (True, avx512, amx, native)
    assert cpu.memory_bytes == 24600000 * 1024 and cpu.memory_available_bytes == 23000000 * 1024


def test_before_avx2_and_without_proc():
    old = read_cpu_info(OLD, MEMINFO)
    assert old.kind == "no AVX2" and not old.has_avx2
    # No /proc at all: nothing known, so no flags, "no AVX2", and auto stays on float32.
    bare = read_cpu_info("", "")
    assert bare.model and bare.vendor == "unknown" and bare.flags == frozenset()
    assert bare.memory_bytes == 0 and bare.cores >= 1
    assert resolve_dtype("auto", "cpu", bare).dtype == "float32"
    # A truncated meminfo line reads as unknown, not as a crash.
    assert read_cpu_info(EPYC_AVX2, "MemTotal:\n").memory_bytes == 0


# bf16 against float32 matrix-multiply rates (GFLOP/s) as measured on the two AVX512-BF16 kinds without AMX.
ZEN4_RATES = GemmRates(bfloat16=850.0, float32=200.0, threads=2)
HIDDEN_AMX_RATES = GemmRates(bfloat16=135.0, float32=190.0, threads=2)


def _not_asked() -> GemmRates:
    raise AssertionError("the rates were asked for a kind whose flags settle the dtype")


# (cpuinfo, model.dtype, chosen dtype, warned): only an explicit bf16 on the AVX2 kind warns.
CASES = [
    (INTEL_AMX, "auto", "bfloat16", False), (INTEL_AMX, "bfloat16", "bfloat16", False),
    (INTEL_AMX, "float32", "float32", False),
    (EPYC_BF16, "auto", "bfloat16", False), (EPYC_BF16, "bfloat16", "bfloat16", False),
    (EPYC_BF16, "float32", "float32", False),
    (EPYC_AVX2, "auto", "float32", False), (EPYC_AVX2, "bfloat16", "bfloat16", True),
    (EPYC_AVX2, "float32", "float32", False),
]


@pytest.mark.parametrize("text, requested, dtype, warned", CASES)
def test_resolve_dtype_on_cpu(text, requested, dtype, warned):
    cpu = read_cpu_info(text, MEMINFO)
    rates = (lambda: ZEN4_RATES) if text == EPYC_BF16 else _not_asked
    choice = resolve_dtype(requested, "cpu", cpu, rates=rates)
    assert choice.dtype == dtype
    assert (choice.warning is not None) is warned
    assert cpu.kind in choice.reason and cpu.model in choice.reason and choice.reason.endswith(".")


def test_avx512_bf16_without_amx_takes_the_faster_measured_dtype():
    cpu = read_cpu_info(EPYC_BF16, MEMINFO)
    fast = resolve_dtype("auto", "cpu", cpu, rates=lambda: ZEN4_RATES)
    assert fast.dtype == "bfloat16" and "4.25x float32's rate (850 against 200 GFLOP/s on 2 thread(s)" in fast.reason
    slow = resolve_dtype("auto", "cpu", cpu, rates=lambda: HIDDEN_AMX_RATES)
    assert slow.dtype == "float32" and slow.warning is None
    assert "0.71x float32's rate (135 against 190 GFLOP/s" in slow.reason and cpu.kind in slow.reason
    explicit = resolve_dtype("bfloat16", "cpu", cpu, rates=lambda: HIDDEN_AMX_RATES)
    assert explicit.dtype == "bfloat16"
    assert "slower than in float32" in explicit.warning and "model.dtype=float32" in explicit.warning
    assert resolve_dtype("float32", "cpu", cpu, rates=lambda: HIDDEN_AMX_RATES).warning is None


def test_gemm_rates_are_measured_once_per_machine_and_kept(tmp_path):
    cpu = read_cpu_info(EPYC_BF16, MEMINFO)
    calls = []

    def measure():
        calls.append(1)
        return HIDDEN_AMX_RATES

    first = gemm_rates(cpu, tmp_path, measure)
    again = gemm_rates(cpu, tmp_path, measure)
    assert len(calls) == 1 and (again.bfloat16, again.float32, again.threads) == (135.0, 190.0, 2)
    assert "measured now" in first.where and "measured once" in again.where and str(tmp_path) in again.where
    other = gemm_rates(read_cpu_info(INTEL_AMX, MEMINFO), tmp_path, measure)  # another machine: its own entry
    assert len(calls) == 2 and "measured now" in other.where
    (tmp_path / "gemm_rates.json").write_text("{not json")  # a damaged file is measured over, not fatal
    assert gemm_rates(cpu, tmp_path, measure).float32 == 190.0 and len(calls) == 3


def test_measure_gemm_rates_times_both_dtypes_on_this_machine():
    pytest.importorskip("torch")
    rates = measure_gemm_rates(threads=1, rounds=1)
    assert rates.threads == 1 and rates.bfloat16 > 0 and rates.float32 > 0
    assert rates.bf16_over_fp32 == rates.bfloat16 / rates.float32


def test_explicit_bf16_warning_says_how_slow_and_what_to_set():
    warning = resolve_dtype("bfloat16", "cpu", read_cpu_info(EPYC_AVX2, MEMINFO)).warning
    assert "AVX2 only" in warning and "25x" in warning
    assert "model.dtype=auto" in warning and "model.dtype=float32" in warning


@pytest.mark.parametrize("requested, bf16, dtype, word", [
    ("auto", True, "bfloat16", "supports"),
    ("auto", False, "float32", "does not support"),
    ("bfloat16", False, "bfloat16", "does not support"),  # explicit is kept
    ("float32", True, "float32", "supports"),
])
def test_cuda_follows_the_gpu(requested, bf16, dtype, word):
    choice = resolve_dtype(requested, "cuda", cuda_bf16=bf16)
    assert choice.dtype == dtype and choice.warning is None
    assert f"GPU {word} bf16" in choice.reason


def test_cuda_without_a_visible_gpu_stays_on_float32():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    choice = resolve_dtype("auto", "cuda")
    assert (choice.dtype, choice.reason) == ("float32", "auto chose float32: torch sees no CUDA device.")


def test_bad_values_name_the_valid_ones():
    with pytest.raises(ValueError, match="model.dtype must be one of auto, bfloat16, float32, got 'fp16'"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="run.device must be one of cpu, cuda, got 'tpu'"):
        resolve_dtype("auto", "tpu")


@pytest.mark.parametrize("num_cpus, num_threads, threads", [
    (1.0, None, 1),  # Ray's default: one thread per actor
    (0.5, None, 1),  # a fraction still gets one
    (2.5, None, 2),  # floor
    (1.0, 2, 2),  # learner.num_threads: 2 in the demo config
])
def test_actor_threads_follow_ray(num_cpus, num_threads, threads):
    assert actor_threads(num_cpus, num_threads) == threads


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc")
def test_this_machine_matches_proc():
    cpu = read_cpu_info()
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    if models:  # x86; ARM's /proc/cpuinfo has no model name
        assert cpu.model == models[0]
    assert cpu.cores == len(os.sched_getaffinity(0)) and cpu.memory_bytes > 0


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc")
def test_emulated_avx2_hides_what_an_avx2_machine_lacks(monkeypatch):
    real = read_cpu_info()
    monkeypatch.setenv(EMULATE_ENV, "avx2")
    cpu = read_cpu_info()
    assert cpu.emulated_from == real.kind and real.emulated_from is None
    assert not any(f.startswith(("avx512", "amx", "avx_vnni")) for f in cpu.flags)
    assert cpu.flags == {f for f in real.flags if not f.startswith(("avx512", "amx", "avx_vnni"))}
    if real.has_avx2:
        assert cpu.kind == "AVX2 only (no native bf16)"
    assert resolve_dtype("auto", "cpu").dtype == "float32"  # what auto picks on an AVX2-only machine
    # A given text is another machine's: never masked.
    assert read_cpu_info(INTEL_AMX, MEMINFO).kind == "AVX-512 + AMX (native bf16)"


def test_emulation_settings_and_bad_values(monkeypatch):
    env = emulation_env("avx2")
    # Every library that picks its instructions on its own is told: ATen, oneDNN (both names), MKL, Inductor.
    assert env == {EMULATE_ENV: "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                   "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "TORCHINDUCTOR_CPP_MARCH": "haswell"}
    monkeypatch.delenv(EMULATE_ENV, raising=False)
    assert apply_cpu_emulation() is None  # unset: nothing changes
    monkeypatch.setenv(EMULATE_ENV, "avx1")
    with pytest.raises(ValueError, match="FLYWHEEL_EMULATE_CPU must be one of avx2 or unset, got 'avx1'"):
        read_cpu_info()
    with pytest.raises(ValueError, match="can emulate avx2, not 'sse'"):
        emulation_env("sse")


@pytest.mark.parametrize("text, installed, library, why", [
    (EPYC_BF16, True, "zentorch", None),  # vLLM's ZenCpuPlatform: AMD with AVX-512 and zentorch importable
    (EPYC_BF16, False, "onednn", "zentorch is not installed"),
    (EPYC_AVX2, True, "onednn", "needs an AMD CPU with AVX-512"),
    (INTEL_AMX, True, "onednn", "needs an AMD CPU with AVX-512"),  # zentorch is AMD's
])
def test_cpu_gemm_follows_vllms_zentorch_rule(text, installed, library, why, monkeypatch):
    import importlib.util
    import sys

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "zentorch" else find_spec(name, *a))
    monkeypatch.delitem(sys.modules, "zentorch", raising=False)
    cpu = read_cpu_info(text, MEMINFO)
    chosen, reason = cpu_gemm_choice("auto", cpu)
    assert chosen == library and (why is None or why in reason), reason
    assert cpu_gemm_choice("onednn", cpu)[0] == "onednn"  # asked for: oneDNN whatever the machine
    if why is None:
        assert cpu_gemm_choice("zentorch", cpu)[0] == "zentorch"
    else:  # asked for where it cannot be had: an error naming why and what to set
        with pytest.raises(ValueError, match=f"rollout.cpu_gemm=zentorch cannot be had: .*{why}.*rollout.cpu_gemm"):
            cpu_gemm_choice("zentorch", cpu)
    with pytest.raises(ValueError, match="rollout.cpu_gemm must be one of auto, onednn, zentorch, got 'mkl'"):
        cpu_gemm_choice("mkl", cpu)


def test_forgoing_zentorch_keeps_vllm_on_its_onednn_platform():
    """In a fresh process: after `forgo_zentorch`, zentorch does not import, so vLLM (which reads
    /proc/cpuinfo itself) takes its generic CPU platform even on an AMD CPU with AVX-512; and once
    zentorch is imported it is too late, which the error says."""
    import subprocess
    import sys

    code = (
        "from flywheel.hardware import forgo_zentorch, zentorch_unavailable\n"
        "forgo_zentorch()\n"
        "assert zentorch_unavailable()\n"
        "try:\n    import zentorch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('zentorch imported')\n"
        "from vllm.platforms import current_platform\n"
        "print(type(current_platform).__name__, current_platform.is_zen_cpu())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["CpuPlatform", "False"], out.stdout
    late = subprocess.run([sys.executable, "-c", "import zentorch\nfrom flywheel.hardware import forgo_zentorch\n"
                           "forgo_zentorch()"], capture_output=True, text=True, timeout=300)
    if "No module named 'zentorch'" in late.stderr:
        pytest.skip("zentorch is not installed here")
    assert late.returncode != 0, late.stdout
    assert "zentorch is already imported" in late.stderr and "rollout.cpu_gemm" in late.stderr, late.stderr[-2000:]

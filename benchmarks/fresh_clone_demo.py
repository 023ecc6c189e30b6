"""The README's first command, timed as a new user meets it: clone the repository
into a temporary folder, run `make setup` (a new .venv), then `make demo`.

    python benchmarks/fresh_clone_demo.py [--keep]

Prints the set-up time, the demo's wall time and its gold reward, and writes
benchmarks/results/fresh_clone_demo.json with the demo's summary.json and the
machine report. Uses the package caches already on the machine (pip's and the
tiny model's in ~/.cache/flywheel). Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, write_result


def timed(cmd: list[str], cwd: Path, timeout_s: float) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = parser.parse_args()
    where = Path(tempfile.mkdtemp(prefix="flywheel-fresh-"))
    clone = where / "flywheel"
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
        setup_s = timed(["make", "setup"], clone, 1800)
        demo_s = timed(["make", "demo"], clone, 1800)
        summary = json.loads((clone / "runs" / "demo" / "summary.json").read_text())
    finally:
        if args.keep:
            print(f"clone kept at {clone}")
        else:
            shutil.rmtree(where, ignore_errors=True)
    before, after = summary["before"]["eval_gold_reward"], summary["after"]["eval_gold_reward"]
    print(f"make setup {setup_s:.0f} s; make demo {demo_s:.0f} s (run {summary['total_s']:.0f} s, "
          f"dtype {summary['dtype']}); held-out gold {before:.4f} -> {after:.4f}")
    summary.pop("machine", None)  # write_result adds the same report
    write_result("benchmarks/results/fresh_clone_demo.json",
                 {"setup_s": setup_s, "demo_s": demo_s, "gold_before": before, "gold_after": after,
                  "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())

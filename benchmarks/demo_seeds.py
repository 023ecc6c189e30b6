"""Does the demo learn?  Runs the local PPO demo for several seeds through the
real entry point and compares the held-out gold reward before and after.

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--config configs/local_tiny_ppo.yaml] [key=value ...]

Prints a table and writes benchmarks/results/demo_seeds.json.  The claim it
checks: the mean gold-reward gain exceeds the spread (max - min) of the final
gold reward across seeds.  Run it on a quiet machine: runs are sequential.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import REPO, launch, write_result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default="configs/local_tiny_ppo.yaml")
    parser.add_argument("--out", default="benchmarks/results/demo_seeds.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    rows = []
    for seed in args.seeds:
        out_dir = REPO / "runs" / f"demo_seed{seed}"
        t0 = time.perf_counter()
        launch(args.config, out_dir, [f"run.seed={seed}", *args.overrides])
        wall = time.perf_counter() - t0
        summary = json.loads((out_dir / "summary.json").read_text())
        rows.append({"seed": seed, "before": summary["before"]["eval_gold_reward"],
                     "after": summary["after"]["eval_gold_reward"], "wall_s": wall,
                     "startup_s": summary["startup_s"], "dtype": summary["dtype"]})

    before = [r["before"] for r in rows]
    after = [r["after"] for r in rows]
    gain = sum(after) / len(after) - sum(before) / len(before)
    spread = max(after) - min(after)
    print(f"{'seed':>4} {'gold before':>12} {'gold after':>11} {'gain':>8} {'wall s':>7}")
    for r in rows:
        print(f"{r['seed']:>4} {r['before']:>12.4f} {r['after']:>11.4f} {r['after'] - r['before']:>8.4f} {r['wall_s']:>7.0f}")
    print(f"mean gain {gain:.4f}; spread of final gold across seeds {spread:.4f}; "
          f"gain / spread = {gain / max(spread, 1e-9):.2f}")
    report = {"config": args.config, "overrides": args.overrides, "runs": rows, "mean_gain": gain,
              "final_spread": spread, "gain_over_spread": gain / max(spread, 1e-9), "learns": gain > spread}
    write_result(args.out, report)
    return 0 if gain > spread else 3


if __name__ == "__main__":
    sys.exit(main())

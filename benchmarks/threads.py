"""Threads per phase: Ray gives each actor OMP_NUM_THREADS = num_cpus (1), so in
synchronous mode generation and training each use one core of the machine.
This runs the local demo config twice through the real entry point — Ray's
default threads (baseline) and `num_threads` set for both phases — and compares
per-step generation and training times as ratios.

    python benchmarks/threads.py [--steps 6] [--threads 2]

Prints a table and writes benchmarks/results/threads.json.  Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from common import REPO, launch, write_result

CONFIG = "configs/local_tiny_ppo.yaml"


def run(name: str, steps: int, overrides: list[str]) -> dict[str, float]:
    out = REPO / "runs" / f"bench_threads_{name}"
    launch(CONFIG, out, [f"run.steps={steps}", "run.eval_prompts=0", "run.save_final=false", *overrides])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # step 0 warms up
    return {k: statistics.median(r[k] for r in rows) for k in ("gen_s", "train_s", "sync_s", "rollout_tokens_per_s")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    base = run("default", args.steps, [])
    tuned = run(f"t{args.threads}", args.steps,
                [f"rollout.num_threads={args.threads}", f"learner.num_threads={args.threads}"])
    print(f"{'median per step':<22} {'Ray default':>12} {f'{args.threads} threads':>12} {'speed-up':>9}")
    for key in ("gen_s", "train_s", "sync_s"):
        print(f"{key:<22} {base[key]:>12.3f} {tuned[key]:>12.3f} {base[key] / tuned[key]:>8.2f}x")
    print(f"{'rollout_tokens_per_s':<22} {base['rollout_tokens_per_s']:>12.0f} {tuned['rollout_tokens_per_s']:>12.0f} "
          f"{tuned['rollout_tokens_per_s'] / base['rollout_tokens_per_s']:>8.2f}x")
    report = {"steps_measured": args.steps - 1, "baseline": base, "threads": args.threads, "tuned": tuned,
              "speedup": {k: base[k] / tuned[k] for k in ("gen_s", "train_s", "sync_s")}}
    write_result("benchmarks/results/threads.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

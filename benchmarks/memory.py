"""Does a learner rank's memory shrink as ranks are added?  ZeRO-3 on 1 and on 2 ranks, one run.

    python benchmarks/memory.py --json OUT.json [--model small]

Two launches of `configs/local_tiny_ppo.yaml` (real vLLM, DeepSpeed, Ray, the HTTP reward
service) at `learner.zero_stage=3`, with 1 and with 2 learner ranks, the same workload otherwise
(PPO with a critic, the frozen KL reference). Each rank reports its peak resident memory
(`ru_maxrss`, so the whole life of the process: loading, partitioning, training) in the run's
summary. Under ZeRO-3 the policy, the critic, their gradients and AdamW moments and the reference
are partitioned, so a rank of two should hold about half of what one rank holds, plus what every
process holds anyway (torch, DeepSpeed, Ray: measured here as the tiny model's figure).

A fourth launch puts the critic's value head on the policy's own trunk (`learner.critic_trunk=shared`)
on one rank: no second trunk, nor its gradients and AdamW moments.

Keys: `peak_gib_1_rank`, `peak_gib_2_ranks` (each rank's), `per_rank_ratio_2_over_1` (the
largest rank of two over the single rank), `baseline_gib`, `shared_trunk_peak_gib_1_rank`,
`shared_over_separate_1_rank`. Target: ratio <= 0.7.
Memory is not a timing, but run it alone anyway: the two ranks share 2 cores with vLLM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import REPO, add_emulation_option, begin_emulation, launch, load_average, write_result

CONFIG = "configs/local_tiny_ppo.yaml"
WORKLOAD = ["run.steps=2", "run.eval_prompts=4", "run.checkpoint_every=0", "run.save_final=false",
            "data.prompts_per_step=8", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=16",
            "learner.minibatch_size=16", "learner.zero_stage=3", "learner.num_threads=1"]
TARGET = 0.7


def peak(name: str, root, model: str, ranks: int, extra: list[str] = ()) -> list[float]:
    out = root / name
    print(f"  {name}: model.embedded={model}, {ranks} rank(s) {' '.join(extra)}", flush=True)
    launch(CONFIG, out, [*WORKLOAD, f"model.embedded={model}", f"learner.world_size={ranks}", *extra])
    return json.loads((out / "summary.json").read_text())["learner_peak_memory_gib"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/memory.json")
    parser.add_argument("--model", choices=["tiny", "small"], default="small")
    parser.add_argument("--runs", default="runs/memory", help="where the launches write (inside the repository)")
    add_emulation_option(parser)
    args = parser.parse_args()
    emulated = begin_emulation(args)  # every launch inherits the settings
    root = REPO / args.runs
    load_start = load_average("at the start")
    t0 = time.perf_counter()
    one = peak("one_rank", root, args.model, 1)
    two = peak("two_ranks", root, args.model, 2)
    baseline = peak("baseline_tiny", root, "tiny", 1)
    # The critic on the policy's own trunk: no second trunk, its gradients or AdamW moments.
    shared = peak("one_rank_shared_trunk", root, args.model, 1, ["learner.critic_trunk=shared"])
    ratio = max(two) / one[0]
    report = {"model": args.model, "emulated_cpu": emulated, "peak_gib_1_rank": one[0], "peak_gib_2_ranks": two,
              "per_rank_ratio_2_over_1": ratio, "baseline_gib": baseline[0],
              "shared_trunk_peak_gib_1_rank": shared[0], "shared_over_separate_1_rank": shared[0] / one[0],
              "target": f"per_rank_ratio_2_over_1 <= {TARGET}", "target_met": ratio <= TARGET,
              "wall_s": time.perf_counter() - t0,
              "load_average": {"start": load_start, "end": load_average("at the end")}}
    print(f"\n{'ranks':<8} {'peak GiB per rank':>20}")
    print(f"{'1':<8} {one[0]:>20.2f}")
    print(f"{'2':<8} {', '.join(f'{m:.2f}' for m in two):>20}")
    print(f"{'1 shared':<8} {shared[0]:>20.2f}   (learner.critic_trunk=shared)")
    print(f"\nratio 2 over 1: {ratio:.2f} (target <= {TARGET}); a rank with the tiny model: {baseline[0]:.2f} GiB; "
          f"shared trunk over separate critic, 1 rank: {shared[0] / one[0]:.2f}")
    write_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

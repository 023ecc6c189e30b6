"""How much does asynchronous mode save?  PPO steps, synchronous against asynchronous, in one run.

    python benchmarks/ppo_step.py --json OUT.json [--model small] [--steps 12] [--gold-seeds 0 1 2]
    python benchmarks/ppo_step.py --json OUT.json --gold-only --gold-seeds 0 1 2
    python benchmarks/ppo_step.py --json OUT.json --gold-merge GOLD_A.json GOLD_B.json

Each measurement is one `python -m cluster.launch` of `configs/local_tiny_ppo.yaml` (real vLLM,
DeepSpeed, Ray and the HTTP reward service) with one rollout actor and one learner rank, each
with one thread, so that each owns one of the machine's cores as they would own separate devices
on a cluster:

- synchronous (`rollout.max_staleness=0`) and asynchronous (`=1`) runs of the same workload, where
  generation is 40-60% of a synchronous step; the first `--warmup` steps of each are left out.
  On the CPU a batch of many sequences decodes near the machine's compute rate, and an update
  costs about seven times a generated token's compute (policy and critic forward and backward,
  reference forward), so generation is a small part of a step at 16 prompts x 4 samples x 64
  tokens (the GRPO run below shows it). Long completions of a few sequences decode at the rate
  memory streams the weights instead, as decoding does on GPUs, which is what makes generation
  dominate in the field's reports: 1 prompt x 384 tokens, with the samples per prompt chosen by a
  probe (below) unless `--samples` gives them;
- the probe: short synchronous runs at 1 and at 4 samples per prompt. Generation's seconds and the
  rest's each grow about linearly with the samples (the rest much faster: every sample is trained
  on, while decoding a few more sequences costs little more than one); a line through each pair
  predicts the share at 1..8 samples, and the count predicted nearest 0.5 is timed. One fixed
  count cannot do it on every CPU kind: on 2026-12-03 four samples gave generation 0.56 of a step
  on Intel with AMX but 0.34 on the AMD machine with AVX512-BF16, where one sample gave 0.44;
- a GRPO run (16 prompts x 4 samples x 64 tokens, whatever the workload above) for its seconds
  per step;
- with `--gold-seeds`, full-length runs of the default tiny PPO workload, synchronous and
  asynchronous, one per seed: the held-out gold reward each ends at, so that what asynchronous
  mode costs in quality shows beside what it saves in time (`--gold-only` runs just these; they
  time nothing). `--gold-merge` joins such reports of other seeds into one, with the difference of
  the means and its standard error.

Keys: `sync_steps_per_s`, `async_steps_per_s`, `async_speedup`, `overlap_bound` (the synchronous
step time over the larger of its generation and non-generation parts: the most that perfect
overlap could give), `generation_share`, `breakdown` (mean seconds per phase of each mode),
`grpo_s_per_step`, and `samples_choice` (how the samples per prompt were chosen: the probes and the
predicted share). Prints a table and writes JSON with the machine report. Run it on a quiet
machine: everything here is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import REPO, add_emulation_option, begin_emulation, launch, load_average, write_result

from cluster.metrics import read_metrics  # any JSON-lines file of a run

CONFIG = "configs/local_tiny_ppo.yaml"
# One actor and one rank, one thread each (a core each on 2 cores); no evaluation or saving to time.
ONE_CORE_EACH = ["rollout.num_actors=1", "rollout.num_threads=1", "learner.world_size=1", "learner.num_threads=1",
                 "run.eval_prompts=4", "run.checkpoint_every=0", "run.save_final=false"]
PHASES = (("generate", "gen_s"), ("score", "score_s"), ("experience", "make_experience_s"),
          ("train", "update_s"), ("sync", "sync_s"), ("idle", "gen_wait_s"))
TARGETS = {"async_speedup": 1.5, "fraction_of_overlap_bound": 0.9}
GRPO_WORKLOAD = (16, 4, 64)  # prompts, samples per prompt, new tokens
GRPO_TIMED_STEPS = 3  # about 45 s each on the ~80M model with one core
# The timed sync/async runs: one PPO pass per batch (the usual setting of asynchronous RL), and a
# learning rate low enough that the policy does not learn to stop early within the run (at the
# config's 1e-3 its completions fell from ~160 to ~10 tokens by the fifth step), so every step
# times the same workload.
STEADY = ["learner.ppo_epochs=1", "learner.lr=1e-6", "learner.critic_lr=1e-6"]
MAX_MODEL_LEN = 512  # the embedded models' positions: room for the longest completions asked for
PROBE_SAMPLES = (1, 4)  # the samples per prompt of the two probe runs
PROBE_STEPS, PROBE_WARMUP = 3, 1  # steps of each probe run, and how many of them are left out
MAX_SAMPLES = 8  # the most samples per prompt the probe may choose
WANTED_SHARE = 0.5  # generation's share of a synchronous step the probe aims at (the issue asks 0.4-0.6)


def _steps(out_dir: Path, warmup: int) -> list[dict]:
    records = read_metrics(out_dir / "metrics.jsonl")
    if len(records) <= warmup:
        raise SystemExit(f"{out_dir}: {len(records)} steps logged, no more than the {warmup} warm-up steps")
    return records[warmup:]


def _mean(records: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in records)


def timed_mode(name: str, root: Path, workload: list[str], staleness: int, warmup: int) -> dict:
    out = root / name
    print(f"  {name}: rollout.max_staleness={staleness}", flush=True)
    launch(CONFIG, out, [*workload, *ONE_CORE_EACH, f"rollout.max_staleness={staleness}"])
    steps = _steps(out, warmup)
    breakdown = {phase: _mean(steps, key) for phase, key in PHASES}
    if not staleness:
        # Synchronous: the driver waits for all of generation; its idle time is what no phase covers.
        breakdown["idle"] = max(0.0, _mean(steps, "step_s") - sum(v for k, v in breakdown.items() if k != "idle"))
    checks = [r["sync_check_s"] for r in steps if "sync_check_s" in r]  # the sync check's reads, not in a phase
    return {"step_s": _mean(steps, "step_s"), "steps_per_s": 1.0 / _mean(steps, "step_s"), "breakdown": breakdown,
            "sync_check_s": statistics.mean(checks) if checks else None,
            "staleness": [r["staleness"] for r in steps], "steps_timed": len(steps)}


def choose_samples(probes: list[dict]) -> tuple[int, float]:
    """The samples per prompt whose predicted generation share is nearest `WANTED_SHARE`, and that
    share. `probes` are two synchronous runs, each `{"samples", "generate_s", "rest_s"}`: a line
    through each phase's two points predicts its seconds at 1..`MAX_SAMPLES` samples (clipped
    at a tenth of the smaller measurement, so that noise cannot make a phase free)."""
    (a, b) = sorted(probes, key=lambda p: p["samples"])
    if a["samples"] == b["samples"]:
        raise ValueError(f"the probes need two different sample counts, got {a['samples']} twice")

    def line(key: str, samples: int) -> float:
        slope = (b[key] - a[key]) / (b["samples"] - a["samples"])
        return max(a[key] + slope * (samples - a["samples"]), 0.1 * min(a[key], b[key]))

    shares = {n: line("generate_s", n) / (line("generate_s", n) + line("rest_s", n)) for n in range(1, MAX_SAMPLES + 1)}
    best = min(shares, key=lambda n: (abs(shares[n] - WANTED_SHARE), n))
    return best, shares[best]


def probe_samples(root: Path, workload_at) -> dict:
    """Short synchronous runs at each of `PROBE_SAMPLES` (`workload_at(samples)` gives a run's overrides),
    and the count `choose_samples` takes from them."""
    probes = []
    for samples in PROBE_SAMPLES:
        run = timed_mode(f"probe_{samples}samples", root,
                         [*workload_at(samples), *STEADY, f"run.steps={PROBE_STEPS}"], 0, PROBE_WARMUP)
        gen = run["breakdown"]["generate"]
        probes.append({"samples": samples, "generate_s": gen, "rest_s": run["step_s"] - gen,
                       "share": gen / run["step_s"]})
        print(f"    generation {gen:.2f} s of {run['step_s']:.2f} s ({probes[-1]['share']:.2f})", flush=True)
    samples, share = choose_samples(probes)
    print(f"  probe chose {samples} samples per prompt (predicted generation share {share:.2f})", flush=True)
    return {"by": "probe", "samples": samples, "predicted_share": share, "probes": probes}


def gold_runs(root: Path, seeds: list[int], steps: int) -> dict:
    """The default tiny PPO workload, synchronous and asynchronous, one launch per seed."""
    out: dict[str, list[float]] = {"sync": [], "async": []}
    curves: dict[str, list[list[float]]] = {"sync": [], "async": []}  # the training batches' gold, step by step
    for seed in seeds:
        for mode, staleness in (("sync", 0), ("async", 1)):
            run = root / f"gold_{mode}_seed{seed}"
            print(f"  gold, {mode}, seed {seed}", flush=True)
            launch(CONFIG, run, [f"run.seed={seed}", f"run.steps={steps}", "run.checkpoint_every=0",
                                 "run.save_final=false", f"rollout.max_staleness={staleness}",
                                 "rollout.num_threads=1", "learner.num_threads=1"])
            out[mode].append(json.loads((run / "summary.json").read_text())["after"]["eval_gold_reward"])
            curves[mode].append([r["gold_reward_mean"] for r in read_metrics(run / "metrics.jsonl")])
    return gold_summary(seeds, out["sync"], out["async"], curves)


def gold_summary(seeds: list[int], sync: list[float], asyn: list[float], curves: dict) -> dict:
    """The comparison of final gold rewards, seed by seed (runs of one seed share their prompts).

    The target: the asynchronous runs' final gold reward (their mean) inside the synchronous runs'
    spread. Whether every single asynchronous run lands inside it is reported beside it: with three
    seeds a side that holds even for two samplings of the same distribution only about one time in
    five. With more seeds the difference of the means and its standard error say more: paired by
    seed, and unpaired (Welch's, which assumes nothing of the pairing)."""
    lo, hi = min(sync), max(sync)
    async_mean = statistics.mean(asyn)
    report = {"seeds": seeds, "sync": sync, "async": asyn, "sync_spread": [lo, hi], "sync_mean": statistics.mean(sync),
              "async_mean": async_mean, "async_mean_within_sync_spread": lo <= async_mean <= hi,
              "every_async_within_sync_spread": all(lo <= g <= hi for g in asyn)}
    if len(seeds) > 1:
        diffs = [a - s for s, a in zip(sync, asyn, strict=True)]
        n = len(diffs)
        report.update(
            sync_sd=statistics.stdev(sync), async_sd=statistics.stdev(asyn),
            async_minus_sync=statistics.mean(diffs),
            async_minus_sync_se_paired=statistics.stdev(diffs) / n ** 0.5,
            async_minus_sync_se_unpaired=((statistics.variance(sync) + statistics.variance(asyn)) / n) ** 0.5,
        )
    return {**report, "training_gold": curves}


def merge_gold(paths: list[str]) -> dict:
    """One gold comparison from several `--gold-only` reports of the same length and distinct seeds."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    steps = {r["gold_steps"] for r in reports}
    if len(steps) != 1:
        raise SystemExit(f"--gold-merge: the reports ran different lengths ({sorted(steps)} steps); merge equal ones")
    seeds: list[int] = []
    sync: list[float] = []
    asyn: list[float] = []
    curves: dict[str, list] = {"sync": [], "async": []}
    for path, r in zip(paths, reports, strict=True):
        g = r["gold"]
        if "seeds" not in g:
            raise SystemExit(f"--gold-merge: {path} does not say its seeds (key gold.seeds); add them from the "
                             "command that made it")
        seeds += g["seeds"]
        sync += g["sync"]
        asyn += g["async"]
        for mode in curves:
            curves[mode] += g["training_gold"][mode]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--gold-merge: seeds {sorted(seeds)} repeat; each seed's runs are deterministic, so a "
                         "repeat adds nothing")
    return {"gold": gold_summary(seeds, sync, asyn, curves), "gold_steps": steps.pop(), "merged_from": paths,
            "wall_s": sum(r["wall_s"] for r in reports)}


def _print_gold(g: dict) -> None:
    print(f"gold reward after training, seeds {g['seeds']}: sync {[round(v, 4) for v in g['sync']]} (spread "
          f"{g['sync_spread'][0]:.4f}-{g['sync_spread'][1]:.4f}), async {[round(v, 4) for v in g['async']]} "
          f"(mean {g['async_mean']:.4f}: {'inside' if g['async_mean_within_sync_spread'] else 'outside'} "
          "the synchronous spread)")
    if "async_minus_sync" in g:
        print(f"async - sync: {g['async_minus_sync']:+.4f} (standard error {g['async_minus_sync_se_paired']:.4f} "
              f"paired by seed, {g['async_minus_sync_se_unpaired']:.4f} unpaired); standard deviations: sync "
              f"{g['sync_sd']:.4f}, async {g['async_sd']:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/ppo_step.json")
    parser.add_argument("--model", choices=["tiny", "small"], default="small",
                        help="the embedded model (small: the ~80M one)")
    parser.add_argument("--steps", type=int, default=12, help="steps per timed run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the means")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step")
    parser.add_argument("--samples", type=int,
                        help="samples per prompt (default: chosen by a probe so that generation is about half "
                             "of a synchronous step)")
    parser.add_argument("--tokens", type=int, default=384,
                        help="new tokens per sample (with few sequences, generation's share grows with it)")
    parser.add_argument("--gold-seeds", type=int, nargs="*", default=[], help="seeds of the gold-reward comparison")
    parser.add_argument("--gold-steps", type=int, default=25, help="steps of each gold-reward run")
    parser.add_argument("--gold-only", action="store_true",
                        help="only the gold-reward comparison (nothing timed, so it may share the machine)")
    parser.add_argument("--gold-merge", nargs="+", metavar="REPORT",
                        help="merge --gold-only reports of distinct seeds into one (runs nothing)")
    parser.add_argument("--runs", default="runs/ppo_step", help="where the launches write (inside the repository)")
    add_emulation_option(parser)
    args = parser.parse_args()
    emulated = begin_emulation(args)  # every launch inherits the settings

    root = REPO / args.runs
    load_start = load_average("at the start")
    t0 = time.perf_counter()
    def workload_of(prompts: int, samples: int, tokens: int) -> list[str]:
        return [f"model.embedded={args.model}", f"run.steps={args.steps}", f"data.prompts_per_step={prompts}",
                f"rollout.samples_per_prompt={samples}", f"rollout.max_new_tokens={tokens}",
                f"learner.minibatch_size={prompts * samples}", f"model.max_model_len={MAX_MODEL_LEN}"]

    if args.gold_merge:
        report = merge_gold(args.gold_merge)
        _print_gold(report["gold"])
        write_result(args.json, report)
        return 0
    if args.gold_only:
        if not args.gold_seeds:
            parser.error("--gold-only needs --gold-seeds")
        report = {"gold": gold_runs(root, args.gold_seeds, args.gold_steps), "gold_steps": args.gold_steps,
                  "emulated_cpu": emulated,
                  "wall_s": time.perf_counter() - t0}
        _print_gold(report["gold"])
        write_result(args.json, report)
        return 0
    if args.samples is None:
        choice = probe_samples(root, lambda samples: workload_of(args.prompts, samples, args.tokens))
        args.samples = choice["samples"]
    else:
        choice = {"by": "flag", "samples": args.samples}
    workload = [*workload_of(args.prompts, args.samples, args.tokens), *STEADY]
    sync = timed_mode("sync", root, workload, 0, args.warmup)
    asyn = timed_mode("async", root, workload, 1, args.warmup)
    gen, step = sync["breakdown"]["generate"], sync["step_s"]
    bound = step / max(gen, step - gen)
    report = {
        "model": args.model, "emulated_cpu": emulated, "prompts": args.prompts, "samples": args.samples, "tokens": args.tokens,
        "grpo_workload": dict(zip(("prompts", "samples", "tokens"), GRPO_WORKLOAD)),
        "sync_steps_per_s": sync["steps_per_s"], "async_steps_per_s": asyn["steps_per_s"],
        "async_speedup": asyn["steps_per_s"] / sync["steps_per_s"], "overlap_bound": bound,
        "generation_share": gen / step, "breakdown": {"sync": sync["breakdown"], "async": asyn["breakdown"]},
        "sync": sync, "async": asyn, "samples_choice": choice,
    }
    report["fraction_of_overlap_bound"] = report["async_speedup"] / bound
    grpo = timed_mode("grpo", root, [*workload_of(*GRPO_WORKLOAD), "learner.advantage=grpo",
                                     f"run.steps={args.warmup + GRPO_TIMED_STEPS}"], 0, args.warmup)
    report["grpo_s_per_step"] = grpo["step_s"]
    report["grpo"] = grpo
    if args.gold_seeds:
        report["gold"] = gold_runs(root, args.gold_seeds, args.gold_steps)
    report["targets"] = {k: {"target": v, "met": report[k] >= v} for k, v in TARGETS.items()}
    report["wall_s"] = time.perf_counter() - t0
    report["load_average"] = {"start": load_start, "end": load_average("at the end")}

    print(f"\n{'mode':<6} {'steps/s':>8} {'step s':>7} " + " ".join(f"{p:>10}" for p, _ in PHASES))
    for name, r in (("sync", sync), ("async", asyn), ("grpo", grpo)):
        print(f"{name:<6} {r['steps_per_s']:>8.3f} {r['step_s']:>7.2f} "
              + " ".join(f"{r['breakdown'][p]:>10.3f}" for p, _ in PHASES))
    print(f"\ngeneration share {report['generation_share']:.2f} (wanted 0.4-0.6); async speedup "
          f"{report['async_speedup']:.2f} of at most {bound:.2f} ({report['fraction_of_overlap_bound']:.2f} of the bound)")
    if "gold" in report:
        _print_gold(report["gold"])
    if not 0.4 <= report["generation_share"] <= 0.6:
        print("warning: generation is outside 40-60% of a synchronous step; change --samples or --tokens")
    write_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The rollout engine on zentorch against the same engine on oneDNN (`rollout.cpu_gemm`).

Where zentorch can be had (an AMD CPU with AVX-512 and zentorch installed), the
rollout actor is built from the config once per library, on every core, each
in a process of its own, the two alternating for `--rounds` rounds so that a slow spell of the
machine falls on both. Each engine decodes two workloads after a warm-up pass
of each, three timed passes apiece, every sequence to its full length:

- `many_short`: 256 prompts x 64 new tokens (`benchmarks/rollout.py`'s batch);
- `few_long`: 1 prompt x 2 samples x 384 new tokens (`benchmarks/ppo_step.py`'s
  kind of batch, where a few long completions decode at the rate the weights
  stream from memory).

Keys: `tokens_per_s[library][workload]` (the median over rounds of each
round's median pass) and `zentorch_speedup[workload]` (zentorch over oneDNN).

    python benchmarks/cpu_gemm.py --json benchmarks/results/cpu_gemm.json

Prints a table and writes the JSON with the machine report. Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback

from common import load_average, write_result
from rollout import prompts

CONFIG = "configs/local_tiny_ppo.yaml"
LIBRARIES = ("zentorch", "onednn")
WORKLOADS = {"many_short": (256, 1, 64), "few_long": (1, 2, 384)}  # prompts, samples, new tokens
PASSES = 3
TIMEOUT_S = 1200.0


def _engine_main(config: str, overrides: list[str], library: str, results) -> None:
    """One engine on `library`: tokens/s of each workload's timed passes, sent back."""
    try:
        from actors.rollout import RolloutWorker
        from cluster.config import load_config
        from cluster.driver import resolve_model
        from cluster.groups import generate_kwargs, rollout_worker_kwargs
        from flywheel.hardware import resolve_dtype

        cfg = load_config(config, [*overrides, f"rollout.cpu_gemm={library}"])
        worker = RolloutWorker(**rollout_worker_kwargs(cfg, resolve_model(cfg), resolve_dtype(cfg.model.dtype,
                                                                                                "cpu").dtype, 0))
        if worker.cpu_gemm != library:
            raise RuntimeError(f"asked for {library}, the engine computes with {worker.cpu_gemm}")
        rates = {}
        for name, (n_prompts, samples, tokens) in WORKLOADS.items():
            gen = {**generate_kwargs(cfg), "n": samples, "max_new_tokens": tokens, "min_new_tokens": tokens}
            batch = prompts(worker._tokenizer, n_prompts, samples, cfg.run.seed)
            worker.generate(batch, **gen)  # warm-up
            walls = []
            for _ in range(PASSES):
                t0 = time.perf_counter()
                rollout = worker.generate(batch, **gen)
                walls.append(time.perf_counter() - t0)
            if rollout.num_tokens != n_prompts * samples * tokens:
                raise RuntimeError(f"{name}: {rollout.num_tokens} tokens, expected {n_prompts * samples * tokens}")
            rates[name] = rollout.num_tokens / statistics.median(walls)
        results.put(("done", rates))
        worker.shutdown()
    except BaseException:
        results.put(("crashed", traceback.format_exc()))


def run_engine(config: str, overrides: list[str], library: str) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_engine_main, args=(config, overrides, library, results), daemon=True)
    proc.start()
    try:
        kind, payload = results.get(timeout=TIMEOUT_S)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if kind != "done":
        raise SystemExit(f"the engine on {library} failed:\n{payload}")
    return payload


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/cpu_gemm.json", help="result file (repository-relative)")
    parser.add_argument("--model", default="small", help="embedded model (model.embedded)")
    parser.add_argument("--rounds", type=int, default=2, help="engine starts per library, alternating")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--override", action="append", default=[], help="config override, e.g. rollout.enforce_eager=false")
    args = parser.parse_args()

    from flywheel.hardware import actor_threads, read_cpu_info, zentorch_unavailable

    why_not = zentorch_unavailable()
    if why_not:
        print(f"nothing to compare on this machine: {why_not}")
        return 2
    threads = actor_threads(num_threads=read_cpu_info().cores)  # every core, as benchmarks/rollout.py gives
    os.environ["OMP_NUM_THREADS"] = str(threads)  # what each engine's process starts with
    longest = max(tokens for _, _, tokens in WORKLOADS.values())
    overrides = [f"model.embedded={args.model}", f"model.max_model_len={longest + 128}", *args.override]
    load_start = load_average("at the start")
    runs: dict[str, list[dict[str, float]]] = {lib: [] for lib in LIBRARIES}
    for round_ in range(args.rounds):
        for library in LIBRARIES:
            runs[library].append(run_engine(args.config, overrides, library))
            print(f"round {round_ + 1}, {library}: " + ", ".join(f"{w} {r:.1f} tok/s" for w, r in
                                                               runs[library][-1].items()), flush=True)
    rates = {lib: {w: statistics.median(r[w] for r in runs[lib]) for w in WORKLOADS} for lib in LIBRARIES}
    speedup = {w: rates["zentorch"][w] / rates["onednn"][w] for w in WORKLOADS}
    print(f"{'workload':<12} {'sequences x tokens':>18} {'zentorch tok/s':>15} {'oneDNN tok/s':>13} {'ratio':>6}")
    for w, (n_prompts, samples, tokens) in WORKLOADS.items():
        print(f"{w:<12} {f'{n_prompts * samples} x {tokens}':>18} {rates['zentorch'][w]:>15.1f} "
              f"{rates['onednn'][w]:>13.1f} {speedup[w]:>6.2f}")
    write_result(args.json, {
        "benchmark": "cpu_gemm", "model": args.model, "overrides": overrides, "rounds": args.rounds, "threads": threads,
        "passes": PASSES, "workloads": {w: dict(zip(("prompts", "samples", "new_tokens"), v))
                                        for w, v in WORKLOADS.items()},
        "tokens_per_s": rates, "zentorch_speedup": speedup, "runs": runs,
        "load_average": {"start": load_start, "end": load_average("at the end")}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

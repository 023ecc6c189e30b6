"""Where a rollout's time goes: the rollout actor's engine under torch's profiler.

The same engine, prompts and sampling as `benchmarks/rollout.py` (the actor
built from the config; 256 prompts of the synthetic task, 64 new tokens each,
the faster of eager and compiled unless `--mode` says), warmed up, then one pass
profiled.  Each operator's own CPU time goes into one of these groups:

- `gemm`: the linear layers (vLLM's oneDNN and sgl kernels, zentorch's, or torch's);
- `attention`: vLLM's CPU paged-attention kernel;
- `kv_cache_write`: writing each new token's keys and values into the cache;
- `compiled_elementwise`: what Inductor fused (norms, rotary, activation, residuals);
- `sampling`: the sampler's kernels;
- `other_ops`: every other operator;
- `python_and_scheduling`: the pass's wall time no operator accounts for (vLLM's
  scheduler, input preparation, output processing, the interpreter).

Besides the shares, `gemm_gflop_per_s` is the rate the linear layers reach
inside the engine (2 * params FLOP per token over their time), to set beside
the matrix-multiply rate `rollout.py` measures outside it; and
`roofline_fraction_if_only_gemm` is the fraction of that roofline the engine
would reach if nothing but its matrix products took time.

    python benchmarks/decode_profile.py --json benchmarks/results/decode_profile.json

Prints a table and writes the JSON with the machine report. Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import add_emulation_option, begin_emulation, load_average, write_result
from rollout import CONFIG, load_cfg, matmul_flops, start_vllm

from flywheel.hardware import actor_threads, read_cpu_info

GROUPS = {  # operator-name fragments, first match wins
    "gemm": ("onednn_mm", "weight_packed_linear", "zentorch_linear", "aten::addmm", "aten::mm", "aten::linear",
             "aten::matmul"),
    "attention": ("cpu_attention_with_kv_cache",),
    "kv_cache_write": ("cpu_attn_reshape_and_cache",),
    "compiled_elementwise": ("CompiledFxGraph",),
    "sampling": ("gumbel", "exponential", "softmax", "topk", "top_k", "argmax", "sort"),
}


def group_of(name: str) -> str:
    for group, fragments in GROUPS.items():
        if any(f in name for f in fragments):
            return group
    return "other_ops"


def profile_pass(one_pass) -> tuple[float, dict[str, float], list[tuple[str, float, int]]]:
    """Wall seconds of one profiled pass, self CPU seconds per group, and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        one_pass()
        wall = time.perf_counter() - t0
    groups = dict.fromkeys([*GROUPS, "other_ops"], 0.0)
    ops = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        groups[group_of(event.key)] += seconds
        ops.append((event.key, seconds, event.count))
    ops.sort(key=lambda op: -op[1])
    return wall, groups, ops[:12]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/decode_profile.json", help="result file (repository-relative)")
    parser.add_argument("--model", default="small", help="embedded model (model.embedded)")
    parser.add_argument("--mode", choices=("eager", "compiled"), default="compiled")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="passes before the profiled one")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--override", action="append", default=[], help="config override")
    add_emulation_option(parser)
    args = parser.parse_args()

    from flywheel.hardware import resolve_dtype

    emulated = begin_emulation(args)
    cpu = read_cpu_info()
    threads = actor_threads(num_threads=cpu.cores)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch

    torch.set_num_threads(threads)
    dtype = resolve_dtype(load_cfg(args, args.model).model.dtype, "cpu", cpu)
    print(f"{cpu.kind}, {cpu.cores} cores: {dtype.reason} {threads} threads")
    load_start = load_average("at the start")

    from flywheel.tiny_model import count_parameters, embedded_spec, ensure_embedded_model

    path = ensure_embedded_model("policy", embedded_spec(args.model))
    params = count_parameters(path)
    cfg = load_cfg(args, args.model, [f"rollout.enforce_eager={str(args.mode == 'eager').lower()}"])
    one_pass, facts = start_vllm({"cfg": cfg, "model_path": path, "dtype": dtype.dtype, "prompts": args.prompts,
                                  "compile_cache_dir": None, "prefix_caching": True})
    walls = [one_pass()[0] for _ in range(args.warmup)]
    t0 = time.perf_counter()
    _, tokens = one_pass()
    unprofiled = time.perf_counter() - t0
    wall, groups, top = profile_pass(one_pass)
    groups["python_and_scheduling"] = max(0.0, wall - sum(groups.values()))
    rates = matmul_flops(path, dtype.dtype, rows=args.prompts)
    flops = max(rates.values())
    gemm_rate = 2 * params * tokens / groups["gemm"] if groups["gemm"] else None
    report = {
        "benchmark": "decode_profile", "model": args.model, "params": params, "dtype": dtype.dtype,
        "mode": args.mode, "threads": threads, "prompts": args.prompts, "new_tokens": args.new_tokens,
        "tokens": tokens, "emulated_cpu": emulated, "warmup_walls_s": walls, "unprofiled_wall_s": unprofiled,
        "profiled_wall_s": wall, "tokens_per_s": tokens / unprofiled,
        "seconds": groups, "shares": {k: v / wall for k, v in groups.items()},
        "gemm_gflop_per_s": gemm_rate / 1e9 if gemm_rate else None,
        "matmul_gflop_per_s_by_shape": {k: v / 1e9 for k, v in rates.items()},
        "roofline_tokens_per_s": flops / (2 * params),
        "roofline_fraction": tokens / unprofiled / (flops / (2 * params)),
        "roofline_fraction_if_only_gemm": tokens / groups["gemm"] / (flops / (2 * params)) if groups["gemm"] else None,
        "top_ops": [{"name": n, "self_s": s, "calls": c} for n, s, c in top],
        "engine": facts,
        "load_average": {"start": load_start, "end": load_average("at the end")},
    }
    print(f"{args.model} ({params:,} params, {dtype.dtype}, {args.mode}): {tokens} tokens, "
          f"{unprofiled:.2f} s unprofiled ({tokens / unprofiled:.0f} tok/s), {wall:.2f} s profiled")
    print(f"{'group':<24}{'seconds':>9}{'share':>8}")
    for k, v in groups.items():
        print(f"{k:<24}{v:>9.3f}{v / wall:>8.2f}")
    print(f"linear layers inside the engine: {report['gemm_gflop_per_s'] or 0:.0f} GFLOP/s; matrix products "
          f"outside it: {', '.join(f'{k} {v / 1e9:.0f}' for k, v in rates.items())} GFLOP/s")
    print(f"roofline {report['roofline_tokens_per_s']:.0f} tok/s: fraction {report['roofline_fraction']:.2f}")
    write_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

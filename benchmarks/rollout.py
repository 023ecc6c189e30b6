"""Rollout speed: the rollout actor's vLLM engine against `transformers` `generate`.

For each embedded model (tiny, small = 77M), on the same prompts from the
synthetic task's pool, the same sampling settings (the config's
`rollout.temperature`, `top_p`, `top_k`, passed as the driver passes them) and
exactly `--new-tokens` tokens per sequence in both (the end-of-sequence token is
masked until then: vLLM's `min_tokens`, transformers' `min_new_tokens`; counted):

- transformers `generate`, all prompts in one left-padded batch;
- the rollout actor (`actors.rollout.RolloutWorker`, built by
  `cluster.groups.rollout_worker_kwargs` from the config, so the engine is the
  one a run starts), eager and compiled (`enforce_eager=False`); compiled twice,
  from an empty compile cache and again reusing it, to show what a second start
  costs;
- prefix caching on and off with `--samples` samples sharing each prompt;
- the engine with vLLM's CPU default KV block of 128 tokens against the actor's
  (`rollout.block_size`, 32 on CPU), and with its linear weights left in
  torch's layout instead of prepacked for oneDNN (what a weight update need not
  repack; see benchmarks/weight_sync.py);
- the compute roofline: this machine's matrix-multiply rate in the model's
  dtype, measured here (the best of the model's own linear shapes at the
  batch in flight and a 2048^3 product, with torch's matmul and, where an
  engine may compute with it, zentorch's prepacked linear), divided by
  2 * params FLOP per token.

Both sides generate the whole batch 1 + `--passes` times; the median of all
but the first pass counts (the first is a warm-up, as every RL step after the
first is warm; its time is kept as `first_wall_s`). Each engine runs in its own process, one at a time.
The headline (`speedup`, `vllm_tokens_per_s`, `hf_tokens_per_s`) comes from
`paired`: `generate` and the engine each kept up in its own process, warmed
up, then `--pairs` passes of each in alternation, so a slow spell of the
machine (two starts of one engine have differed by 5%) falls on both sides;
`speedup` is the median of the pairs' ratios, and the ratio of the separate
rows is kept as `speedup_separate_starts`. The matrix-multiply rate is measured
in a third process once in each pair, after its two passes, so the roofline
falls in the same spells as the passes set against it: `roofline_fraction` is
the median of the pairs' fractions, and `roofline_fraction_at_best_rate` sets
the engine's median against the best rate of any pair (the stricter of the
two). dtype (model.dtype auto) and
threads (all cores this process may use, as `rollout.num_threads` would give the
actor) follow the hardware as a run chooses them.

    python benchmarks/rollout.py --json benchmarks/results/rollout.json
    python benchmarks/rollout.py --quick --json /tmp/rollout_quick.json   # smoke run: 32 prompts, tiny model

Prints a table and writes the JSON with the machine report. Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback

from common import add_emulation_option, begin_emulation, load_average, write_result

from flywheel.hardware import actor_threads, read_cpu_info

CONFIG = "configs/local_tiny_ppo.yaml"
MODELS = ("tiny", "small")
HEADLINE_KEYS = ("vllm_tokens_per_s", "hf_tokens_per_s", "speedup", "roofline_tokens_per_s", "roofline_fraction")


def load_cfg(args, model: str, overrides: list[str] = ()):
    from cluster.config import load_config

    return load_config(args.config, [
        f"model.embedded={model}", f"rollout.max_new_tokens={args.new_tokens}", "rollout.samples_per_prompt=1",
        f"rollout.kv_cache_gib={args.kv_cache_gib}", *args.override, *overrides])


def prompts(tokenizer, n: int, samples: int, seed: int):
    """n prompts of the synthetic task's training pool, tokenised as the driver does, seeded as a step is."""
    import numpy as np

    from flywheel import synthetic_task
    from flywheel.records import PromptBatch
    from flywheel.seeds import sample_seeds

    texts = synthetic_task.make_prompts(n, seed)
    ids = [np.asarray(tokenizer(p, add_special_tokens=True)["input_ids"], dtype=np.int32) for p in texts]
    return PromptBatch(prompts=texts, prompt_ids=ids, seeds=sample_seeds(seed, 0, n, samples))


# ------------------------------------------------------------------------- children


def start_vllm(spec: dict):
    """Start the rollout actor; (one pass: generate all prompts, returning (wall s, tokens); facts of the engine)."""
    from cluster.groups import generate_kwargs, rollout_worker_kwargs
    from actors.rollout import RolloutWorker
    import torch

    cfg = spec["cfg"]
    t0 = time.perf_counter()
    worker = RolloutWorker(**rollout_worker_kwargs(cfg, spec["model_path"], spec["dtype"], 0),
                           compile_cache_dir=spec["compile_cache_dir"],
                           enable_prefix_caching=spec["prefix_caching"],
                           prepack_cpu_weights=spec.get("prepack", True))
    init_s = time.perf_counter() - t0
    gen = {**generate_kwargs(cfg), "min_new_tokens": cfg.rollout.max_new_tokens}
    batch = prompts(worker._tokenizer, spec["prompts"], gen["n"], cfg.run.seed)
    expected = len(batch) * gen["n"] * gen["max_new_tokens"]

    def one_pass() -> tuple[float, int]:
        t0 = time.perf_counter()
        rollout = worker.generate(batch, **gen)
        wall = time.perf_counter() - t0
        if rollout.num_tokens != expected:
            raise RuntimeError(f"vLLM made {rollout.num_tokens} tokens, expected {expected}")
        return wall, rollout.num_tokens

    engine = worker._llm.llm_engine.vllm_config
    return one_pass, {"init_s": init_s, "block_size": engine.cache_config.block_size,
                      "torch_threads": torch.get_num_threads(),
                      "prompt_tokens_mean": sum(len(p) for p in batch.prompt_ids) / len(batch)}


def start_hf(spec: dict):
    """transformers `generate` on the same prompts and sampling settings, one batch; (one pass, facts)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = spec["cfg"]
    r = cfg.rollout
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=getattr(torch, spec["dtype"])).eval()
    batch = prompts(tok, spec["prompts"], 1, cfg.run.seed)
    width = max(len(p) for p in batch.prompt_ids)
    ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch.prompt_ids):  # left padding, as decoder-only generation needs
        ids[i, width - len(p):] = torch.from_numpy(p.astype("int64"))
        mask[i, width - len(p):] = 1
    sampling = dict(do_sample=True, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                    max_new_tokens=r.max_new_tokens, min_new_tokens=r.max_new_tokens, pad_token_id=tok.pad_token_id)
    torch.manual_seed(cfg.run.seed)

    def one_pass() -> tuple[float, int]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **sampling)
        wall = time.perf_counter() - t0
        new = out[:, width:]  # min_new_tokens masked EOS, so no row ended early (none is padded)
        if tuple(new.shape) != (len(batch), r.max_new_tokens) or bool((new == tok.eos_token_id).any()):
            raise RuntimeError(f"generate made {tuple(new.shape)} tokens, expected {len(batch)} x {r.max_new_tokens}")
        return wall, new.numel()

    return one_pass, {"torch_threads": torch.get_num_threads()}


def _serve(start, spec: dict, commands, results) -> None:
    """A side kept alive between passes: start it, then run one pass per command."""
    try:
        one_pass, facts = start(spec)
        results.put(("ok", facts))
        while commands.get(timeout=3600) == "pass":
            results.put(("ok", one_pass()))
    except BaseException:
        results.put(("error", traceback.format_exc()))


class Served:
    """`start(spec)` in a spawned process that stays up and runs one pass per `run()`."""

    def __init__(self, start, spec: dict, timeout_s: float = 1800):
        ctx = mp.get_context("spawn")
        self.commands, self.results, self.timeout_s = ctx.Queue(), ctx.Queue(), timeout_s
        self.proc = ctx.Process(target=_serve, args=(start, spec, self.commands, self.results))
        self.proc.start()
        self.facts = self._answer(start.__name__)

    def run(self) -> tuple[float, int]:
        self.commands.put("pass")
        return self._answer("a pass")

    def _answer(self, what: str):
        kind, payload = self.results.get(timeout=self.timeout_s)
        if kind != "ok":
            self.close()
            raise SystemExit(f"{what} failed:\n{payload}")
        return payload

    def close(self) -> None:
        self.commands.put("stop")
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


def measure(start, spec: dict) -> dict:
    """Start one side in its own process, generate the batch 1 + passes times (the first is the
    warm-up: it also touches the KV cache's pages), and report the median of the rest."""
    side = Served(start, spec)
    try:
        runs = [side.run() for _ in range(1 + spec["passes"])]
    finally:
        side.close()
    walls, tokens = [w for w, _ in runs], runs[-1][1]
    wall = statistics.median(walls[1:])
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "first_wall_s": walls[0],
            "walls_s": walls[1:], **side.facts}


def paired(hf_spec: dict, vllm_spec: dict, pairs: int, rate_spec: dict | None = None) -> dict:
    """Both sides up at once, their passes alternating (in turn first within a pair), so that a slow
    spell of the machine falls on both: the speed-up is the median of the pairs' ratios. Only one
    side computes at a time; the other waits on its queue. With `rate_spec`, a third process
    measures the matrix-multiply rates (`start_matmul`) once in each pair, after its two passes."""
    sides = {"hf": Served(start_hf, hf_spec), "vllm": Served(start_vllm, vllm_spec)}
    if rate_spec is not None:
        sides["rate"] = Served(start_matmul, rate_spec)
    try:
        for name in ("hf", "vllm"):
            sides[name].run()  # the warm-up pass
        walls: dict[str, list[float]] = {"hf": [], "vllm": []}
        rates: list[dict[str, float]] = []
        for i in range(pairs):
            for name in (("hf", "vllm") if i % 2 == 0 else ("vllm", "hf")):
                wall, tokens = sides[name].run()
                walls[name].append(wall)
            if rate_spec is not None:
                rates.append(sides["rate"].run())
    finally:
        for side in sides.values():
            side.close()
    ratios = [h / v for h, v in zip(walls["hf"], walls["vllm"])]
    return {"pairs": pairs, "tokens": tokens, "hf_walls_s": walls["hf"], "vllm_walls_s": walls["vllm"],
            "ratios": ratios, "speedup": statistics.median(ratios),
            "hf_tokens_per_s": tokens / statistics.median(walls["hf"]),
            "vllm_tokens_per_s": tokens / statistics.median(walls["vllm"]), "matmul_rates": rates}


# ------------------------------------------------------------------------- roofline


def matmul_flops(model_path: str, dtype: str, rows: int, seconds: float = 2.0) -> dict[str, float]:
    """FLOP/s of matrix products in the model's dtype on this process's threads: torch's matmul on
    the model's linear shapes (one layer plus lm_head) at `rows` tokens in flight and on a 2048^3
    product; where an engine may compute with zentorch (`rollout.cpu_gemm`), zentorch's prepacked
    linear on the same two.

    The roofline takes the largest: the best rate the machine reaches, an upper bound (small
    shapes, like the tiny model's, run far below it)."""
    import torch
    from transformers import AutoConfig

    from flywheel.hardware import zentorch_unavailable

    c = AutoConfig.from_pretrained(model_path)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    model_shapes = [(rows, c.hidden_size, c.hidden_size + 2 * kv), (rows, c.hidden_size, c.hidden_size),
                    (rows, c.hidden_size, 2 * c.intermediate_size), (rows, c.intermediate_size, c.hidden_size),
                    (rows, c.hidden_size, c.vocab_size)]
    square = [(2048, 2048, 2048)]
    dt = getattr(torch, dtype)

    def rate(shapes, product) -> float:
        pairs = [product(torch.randn(m, k, dtype=dt), torch.randn(n, k, dtype=dt)) for m, k, n in shapes]
        flop = sum(2 * m * k * n for m, k, n in shapes)
        for run in pairs:
            run()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for run in pairs:
                run()
            reps += 1
        return flop * reps / (time.perf_counter() - t0)

    def torch_matmul(x, w):
        wt = w.t().contiguous()  # [K, N], a plain product
        return lambda: torch.matmul(x, wt)

    rates = {"model_shapes": rate(model_shapes, torch_matmul), "square_2048": rate(square, torch_matmul)}
    if zentorch_unavailable() is None:
        import zentorch  # noqa: F401  (its ops)

        def zen_linear(x, w):  # as vLLM's zentorch dispatch computes a layer: weight [N, K], prepacked
            packed = torch.ops.zentorch.zentorch_weight_prepack_for_linear(w)
            return lambda: torch.ops.zentorch.zentorch_linear_unary(x, packed, None, is_weight_prepacked=True)

        rates.update(zentorch_model_shapes=rate(model_shapes, zen_linear), zentorch_square_2048=rate(square, zen_linear))
    return rates


def start_matmul(spec: dict):
    """The matrix-multiply rates (`matmul_flops`) measured in a process of their own, one measurement
    per pass, so that the roofline can be measured in turn with the passes it is set against."""
    import torch

    torch.set_num_threads(spec["threads"])
    return (lambda: matmul_flops(spec["model_path"], spec["dtype"], rows=spec["prompts"])), {}


# ------------------------------------------------------------------------- driver


def bench_model(args, model: str, dtype: str, threads: int) -> dict:
    from flywheel.tiny_model import count_parameters, embedded_spec, ensure_embedded_model

    path = ensure_embedded_model("policy", embedded_spec(model))
    params = count_parameters(path)
    base = {"model_path": path, "dtype": dtype, "prompts": args.prompts, "compile_cache_dir": None,
            "prefix_caching": True, "passes": args.passes}
    out: dict = {"params": params, "dtype": dtype, "threads": threads, "prompts": args.prompts,
                 "new_tokens": args.new_tokens}

    out["hf"] = measure(start_hf, {**base, "cfg": load_cfg(args, model)})
    out["vllm_eager"] = measure(start_vllm, {**base, "cfg": load_cfg(args, model, ["rollout.enforce_eager=true"])})
    compiled = load_cfg(args, model, ["rollout.enforce_eager=false"])
    with tempfile.TemporaryDirectory(prefix="flywheel-compile-") as cache:  # empty: a first start
        out["vllm_compiled_first"] = measure(start_vllm, {**base, "cfg": compiled, "compile_cache_dir": cache})
        out["vllm_compiled"] = measure(start_vllm, {**base, "cfg": compiled, "compile_cache_dir": cache})
    mode = "compiled" if out["vllm_compiled"]["tokens_per_s"] >= out["vllm_eager"]["tokens_per_s"] else "eager"
    best = out["vllm_compiled" if mode == "compiled" else "vllm_eager"]

    # Samples sharing a prompt: the same number of sequences as prompts * samples.
    shared = {**base, "prompts": max(1, args.prompts // args.samples),
              "cfg": load_cfg(args, model, [f"rollout.enforce_eager={str(mode == 'eager').lower()}",
                                            f"rollout.samples_per_prompt={args.samples}"])}
    out["prefix_caching_on"] = measure(start_vllm, shared)
    out["prefix_caching_off"] = measure(start_vllm, {**shared, "prefix_caching": False})
    same_mode = f"rollout.enforce_eager={str(mode == 'eager').lower()}"
    # The engine as vLLM's CPU default would build it: 128-token KV blocks.
    out["vllm_block_128"] = measure(start_vllm, {**base, "cfg": load_cfg(args, model, [same_mode, "rollout.block_size=128"])})
    # Linear weights in torch's layout, not prepacked for oneDNN: what a weight update would cost
    # nothing to repack for (benchmarks/weight_sync.py), at this generation speed.
    out["vllm_unpacked"] = measure(start_vllm, {**base, "cfg": load_cfg(args, model, [same_mode]), "prepack": False})

    # The headline: both sides up at once, their passes alternating, the roofline measured in each pair.
    out["paired"] = paired({**base, "cfg": load_cfg(args, model)}, {**base, "cfg": load_cfg(args, model, [same_mode])},
                           args.pairs, rate_spec={**base, "threads": threads})
    p = out["paired"]
    flops = [max(r.values()) for r in p["matmul_rates"]]  # the best rate reached in each pair
    fractions = [p["tokens"] / wall / (f / (2 * params)) for wall, f in zip(p["vllm_walls_s"], flops)]
    by_shape = {k: max(r[k] for r in p["matmul_rates"]) for k in p["matmul_rates"][0]}
    out.update(
        vllm_mode=mode,
        vllm_tokens_per_s=p["vllm_tokens_per_s"],
        hf_tokens_per_s=p["hf_tokens_per_s"],
        speedup=p["speedup"],
        speedup_separate_starts=best["tokens_per_s"] / out["hf"]["tokens_per_s"],
        matmul_gflop_per_s=statistics.median(flops) / 1e9,
        matmul_gflop_per_s_each_pair=[f / 1e9 for f in flops],
        matmul_gflop_per_s_by_shape={k: v / 1e9 for k, v in by_shape.items()},
        matmul_best_shape=max(by_shape, key=by_shape.get),
        roofline_tokens_per_s=statistics.median(flops) / (2 * params),
        roofline_fractions=fractions,
        roofline_fraction=statistics.median(fractions),
        roofline_fraction_at_best_rate=p["vllm_tokens_per_s"] / (max(flops) / (2 * params)),
        compile_first_init_s=out["vllm_compiled_first"]["init_s"],
        compile_second_init_s=out["vllm_compiled"]["init_s"],
        eager_init_s=out["vllm_eager"]["init_s"],
        prefix_caching_speedup=out["prefix_caching_on"]["tokens_per_s"] / out["prefix_caching_off"]["tokens_per_s"],
        block_size=best["block_size"],
        block_size_speedup_over_128=best["tokens_per_s"] / out["vllm_block_128"]["tokens_per_s"],
        unpacked_over_prepacked=out["vllm_unpacked"]["tokens_per_s"] / best["tokens_per_s"],
    )
    return out


def print_table(results: dict) -> None:
    rows = [("params", "{:,}"), ("dtype", "{}"), ("threads", "{}"), ("hf_tokens_per_s", "{:.0f}"),
            ("vllm_eager", "{:.0f}"), ("vllm_compiled", "{:.0f}"), ("vllm_mode", "{}"),
            ("vllm_tokens_per_s", "{:.0f}"), ("speedup", "{:.2f}x"), ("speedup_separate_starts", "{:.2f}x"),
            ("matmul_gflop_per_s", "{:.0f}"),
            ("roofline_tokens_per_s", "{:.0f}"), ("roofline_fraction", "{:.2f}"),
            ("roofline_fraction_at_best_rate", "{:.2f}"), ("eager_init_s", "{:.1f}"),
            ("compile_first_init_s", "{:.1f}"), ("compile_second_init_s", "{:.1f}"),
            ("prefix_caching_on", "{:.0f}"), ("prefix_caching_off", "{:.0f}"), ("prefix_caching_speedup", "{:.2f}x"),
            ("block_size", "{}"), ("vllm_block_128", "{:.0f}"), ("block_size_speedup_over_128", "{:.2f}x"),
            ("vllm_unpacked", "{:.0f}"), ("unpacked_over_prepacked", "{:.2f}x")]
    names = list(results)
    print(f"{'':<32}" + "".join(f"{n:>14}" for n in names))
    for key, fmt in rows:
        cells = []
        for n in names:
            v = results[n][key]
            cells.append(fmt.format(v["tokens_per_s"] if isinstance(v, dict) else v))
        print(f"{key:<32}" + "".join(f"{c:>14}" for c in cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/rollout.json", help="result file (repository-relative)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 prompts, the tiny model only")
    parser.add_argument("--models", default=",".join(MODELS), help="embedded models, comma-separated")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3, help="timed passes after the warm-up; their median counts")
    parser.add_argument("--pairs", type=int, default=5,
                        help="alternating generate / engine passes of the headline, after a warm-up of each")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt in the prefix-caching runs")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--config", default=CONFIG, help="sampling settings come from its rollout section")
    parser.add_argument("--override", action="append", default=[], help="config override, e.g. rollout.top_p=0.9")
    add_emulation_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.models, args.pairs = 32, "tiny", 2

    from flywheel.hardware import resolve_dtype

    emulated = begin_emulation(args)  # before torch loads here; every child inherits the settings
    cpu = read_cpu_info()
    threads = actor_threads(num_threads=cpu.cores)  # every core, as rollout.num_threads would give the actor
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch loads here and in every child
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch

    torch.set_num_threads(threads)
    dtype = resolve_dtype(load_cfg(args, "tiny").model.dtype, "cpu", cpu)
    on = f", emulated on {cpu.emulated_from}" if emulated else ""
    print(f"{cpu.kind}{on}, {cpu.cores} cores: {dtype.reason} {threads} threads")
    load_start = load_average("at the start")
    results = {m: bench_model(args, m, dtype.dtype, threads) for m in args.models.split(",")}
    print_table(results)
    # The headline keys at the top level are the largest model's (the ~80M one the targets name).
    headline = results.get("small") or list(results.values())[-1]
    write_result(args.json, {"benchmark": "rollout", "quick": args.quick, "dtype_reason": dtype.reason,
                             "config": args.config, "overrides": args.override,
                             "emulated_cpu": emulated, "emulated_from": cpu.emulated_from,
                             **{k: headline[k] for k in HEADLINE_KEYS}, "headline_model_params": headline["params"],
                             "models": results,
                             "load_average": {"start": load_start, "end": load_average("at the end")}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

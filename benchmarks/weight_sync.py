"""Weight sync: pushing every policy weight into one and into two running rollout
actors, against an in-memory copy of the same bytes, in one run.

The sending half is the learner's (`learner.weight_sync.WeightSender`, run here
in this process as learner rank 0 would, on the model's `named_parameters` in
the run dtype); the receiving half is the rollout actor's
(`actors.rollout.RolloutWorker.receive_weights`, each actor in its own process,
built from the config by `cluster.groups.rollout_worker_kwargs`); the buckets
are `sync.bucket_mb` as in a run.  Threads follow the config as Ray would give
them (`actor_threads`: one per actor and for the learner by default).

`sync_s` is the median wall time of one update (meta handed over, every bucket
sent, loaded into vLLM, acknowledged), after one warm-up update, over the
config's `sync.transport` (auto: through shared memory, as the actors run on the
learner's machine); the same updates over the group's broadcast are the
baseline (`broadcast`, `shm_speedup_over_broadcast`);
`memcpy_s` the median time of one `copy_` of the flattened weights (same bytes)
into a preallocated buffer on the learner's threads; `repack_s` the median time of the CPU
engine's own prepacking (oneDNN's blocked layout) of every linear weight, one layer after
another, on an actor's threads, which any update of a running CPU engine pays
(`sync_over_repack` beside `sync_over_memcpy`); beside it, the same packing from weights already
laid out [K, N] (`repack_from_kn_s`, another reorder in oneDNN, faster on some CPUs) and the
torch transposition that would make them (`transpose_s`): the two together, against `repack_s`,
tell whether sending the weights transposed would pay.  The actors load each update in place
(`actors/cpu_weights.py`, `load_path` "in place"); the same one-actor update through vLLM's
layerwise reload is the baseline of that (`reload`, `in_place_speedup_over_reload`).  The
actors also report where their time went: in the broadcasts (the receiving thread), in
loading (`load`: which repacks each completed layer's CPU GEMM weights), and in the
update's start and finish; the first two overlap, so they add up to more than `receive`.
Each actor loads on `sync.load_threads` threads (by default the machine's cores divided among
the actors, as in a run, since the learner only waits meanwhile); where that is more than one,
the same one-actor update loaded on one thread is the baseline (`one_load_thread`,
`load_threads_speedup_over_one`).  `cpu_gemm` is the library the engines compute linear
layers with (`rollout.cpu_gemm`); where it is zentorch (an AMD CPU with AVX-512), its
layout written in place as the loader does is timed as well (`zentorch_repack_s`, which
`sync_over_repack` then uses; `zentorch_own_repack_s`: zentorch's own packing copied into
place), and two baselines run: the same one-actor update into an engine on oneDNN (`onednn`,
`zentorch_speedup_over_onednn`), and packed by zentorch instead of actors/zen_pack.py's kernel
(`zentorch_packing`, `pack_kernel_speedup_over_zentorch_packing`).

    python benchmarks/weight_sync.py --json benchmarks/results/weight_sync.json
    python benchmarks/weight_sync.py --quick --json /tmp/weight_sync_quick.json   # tiny model, one repeat

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

from common import add_emulation_option, begin_emulation, load_average, write_result

from flywheel.hardware import actor_threads, torch_threads, zentorch_unavailable

CONFIG = "configs/local_tiny_ppo.yaml"
TIMEOUT_S = 600.0


def _engine_load_threads(worker) -> int:
    """Run through `LLM.collective_rpc`: the torch threads the engine applies updates with."""
    return worker.weight_transfer_engine.load_threads


def _actor_main(kwargs: dict, rank: int, world: int, commands, results, load: str,
                load_threads: int | None, env: dict[str, str]) -> None:
    """One rollout actor in its own process: join the group, receive updates on command."""
    try:
        from actors.cpu_weights import LOAD_ENV
        from actors.rollout import RolloutWorker

        os.environ.update({**env, LOAD_ENV: load})

        worker = RolloutWorker(**kwargs)
        _time_receive_phases(worker)
        results.put(("started", None))  # the group forms once every engine is up, as the driver does
        _, port = commands.get(timeout=TIMEOUT_S)
        worker.init_weight_transfer("127.0.0.1", port, rank=rank, world_size=world, backend="gloo",
                                    timeout_s=TIMEOUT_S, load_threads=load_threads, actors_on_node=world - 1)
        results.put(("ready", worker._llm.collective_rpc(_engine_load_threads)[0]))
        while True:
            cmd, meta = commands.get(timeout=TIMEOUT_S)
            if cmd == "stop":
                break
            PHASES.clear()
            t0 = time.perf_counter()
            worker.receive_weights(meta)
            results.put(("done", {"receive_s": time.perf_counter() - t0, **PHASES,
                                  "load_path": worker.weight_load_path(), "cpu_gemm": worker.cpu_gemm}))
        worker.shutdown()
    except BaseException:
        results.put(("crashed", traceback.format_exc()))


PHASES: dict[str, float] = {}


def _time_receive_phases(worker) -> None:
    """Wrap the receiving engine's steps with timers (benchmark only; the code path is unchanged)."""
    import actors.weight_receiver as wr

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    engine = wr.TorchDistWeightTransferEngine
    for name in ("_broadcast", "_load", "start_weight_update", "finish_weight_update"):
        if not hasattr(getattr(engine, name), "__wrapped_timer__"):
            wrapped = timed(name.strip("_") + "_s", getattr(engine, name))
            wrapped.__wrapped_timer__ = True
            setattr(engine, name, wrapped)


def sync_into(args, cfg, model_path: str, dtype: str, actors: int, transport: str, load: str = "auto",
              load_threads: int | None = None, env: dict[str, str] | None = None) -> dict:
    """Median seconds of one update into `actors` running actors over `transport`, loaded by `load`
    (actors.cpu_weights.LOAD_ENV: "auto", in place where it applies, or "reload", vLLM's reload)
    on `load_threads` threads each (None: as `sync.load_threads` says), the actors' environment
    extended by `env`, and their breakdown."""
    import torch

    from cluster.groups import rollout_worker_kwargs
    from flywheel.net import free_port
    from learner.weight_sync import WeightSender
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    ctx = mp.get_context("spawn")
    world = 1 + actors
    links = [(ctx.Queue(), ctx.Queue()) for _ in range(actors)]
    procs = [ctx.Process(target=_actor_main, daemon=True,
                         args=(rollout_worker_kwargs(cfg, model_path, dtype, k), k + 1, world, *links[k], load,
                               load_threads or cfg.sync.load_threads, env or {}))
             for k in range(actors)]
    for proc in procs:
        proc.start()
    sender = WeightSender("gloo", transport)
    try:
        for _, results in links:
            _get(results, "started")
        port = free_port()  # chosen once every engine is up: a starting engine binds ports of its own
        for commands, _ in links:
            commands.put(("join", port))
        sender.init_group("127.0.0.1", port, world_size=world, timeout_s=TIMEOUT_S)
        threads = [_get(results, "ready") for _, results in links]
        walls, sends, phases = [], [], []
        bucket_bytes = int(cfg.sync.bucket_mb * 2**20)
        for version in range(1, 2 + args.repeats):  # the first is a warm-up
            meta = WeightSender.make_meta([(n, t.shape, t.dtype) for n, t in named], version, bucket_bytes)
            t0 = time.perf_counter()
            for commands, _ in links:
                commands.put(("receive", meta))
            sender.send(iter(named), meta)
            t_send = time.perf_counter() - t0
            done = [_get(results, "done") for _, results in links]
            if version > 1:
                walls.append(time.perf_counter() - t0)
                sends.append(t_send)
                phases.append(done)
        used = sender.transport_in_use
        for commands, _ in links:
            commands.put(("stop", None))
        for proc in procs:
            proc.join(timeout=60)
    finally:
        sender.close()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
    keys = sorted(k for k in phases[0][0] if k.endswith("_s"))
    return {"transport": used, "load_path": phases[0][0]["load_path"], "cpu_gemm": phases[0][0]["cpu_gemm"],
            "load_threads": threads[0],
            "sync_s": statistics.median(walls),
            "sync_s_all": walls,
            "sender_s": statistics.median(sends),
            "actor_phases_s": {k: statistics.median(p[0][k] for p in phases) for k in keys},
            "buckets": len(meta_buckets(meta))}


def meta_buckets(meta):
    from flywheel.weight_buckets import plan_buckets

    return plan_buckets(meta.specs, meta.bucket_bytes)


def memcpy_seconds(model, repeats: int = 20) -> tuple[float, int, int]:
    """Median seconds of one copy of the model's flattened weights; their bytes; their parameter count."""
    import torch

    flat = torch.cat([p.detach().reshape(-1).view(torch.uint8) for p in model.parameters()])
    params = sum(p.numel() for p in model.parameters())
    dst = torch.empty_like(flat)
    dst.copy_(flat)  # fault the pages in
    return _median_s(lambda: dst.copy_(flat), repeats), flat.numel(), params


def _linear_weights(model) -> list:
    """Every linear weight of the model as the CPU engine holds it ([N, K]), fused as the engine fuses
    them (q/k/v, gate/up)."""
    import torch

    weights = [model.lm_head.weight.detach()]
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        weights += [torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
                    attn.o_proj.weight.detach(), torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                    mlp.down_proj.weight.detach()]
    return weights


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def repack_seconds(model, threads: int, repeats: int = 5) -> dict | None:
    """The CPU engine's own GEMM prepacking (vLLM's oneDNN `create_onednn_mm`) of every linear
    weight, one layer after another, on `threads` threads as an actor has: what any update of a
    running CPU engine costs at least, since the engine keeps only the prepacked copies. None where
    vLLM's CPU ops have no oneDNN.

    Median seconds of: `repack_s`, from the weights as they arrive ([N, K], which oneDNN reads as a
    transposed [K, N]); `repack_from_kn_s`, the same packing from [K, N] copies made beforehand
    (oneDNN's other reorder, for that layout); `transpose_s`, making those copies with torch; and,
    where zentorch can be had, `zentorch_repack_s`, zentorch's layout written as an engine on
    zentorch (`rollout.cpu_gemm`) updates a layer (actors/zen_pack.py's kernel, straight into
    place), and `zentorch_own_repack_s`, zentorch's own packing copied into place."""
    import torch
    from vllm import _custom_ops as ops

    from actors.cpu_weights import ONEDNN_CACHE

    if not ops._supports_onednn:
        return None
    weights = _linear_weights(model)
    with torch_threads(threads):
        kn = [w.t().contiguous() for w in weights]
        handlers = [ops.create_onednn_mm(w.t(), ONEDNN_CACHE) for w in weights]  # warm-up

        def repack(sources):
            for i, w in enumerate(sources):  # one layer at a time, as an update replaces them
                handlers[i] = ops.create_onednn_mm(w, ONEDNN_CACHE)

        def transpose():
            for w, dst in zip(weights, kn):
                dst.copy_(w.t())

        repack(kn)  # warm-up of the other reorder
        result = {"repack_s": _median_s(lambda: repack([w.t() for w in weights]), repeats),
                  "repack_from_kn_s": _median_s(lambda: repack(kn), repeats),
                  "transpose_s": _median_s(transpose, repeats)}
        del handlers
        if zentorch_unavailable() is None:  # zentorch's packing, as an engine on it updates a layer
            import zentorch  # noqa: F401  (its ops)

            from actors.cpu_weights import _zen_prepack
            from actors.zen_pack import PACKER

            packed = [_zen_prepack(w) for w in weights]

            def zen_repack():  # as the loader does
                for w, dst in zip(weights, packed):
                    if not PACKER.pack_into(dst, w):
                        dst.copy_(_zen_prepack(w))

            def zen_own_repack():
                for w, dst in zip(weights, packed):
                    dst.copy_(_zen_prepack(w))

            result["zentorch_repack_s"] = _median_s(zen_repack, repeats)
            result["zentorch_own_repack_s"] = _median_s(zen_own_repack, repeats)
    return result


def _get(results, expected: str):
    kind, payload = results.get(timeout=TIMEOUT_S)
    if kind != expected:
        raise SystemExit(f"actor answered {kind}: {payload}")
    return payload


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/weight_sync.json", help="result file (repository-relative)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the tiny model, one repeat")
    parser.add_argument("--model", default="small", help="embedded model (model.embedded)")
    parser.add_argument("--repeats", type=int, default=5, help="timed updates after one warm-up")
    parser.add_argument("--actors", default="1,2", help="actor counts, comma-separated")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--override", action="append", default=[], help="config override, e.g. sync.bucket_mb=16")
    add_emulation_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.model, args.repeats = "tiny", 1
    emulated = begin_emulation(args)  # before torch loads here; every actor inherits the settings

    from cluster.config import load_config
    from flywheel.hardware import resolve_dtype
    from flywheel.tiny_model import embedded_spec, ensure_embedded_model

    cfg = load_config(args.config, [f"model.embedded={args.model}", *args.override])
    dtype = resolve_dtype(cfg.model.dtype, "cpu")
    actor_t = actor_threads(cfg.rollout.num_cpus_per_actor, cfg.rollout.num_threads)
    learner_t = actor_threads(cfg.learner.num_cpus_per_rank, cfg.learner.num_threads)
    os.environ["OMP_NUM_THREADS"] = str(actor_t)  # what each spawned actor starts with, as under Ray
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import torch

    torch.set_num_threads(learner_t)
    path = ensure_embedded_model("policy", embedded_spec(args.model))
    print(f"{dtype.reason} actor threads {actor_t}, learner threads {learner_t}, bucket {cfg.sync.bucket_mb} MiB")
    load_start = load_average("at the start")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype.dtype))
    memcpy_s, nbytes, params = memcpy_seconds(model)
    repack = repack_seconds(model, actor_t) or {}
    repack_s = repack.get("repack_s")
    del model
    report = {"benchmark": "weight_sync", "quick": args.quick, "model": args.model, "params": params,
              "bytes": nbytes, "dtype": dtype.dtype, "emulated_cpu": emulated, "bucket_mb": cfg.sync.bucket_mb,
              "memcpy_s": memcpy_s,
              **{k: repack.get(k) for k in ("repack_s", "repack_from_kn_s", "transpose_s", "zentorch_repack_s",
                                                "zentorch_own_repack_s")},
              "actor_threads": actor_t, "learner_threads": learner_t, "actors": {}}
    if repack_s is not None:
        print(f"the engine's own GEMM prepacking of every linear weight: {repack_s:.4f} s "
              f"({repack_s / memcpy_s:.1f}x the copy) on {actor_t} thread(s); from [K, N] copies "
              f"{repack['repack_from_kn_s']:.4f} s, but making them takes {repack['transpose_s']:.4f} s")
    if repack.get("zentorch_repack_s") is not None:
        print(f"zentorch's layout of every linear weight, written in place: {repack['zentorch_repack_s']:.4f} s "
              f"({repack['zentorch_repack_s'] / memcpy_s:.1f}x the copy); zentorch's own packing copied into "
              f"place: {repack['zentorch_own_repack_s']:.4f} s ({repack['zentorch_own_repack_s'] / memcpy_s:.1f}x)")
    print(f"{'actors':>6} {'transport':>9} {'params':>12} {'bytes':>12} {'sync_s':>8} {'memcpy_s':>9} {'ratio':>7} "
          f"{'GB/s':>6} {'thr':>3}  actor phases (s)")
    report["broadcast"] = {}
    for n in (int(a) for a in args.actors.split(",")):
        for transport, where in ((cfg.sync.transport, report["actors"]), ("broadcast", report["broadcast"])):
            r = sync_into(args, cfg, path, dtype.dtype, n, transport)
            r.update(params=params, bytes=nbytes, memcpy_s=memcpy_s, sync_over_memcpy=r["sync_s"] / memcpy_s,
                     gb_per_s=nbytes / r["sync_s"] / 1e9,
                     sync_over_repack=r["sync_s"] / own if (own := repack.get(
                         "zentorch_repack_s" if r["cpu_gemm"] == "zentorch" else "repack_s")) else None)
            where[str(n)] = r
            phases = " ".join(f"{k.removesuffix('_s')}={v:.3f}" for k, v in r["actor_phases_s"].items())
            print(f"{n:>6} {r['transport']:>9} {params:>12,} {nbytes:>12,} {r['sync_s']:>8.3f} {memcpy_s:>9.4f} "
                  f"{r['sync_over_memcpy']:>7.1f} {r['gb_per_s']:>6.2f} {r['load_threads']:>3}  {phases}")
        report["actors"][str(n)]["shm_speedup_over_broadcast"] = (report["broadcast"][str(n)]["sync_s"]
                                                                  / report["actors"][str(n)]["sync_s"])
    one = report["actors"].get("1")

    def baseline(key: str, mark: str, note: str, run_cfg=cfg, **how) -> float:
        """The same one-actor update another way, in this run: kept as report[key], printed with
        `mark`; returns how many times as long it took as the headline update."""
        r = sync_into(args, run_cfg, path, dtype.dtype, 1, cfg.sync.transport, **how)
        r.update(sync_over_memcpy=r["sync_s"] / memcpy_s)
        report[key] = {"1": r}
        phases = " ".join(f"{k.removesuffix('_s')}={v:.3f}" for k, v in r["actor_phases_s"].items())
        print(f"{1:>6} {r['transport'] + mark:>9} {params:>12,} {nbytes:>12,} {r['sync_s']:>8.3f} {memcpy_s:>9.4f} "
              f"{r['sync_over_memcpy']:>7.1f} {nbytes / r['sync_s'] / 1e9:>6.2f} {r['load_threads']:>3}  {phases}")
        print(f"{mark} {note}")
        return r["sync_s"] / one["sync_s"]

    if one is not None and one["load_threads"] > 1:  # loading on more threads against generation's one
        one["load_threads_speedup_over_one"] = baseline(
            "one_load_thread", "+", f"the same update loaded on 1 thread instead of {one['load_threads']} "
            "(sync.load_threads)", load_threads=1)
    if one is not None and one["cpu_gemm"] == "zentorch":  # zentorch's packing against oneDNN's
        onednn = load_config(args.config, [f"model.embedded={args.model}", *args.override, "rollout.cpu_gemm=onednn"])
        one["zentorch_speedup_over_onednn"] = baseline(
            "onednn", "#", "the same update into an engine on oneDNN (rollout.cpu_gemm=onednn) instead of zentorch",
            run_cfg=onednn)
    if one is not None and one["cpu_gemm"] == "zentorch" and one["load_path"] == "in place":
        from actors.zen_pack import PACK_ENV  # the packing kernel against zentorch's own packing

        one["pack_kernel_speedup_over_zentorch_packing"] = baseline(
            "zentorch_packing", "%", f"the same update packed by zentorch and copied into place ({PACK_ENV}=zentorch) "
            "instead of written in place by actors/zen_pack.py", env={PACK_ENV: "zentorch"})
    if one is not None and one["load_path"] == "in place":  # loading in place against vLLM's reload
        one["in_place_speedup_over_reload"] = baseline(
            "reload", "*", "the same update through vLLM's layerwise reload instead of in place "
            "(actors/cpu_weights.py)", load="reload")
    report.update({k: report["actors"]["1"].get(k) for k in ("transport", "load_path", "cpu_gemm", "sync_s",
                                                              "sync_over_memcpy", "zentorch_speedup_over_onednn",
                                                              "gb_per_s", "sync_over_repack", "shm_speedup_over_broadcast",
                                                              "in_place_speedup_over_reload", "load_threads",
                                                              "load_threads_speedup_over_one",
                                                              "pack_kernel_speedup_over_zentorch_packing")}
                  if "1" in report["actors"] else {})
    report["load_average"] = {"start": load_start, "end": load_average("at the end")}
    write_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

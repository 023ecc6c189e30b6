"""Weight sync across processes, through the real components.

A `RolloutWorker` (real vLLM engine, fp32) runs in the test process; a
`WeightSender` runs in a spawned process, as the learner would.  They form a
gloo group on 127.0.0.1.  The sender loads the embedded tiny policy in
transformers, adds seeded noise to every weight and sends it in small buckets
(several tensors per bucket, and tensors larger than a bucket).  After each
update vLLM's logprobs must equal transformers' logprobs of the perturbed model,
and every weight of every actor (two actor processes, one group) must equal the
sender's, bit for bit.

The perturbed model is rebuilt from (model path, seed) in both processes by
`perturbed_model`, so expected values never cross the process boundary.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback

import numpy as np
import pytest
import torch

from flywheel.net import free_port

from flywheel.weight_buckets import plan_buckets

TIMEOUT_S = 60.0  # every group collective and every queue wait
START_TIMEOUT_S = 300.0  # an actor process importing vLLM and starting its engine, on a busy machine
BUCKET_BYTES = 300_000  # embed (1 MiB) and MLP weights (768 KiB) exceed it; norms share buckets
ATOL = 1e-4  # fp32 engine against fp32 transformers


def perturbed_model(model_path: str, seed: int, dtype: str = "float32"):
    """The tiny policy in `dtype`, with N(0, 0.02) noise on every weight (seed 0: none)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    if seed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return model.eval()


def hf_logprobs(model, prompt: list[int], completion: list[int]) -> np.ndarray:
    """transformers' logprobs (C,) of `completion` after `prompt`."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None])
    return lp[:, 0].numpy()


def _sender_main(model_path: str, port: int, commands, results) -> None:
    """The learner stand-in: joins the group as rank 0, then serves commands."""
    from learner.weight_sync import WeightSender

    try:
        sender = WeightSender("gloo")
        sender.init_group("127.0.0.1", port, world_size=2, timeout_s=TIMEOUT_S)
        results.put(("ready", None))
        while True:
            cmd, version, seed, fault = commands.get(timeout=5 * TIMEOUT_S)
            if cmd == "stop":
                break
            if cmd == "transport":  # what the next updates ask for ("auto", "shm" or "broadcast")
                sender.transport = fault
                continue
            named = list(perturbed_model(model_path, seed).named_parameters())
            shapes = [(n, p.shape, p.dtype) for n, p in named]
            if fault == "unknown_name":
                shapes[3] = ("model.layers.0.mlp.not_a_proj.weight",) + shapes[3][1:]
            if fault == "dtype":
                shapes[5] = shapes[5][:2] + (torch.bfloat16,)
            meta = WeightSender.make_meta(shapes, version, BUCKET_BYTES)
            results.put(("meta", meta))  # travels before the tensors, as over Ray
            tensors = ((n, p.detach()) for n, p in named)
            if fault == "abort_midway":
                # A learner that dies while producing tensors: the 6th is wrong.
                tensors = ((n, p.detach() if i != 5 else p.detach()[:1]) for i, (n, p) in enumerate(named))
            try:
                sender.send(tensors, meta)
                results.put(("sent", sender.transport_in_use))
            except (RuntimeError, ValueError) as exc:
                results.put(("send_failed", str(exc)))
        sender.close()
    except BaseException:
        results.put(("crashed", traceback.format_exc()))


def _get(results, expected: str, timeout_s: float = TIMEOUT_S):
    kind, payload = results.get(timeout=timeout_s)
    assert kind == expected, f"sender answered {kind}: {payload}"
    return payload


@pytest.fixture(scope="module")
def linked(model_path):
    """(worker, commands, results): a vLLM actor and a sender process in one group."""
    from actors.rollout import RolloutWorker

    worker = RolloutWorker(model_path, dtype="float32", max_model_len=256, seed=0, kv_cache_gib=1)
    ctx = mp.get_context("spawn")
    commands, results = ctx.Queue(), ctx.Queue()
    port = free_port()
    proc = ctx.Process(target=_sender_main, args=(model_path, port, commands, results), daemon=True)
    proc.start()
    try:
        worker.init_weight_transfer("127.0.0.1", port, rank=1, world_size=2, backend="gloo", timeout_s=TIMEOUT_S)
        _get(results, "ready")
        yield worker, commands, results
        commands.put(("stop", 0, 0, None))
        proc.join(timeout=TIMEOUT_S)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
        worker.shutdown()


def _update(linked, seed: int, fault: str | None = None):
    """Drive one update as the driver would: meta first, then send || receive. Returns (meta, the
    new version, the transport the sender used) or, if receiving failed, (meta, exception, the
    sender's answer)."""
    worker, commands, results = linked
    version = worker.policy_version + 1
    commands.put(("send", version, seed, fault))
    meta = _get(results, "meta")
    try:
        returned = worker.receive_weights(meta)
    except Exception as exc:
        return meta, exc, results.get(timeout=TIMEOUT_S)
    return meta, returned, _get(results, "sent")


# A fixed sequence for scoring, and a prompt longer than one 128-token CPU KV block.
RNG = np.random.default_rng(7)
PROMPT = RNG.integers(3, 1000, size=20).tolist()
COMPLETION = RNG.integers(3, 1000, size=12).tolist()
LONG_PROMPT = RNG.integers(3, 1000, size=140).tolist()


def _greedy(worker, prompt: list[int]):
    from flywheel.records import PromptBatch

    batch = PromptBatch(prompts=["long"], prompt_ids=[np.array(prompt, dtype=np.int32)])
    r = worker.generate(batch, max_new_tokens=6, temperature=0.0, top_p=1.0)
    return r.completion_ids[0].tolist(), r.logprobs[0]


def _engine_load_threads(worker) -> int:
    return worker.weight_transfer_engine.load_threads


def test_updates_reach_the_running_engine(linked, model_path):
    from actors.rollout import update_load_threads

    worker = linked[0]
    assert worker.policy_version == 0
    before = worker.score_sequence_logprobs(PROMPT, COMPLETION)
    np.testing.assert_allclose(before, hf_logprobs(perturbed_model(model_path, 0), PROMPT, COMPLETION), atol=ATOL)
    _greedy(worker, LONG_PROMPT)  # fills the prefix cache with the old weights' KV

    threads = torch.get_num_threads()
    meta, version, transport = _update(linked, seed=1)
    assert version == 1 == worker.policy_version
    # It loaded on the default's threads (this process is the only actor) and gave them back after.
    assert worker._llm.collective_rpc(_engine_load_threads)[0] == update_load_threads(None, 1)
    assert torch.get_num_threads() == threads
    assert transport == "shm"  # sender and actor share a machine: the buckets go through shared memory
    sizes = [len(b.slots) for b in plan_buckets(meta.specs, meta.bucket_bytes)]
    assert max(sizes) > 1 and 1 in sizes and len(sizes) > 3, sizes
    assert any(b.nbytes > BUCKET_BYTES for b in plan_buckets(meta.specs, meta.bucket_bytes))

    model1 = perturbed_model(model_path, 1)
    after = worker.score_sequence_logprobs(PROMPT, COMPLETION)
    np.testing.assert_allclose(after, hf_logprobs(model1, PROMPT, COMPLETION), atol=ATOL)
    assert np.abs(after - before).max() > 1e-2  # the update changed what vLLM computes

    # Same long prompt again: served from the new weights, not the cached block.
    ids, lps = _greedy(worker, LONG_PROMPT)
    np.testing.assert_allclose(lps, hf_logprobs(model1, LONG_PROMPT, ids), atol=ATOL)

    _, version, _ = _update(linked, seed=2)
    assert version == 2 == worker.policy_version
    after2 = worker.score_sequence_logprobs(PROMPT, COMPLETION)
    np.testing.assert_allclose(after2, hf_logprobs(perturbed_model(model_path, 2), PROMPT, COMPLETION), atol=ATOL)
    assert worker.health()["engine_weight_version"] == "2"


@pytest.mark.parametrize(
    "fault, names",
    [("unknown_name", "model.layers.0.mlp.not_a_proj.weight"), ("dtype", "bfloat16 sent")],
)
def test_bad_meta_is_rejected_before_transfer(linked, fault, names):
    worker = linked[0]
    version, before = worker.policy_version, worker.score_sequence_logprobs(PROMPT, COMPLETION)
    _, exc, answer = _update(linked, seed=3, fault=fault)
    assert isinstance(exc, ValueError) and names in str(exc), exc
    assert answer[0] == "send_failed" and "rejected" in answer[1], answer
    assert worker.policy_version == version  # nothing applied, the engine still serves
    np.testing.assert_array_equal(worker.score_sequence_logprobs(PROMPT, COMPLETION), before)


def test_learner_abort_then_resend(linked, model_path):
    from actors.weight_receiver import WeightUpdateAborted

    worker = linked[0]
    version = worker.policy_version
    _, exc, answer = _update(linked, seed=4, fault="abort_midway")
    assert isinstance(exc, WeightUpdateAborted), exc
    assert answer[0] == "send_failed" and "announced" in answer[1], answer
    assert worker.policy_version == version
    with pytest.raises(RuntimeError, match="partially applied"):
        worker.score_sequence_logprobs(PROMPT, COMPLETION)

    _, new_version, _ = _update(linked, seed=4)
    assert new_version == version + 1
    np.testing.assert_allclose(
        worker.score_sequence_logprobs(PROMPT, COMPLETION),
        hf_logprobs(perturbed_model(model_path, 4), PROMPT, COMPLETION),
        atol=ATOL,
    )


def test_an_actor_that_cannot_map_the_learners_memory_gets_the_weights_over_the_group(linked, model_path,
                                                                                    monkeypatch):
    """As an actor on another machine: "auto" falls back to the broadcast and the update lands;
    "shm" stops the update with a message naming the fix, and the next update mends the engine."""
    from actors.weight_receiver import WeightUpdateAborted
    from flywheel.shared_region import SharedRegion

    worker, commands, _ = linked

    def elsewhere(pid, fd, token, nbytes):
        raise FileNotFoundError("no such region on this machine")

    def lands(seed: int, transport: str) -> int:
        _, version, used = _update(linked, seed=seed)
        assert (version, used) == (worker.policy_version, transport)
        np.testing.assert_allclose(worker.score_sequence_logprobs(PROMPT, COMPLETION),
                                   hf_logprobs(perturbed_model(model_path, seed), PROMPT, COMPLETION), atol=ATOL)
        return version

    monkeypatch.setattr(SharedRegion, "attach", elsewhere)
    commands.put(("transport", 0, 0, "broadcast"))  # the sender drops its region
    lands(seed=7, transport="broadcast")
    commands.put(("transport", 0, 0, "auto"))  # and shares a new one, which the actor cannot map
    version = lands(seed=8, transport="broadcast")

    commands.put(("transport", 0, 0, "shm"))
    _, exc, answer = _update(linked, seed=9)
    assert isinstance(exc, WeightUpdateAborted), exc
    assert answer[0] == "send_failed" and "could not map" in answer[1] and "sync.transport=auto" in answer[1], answer
    assert worker.policy_version == version

    commands.put(("transport", 0, 0, "auto"))  # it gave up on shared memory for this group
    lands(seed=9, transport="broadcast")


def _actor_main(model_path: str, rank: int, world_size: int, commands, results, dtype: str = "float32",
                eager: bool = True, load_threads: int | None = None, cpu_gemm: str = "auto") -> None:
    """A rollout actor in its own process (as under Ray): joins the group, then serves commands."""
    try:
        from actors.rollout import RolloutWorker

        worker = RolloutWorker(model_path, dtype=dtype, max_model_len=128, seed=0, kv_cache_gib=1,
                               enforce_eager=eager, cpu_gemm=cpu_gemm)
        with open("/proc/self/maps") as f:  # which of vLLM's kernel libraries (_C, _C_AVX512, _C_AVX2) it loaded
            kernels = sorted({line.rsplit("/", 1)[-1].strip() for line in f if "/vllm/_C" in line})
        facts = {"vllm_kernels": kernels, "torch_capability": torch.backends.cpu.get_cpu_capability(),
                 "cpu_gemm": worker.cpu_gemm}
        results.put(("started", facts))  # the group forms once every engine is up, as the driver does
        _, port = commands.get(timeout=START_TIMEOUT_S)
        worker.init_weight_transfer("127.0.0.1", port, rank=rank, world_size=world_size, backend="gloo",
                                    timeout_s=TIMEOUT_S, load_threads=load_threads, actors_on_node=world_size - 1)
        while True:
            cmd, meta = commands.get(timeout=5 * TIMEOUT_S)
            if cmd == "stop":
                break
            if cmd == "receive":
                worker.receive_weights(meta)
            results.put(("weights", (worker.engine_weights(), worker.weight_load_path(),
                                     worker.score_sequence_logprobs(PROMPT, COMPLETION))))
        worker.shutdown()
    except BaseException:
        results.put(("crashed", traceback.format_exc()))


def _assert_same_weights(engine: dict[str, np.ndarray], model, actor: int) -> None:
    expected = {n: p.detach().float().numpy() for n, p in model.named_parameters()}  # bf16 widens exactly
    assert sorted(engine) == sorted(expected), f"actor {actor}: names differ"
    for name, tensor in expected.items():
        np.testing.assert_array_equal(engine[name], tensor, err_msg=f"actor {actor}: {name} differs")


@pytest.fixture(scope="module")
def tied_model_path(model_path, tmp_path_factory) -> str:
    """The tiny policy with its lm_head tied to the embedding (as many small Llamas ship): the
    checkpoint without `lm_head.weight`, so transformers and vLLM both tie it."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tied") / "policy"
    shutil.copytree(model_path, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = load_file(out / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize(("cpu", "dtype", "load", "eager", "tied", "threads", "gemm"), [
    ("native", "float32", "auto", True, False, 2, "auto"), ("avx2", "float32", "auto", True, False, None, "auto"),
    ("native", "bfloat16", "auto", True, False, 2, "auto"), ("native", "float32", "reload", True, False, None, "auto"),
    ("native", "float32", "auto", False, False, None, "auto"), ("native", "float32", "auto", True, True, None, "auto"),
    ("native", "bfloat16", "auto", True, True, None, "onednn"), ("native", "float32", "auto", False, True, None,
                                                                 "zentorch"),
])
def test_every_weight_of_every_actor_equals_the_learners(request, cpu, dtype, load, eager, tied, threads, gemm,
                                                          monkeypatch):
    """Two actors in one group; after each sync (the first through shared memory, the second over
    the group) every engine weight, read back through the layers' own (prepacked) kernels, equals
    the sender's, exactly. `avx2`: the actors run as on an AVX2-only machine
    (FLYWHEEL_EMULATE_CPU), on vLLM's AVX2 kernels and oneDNN's AVX2 packing, the other CPU kind's
    code path whatever this machine is. `load`: "auto" applies updates in place
    (actors/cpu_weights.py; in bf16 on an AMX machine the tiny model's layers are sgl-packed, elsewhere
    oneDNN), "reload" through vLLM's layerwise reload. The small buckets split some fused layers'
    parts across buckets, so both the joined and the in-bucket views are exercised. In float32 the
    engine's logprobs of a fixed sequence also match transformers' on the sent weights, which
    checks what the engine computes with: with `eager` False, its compiled graphs; with `tied`, the
    output layer's packed copy of the embedding it shares (the read-back reads the parameter).
    `threads`: each actor loads on that many threads (`sync.load_threads`; None: the default, the
    machine's cores shared between the two actors), so the repacking is exact on several threads.
    `gemm` (`rollout.cpu_gemm`): "auto" is zentorch on an AMD CPU with AVX-512 and oneDNN elsewhere, so
    both libraries are asked for by name as well (zentorch only where it can be had)."""
    from actors.cpu_weights import LOAD_ENV
    from flywheel.hardware import cpu_gemm_choice, emulation_env, zentorch_unavailable
    from learner.weight_sync import WeightSender

    if gemm == "zentorch" and zentorch_unavailable():
        pytest.skip(f"rollout.cpu_gemm=zentorch: {zentorch_unavailable()}")

    if cpu == "avx2":
        for key, value in emulation_env("avx2").items():
            monkeypatch.setenv(key, value)  # the spawned actors start with them, as Ray workers would
    monkeypatch.setenv(LOAD_ENV, load)
    model_path = request.getfixturevalue("tied_model_path" if tied else "model_path")
    ctx = mp.get_context("spawn")
    world = 3
    links = [(ctx.Queue(), ctx.Queue()) for _ in range(world - 1)]
    procs = [ctx.Process(target=_actor_main, args=(model_path, k + 1, world, *links[k], dtype, eager, threads, gemm),
                         daemon=True)
             for k in range(world - 1)]
    for proc in procs:
        proc.start()
    sender = WeightSender("gloo")
    try:
        for _, results in links:
            facts = _get(results, "started", START_TIMEOUT_S)
            assert len(facts["vllm_kernels"]) == 1, facts  # one kernel library, whichever the CPU calls for
            if cpu == "avx2":
                assert facts == {"vllm_kernels": ["_C_AVX2.abi3.so"], "torch_capability": "AVX2",
                                 "cpu_gemm": "onednn"}, facts
            else:
                assert facts["cpu_gemm"] == cpu_gemm_choice(gemm)[0], facts
        # The port is chosen now, as the driver does: a starting engine binds ports of its own.
        port = free_port()
        for commands, _ in links:
            commands.put(("join", port))
        sender.init_group("127.0.0.1", port, world_size=world, timeout_s=TIMEOUT_S)
        for commands, _ in links:
            commands.put(("read", None))
        base = perturbed_model(model_path, 0, dtype)
        for k, (_, results) in enumerate(links):
            _assert_same_weights(_get(results, "weights")[0], base, k)  # the checkpoint, before any sync

        for version, seed, transport in ((1, 5, "shm"), (2, 6, "broadcast")):
            sender.transport = transport
            model = perturbed_model(model_path, seed, dtype)
            named = list(model.named_parameters())
            meta = WeightSender.make_meta([(n, p.shape, p.dtype) for n, p in named], version, BUCKET_BYTES)
            for commands, _ in links:
                commands.put(("receive", meta))
            sender.send(((n, p.detach()) for n, p in named), meta)
            assert sender.transport_in_use == transport
            for k, (_, results) in enumerate(links):
                weights, path, logprobs = _get(results, "weights")
                assert path == "in place" if load == "auto" else path == f"reload: {LOAD_ENV}=reload", path
                _assert_same_weights(weights, model, k)
                if dtype == "float32":
                    np.testing.assert_allclose(logprobs, hf_logprobs(model, PROMPT, COMPLETION), atol=ATOL,
                                               err_msg=f"actor {k}: the engine computes with other weights")
                # The check can fail: the base model's weights no longer match.
                assert not np.array_equal(weights["model.layers.0.self_attn.q_proj.weight"],
                                          base.model.layers[0].self_attn.q_proj.weight.detach().float().numpy())
        for commands, _ in links:
            commands.put(("stop", None))
        for proc in procs:
            proc.join(timeout=TIMEOUT_S)
    finally:
        sender.close()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)

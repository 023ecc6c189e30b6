"""Receiving side of the weight sync: a vLLM weight-transfer engine over a
torch.distributed group (gloo on CPU, NCCL on GPU), plus the checks that make
a bad update fail with a clear error before any byte moves.

vLLM 0.32 has a pluggable weight-transfer API (`LLM.init_weight_transfer_engine`,
`start_weight_update`, `update_weights`, `finish_weight_update`; engines
registered with `WeightTransferEngineFactory`).  It ships NCCL and IPC engines
but none over gloo, and its NCCL engine speaks vLLM's own PyNccl communicator
and packed format, which the learner (no vllm imports) cannot join.  So this
module registers one engine, `TorchDistWeightTransferEngine` under the name
`ENGINE_NAME`, that receives over a torch `ProcessGroup` built by
`vllm.distributed.utils.stateless_init_torch_distributed_process_group`; the
backend is a field of its init info:

- CPU (`backend="gloo"`): buckets land in CPU memory.  The base engine's
  `torch.accelerator.synchronize()` raises on a CPU-only machine, so
  `update_weights` skips it there.
- GPU (`backend="nccl"`, untested here): the same code; buckets are allocated
  on the worker's CUDA device, torch's ProcessGroupNCCL carries them, and the
  accelerator is synchronised after each update.  The learner's rank-0 GPU and
  each actor's GPU must be distinct devices (NCCL refuses two ranks on one GPU).

The wire protocol (verdict, [header, bucket]*, DONE/ABORT, ack) is described in
`learner/weight_sync.py`; the bucket layout in `flywheel/weight_buckets.py`.
On the learner's machine (gloo) the buckets need not cross the group: the
learner shares a region of memory once (a MAP header), and a HEADER_SHARED
bucket is read where it lies in it (`flywheel/shared_region.py`).
On a CPU engine of a supported model, received tensors are applied in place,
each linear layer repacked straight from its view of the bucket
(`actors/cpu_weights.py`, `DirectCpuLoader`).  Otherwise (GPU, other models)
they go through `model.load_weights` inside vLLM's layerwise reload
(`initialize_layerwise_reload` / `finalize_layerwise_reload`), which takes
Hugging Face names, fuses q/k/v and gate/up itself, and re-runs the backend's
weight processing; a plain `load_weights` after start-up fails on CPU.

Limits: one vLLM worker per actor (tensor parallel size 1): the actor is one
rank of the group.  Registration is per process, which is enough with
`VLLM_ENABLE_V1_MULTIPROCESSING=0` (the worker runs in the actor's process);
a multiprocess engine would need it in a vLLM general plugin.

Imports vllm: only rollout-actor processes import this module.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from flywheel.collectives import broadcast_from_0, max_all_ranks
from flywheel.hardware import torch_threads
from flywheel.records import WeightSpec, WeightSyncMeta
from flywheel.shared_region import SharedRegion
from flywheel.weight_buckets import HEADER_ABORT, HEADER_DATA, HEADER_MAP, HEADER_SHARED, plan_buckets, region_layout

log = logging.getLogger(__name__)

# Name under which the engine is registered with vLLM's factory; pass it as
# `weight_transfer_config={"backend": ENGINE_NAME}` when building the LLM.
ENGINE_NAME = "flywheel_torchdist"


@dataclass
class TorchDistInitInfo(WeightTransferInitInfo):
    """How this actor joins the weight-transfer group (learner rank 0 hosts it)."""

    master_address: str
    master_port: int
    rank: int  # 1 + actor rank: rank 0 is the learner
    world_size: int  # 1 + number of rollout actors
    backend: str = "gloo"  # "gloo" (CPU) or "nccl" (GPU)
    timeout_s: float = 300.0  # every collective of the group gives up after this
    load_threads: int = 1  # CPU: torch threads while an update is applied (see `receive_weights`)


@dataclass
class TorchDistUpdateInfo(WeightTransferUpdateInfo):
    """One update's tensors in send order; the layout follows from these."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int

    def specs(self) -> list[WeightSpec]:
        return [
            WeightSpec(name=n, dtype=d, shape=tuple(s))
            for n, d, s in zip(self.names, self.dtype_names, self.shapes, strict=True)
        ]


def update_info_from_meta(meta: WeightSyncMeta) -> dict[str, Any]:
    """The `update_weights` payload for a meta (vLLM passes plain dicts)."""
    return {
        "names": [s.name for s in meta.specs],
        "dtype_names": [s.dtype for s in meta.specs],
        "shapes": [list(s.shape) for s in meta.specs],
        "bucket_bytes": meta.bucket_bytes,
    }


class WeightUpdateAborted(RuntimeError):
    """The learner gave up mid-update; this engine holds a partial update."""


class TorchDistWeightTransferEngine(
    WeightTransferEngine[TorchDistInitInfo, TorchDistUpdateInfo]
):
    """vLLM worker-side engine receiving buckets from learner rank 0."""

    init_info_cls = TorchDistInitInfo
    update_info_cls = TorchDistUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.pg = None
        self.buffer_device = torch.device("cpu")
        # CPU: one receive buffer per bucket, kept across updates (costs the model's
        # bytes once more): fresh 64 MiB buffers spent much of a sync in page faults.
        # Reuse is safe: the loader may keep views of a bucket until the update ends,
        # but the next update's buckets arrive only after its verdict, which this actor
        # joins once its engine has finished the last one.  GPU: fresh buffers (memory is dearer).
        self._buffers: list[torch.Tensor] = []
        self._region: SharedRegion | None = None  # the learner's, once it has shared one
        self._direct_plan: tuple[Any, str] | None = None  # decided at the first update
        self._direct = None  # the DirectCpuLoader of the update in progress, if it applies
        self.load_threads = 1

    def init_transfer_engine(self, init_info: TorchDistInitInfo) -> None:
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        if init_info.backend == "nccl" and self.device.type != "cuda":
            raise ValueError(
                f"weight-transfer backend 'nccl' needs a CUDA engine, this one runs on "
                f"{self.device}; use backend 'gloo' (weight_sync.backend)"
            )
        self.buffer_device = self.device if init_info.backend == "nccl" else torch.device("cpu")
        self.load_threads = max(1, int(init_info.load_threads))
        self.pg = stateless_init_torch_distributed_process_group(
            init_info.master_address,
            init_info.master_port,
            init_info.rank,
            init_info.world_size,
            init_info.backend,
            timeout=timedelta(seconds=init_info.timeout_s),
        )

    def verdict(self, reject: bool) -> bool:
        """Step 1 of an update: tell the group whether this actor accepts the
        meta; returns True if every member accepted."""
        return self._max_all_ranks(int(reject)) == 0

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if self._direct_plan is None:
            self._direct_plan = self._plan_direct_loading()
        self._direct = self._direct_plan[0]
        if self._direct is None:
            initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if self._direct is not None:
            incomplete = self._direct.finish()
            if incomplete:  # only after a failed update, which the caller reports and redoes
                log.warning("weight update ended with %d parameters not applied, e.g. %s",
                            len(incomplete), incomplete[:3])
            return
        finalize_layerwise_reload(self.model, self.model_config)

    def _plan_direct_loading(self) -> tuple[Any, str]:
        """(DirectCpuLoader or None, why): CPU engines load in place where the model allows."""
        if self.device.type != "cpu":
            return None, "GPU engines use vLLM's reload"
        from actors.cpu_weights import DirectCpuLoader

        loader, why = DirectCpuLoader.build(self.model, expected_hf_weights(self.model_config.hf_config))
        log.info("weight updates load %s", "in place" if loader else f"through vLLM's reload ({why})")
        return loader, why

    def _load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if self._direct is not None:
            self._direct.load(weights)
        else:
            self.model.load_weights(weights)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if self.buffer_device.type != "cpu":
            # NCCL receives are asynchronous; the CPU-only machine has no
            # accelerator to synchronise (the base class would raise there).
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: TorchDistUpdateInfo) -> None:
        """Steps 2-4: receive every bucket, load it, acknowledge.

        A helper thread receives (`_receive_buckets`) while this one loads, so
        bucket k+1 crosses the wire while bucket k goes through vLLM's reload
        (whose CPU weight repacking is the larger half of a sync); the thread
        runs at most one bucket ahead.  Only the thread touches the group until
        it has finished; the ack comes after.

        On CPU the loading runs on `load_threads` torch threads (init info),
        restored afterwards: during an update the learner only waits for the
        acks, so its cores are free, and oneDNN's repacking, nearly all of a
        load, scales with them.  The driver gives each actor its node's
        cores divided among the actors there (`sync.load_threads`).

        A load error does not stop the receiving: the remaining buckets are
        drained so the learner is not left blocking, and the ack tells it this
        actor failed.  On any failure the layerwise reload is finalised before
        raising (vLLM would otherwise leave unloaded layers on the meta device),
        so the engine can still run, on a partial update the caller must redo.
        """
        if self.pg is None:
            raise RuntimeError("weight transfer group not initialised: call init_weight_transfer first")
        specs = update_info.specs()
        buckets = plan_buckets(specs, update_info.bucket_bytes)
        arrivals: queue.Queue = queue.Queue(maxsize=1)
        receiver = threading.Thread(target=self._receive_buckets, args=(buckets, arrivals),
                                    name="flywheel-weight-receive", daemon=True)
        receiver.start()
        with torch_threads(self.load_threads if self.device.type == "cpu" else None):
            load_error = self._load_arrivals(specs, buckets, arrivals, receiver)
        receiver.join()
        self._max_all_ranks(int(load_error is not None))
        if load_error is not None:
            self.finish_weight_update()
            raise RuntimeError(
                f"loading the received weights into vLLM failed: {load_error!r}"
            ) from load_error

    def _load_arrivals(self, specs, buckets, arrivals: queue.Queue, receiver: threading.Thread) -> BaseException | None:
        """Load each bucket the receiver thread hands over until it ends; the first load
        error (the rest is drained, see `receive_weights`), or None."""
        load_error: BaseException | None = None
        while True:
            kind, item = arrivals.get()
            if kind == "error":
                receiver.join()
                self.finish_weight_update()
                raise item
            if kind == "end":
                break
            if load_error is None:
                number, payload = item
                try:
                    weights = [
                        (
                            specs[s.index].name,
                            payload[s.offset : s.offset + s.nbytes]
                            .view(getattr(torch, specs[s.index].dtype))
                            .view(specs[s.index].shape),
                        )
                        for s in buckets[number].slots
                    ]
                    # The layerwise wrappers keep these views until their layer is
                    # complete; each bucket has its own buffer, so none is overwritten
                    # within an update.
                    self._load(weights)
                except Exception as exc:  # reported after draining, see docstring
                    load_error = exc
        return load_error

    def _receive_buckets(self, buckets: list, arrivals: queue.Queue) -> None:
        """The helper thread of `receive_weights`: each bucket's header and payload,
        handed over as ("bucket", (number, payload)); then ("end", None) after the
        DONE header, or ("error", exception) on an ABORT, a mismatch or a failed
        collective."""
        try:
            if self.buffer_device.type == "cuda":
                torch.cuda.set_device(self.buffer_device)  # the current device is per thread
            header = torch.empty(2, dtype=torch.int64, device=self.buffer_device)
            offsets, _ = region_layout(buckets)
            for number, bucket in enumerate(buckets):
                self._broadcast(header)
                code, nbytes = (int(v) for v in header.tolist())
                if code == HEADER_MAP:  # before the first bucket: the learner shares its region
                    self._map_region(nbytes)
                    self._broadcast(header)
                    code, nbytes = (int(v) for v in header.tolist())
                if code == HEADER_DATA and number == 0:
                    self._drop_region()  # the learner sends over the group now: its region is gone
                if code == HEADER_ABORT:
                    arrivals.put(("error", WeightUpdateAborted(
                        f"the learner aborted the weight update at bucket {number}; see its "
                        "error. This actor now holds a partial update: send the weights again"
                    )))
                    return
                if code == HEADER_SHARED and self._region is None:
                    arrivals.put(("error", RuntimeError(
                        f"weight-sync protocol mismatch at bucket {number}: the learner sent it through "
                        "a shared region this actor has not mapped"
                    )))
                    return
                shared = code == HEADER_SHARED
                if not (code == HEADER_DATA or shared) or nbytes != bucket.nbytes:
                    arrivals.put(("error", RuntimeError(
                        f"weight-sync protocol mismatch at bucket {number}: got header "
                        f"({code}, {nbytes}), expected ({HEADER_DATA} or {HEADER_SHARED}, {bucket.nbytes}); the "
                        "learner and the actors run different versions of flywheel/weight_buckets.py"
                    )))
                    return
                if shared:
                    payload = self._region.tensor[offsets[number] : offsets[number] + nbytes]
                else:
                    payload = self._receive_buffer(number, nbytes)
                    self._broadcast(payload)
                arrivals.put(("bucket", (number, payload)))
            self._broadcast(header)
            if int(header[0]) == HEADER_ABORT:
                arrivals.put(("error", WeightUpdateAborted(
                    "the learner aborted the weight update after its last bucket; see its error"
                )))
                return
            arrivals.put(("end", None))
        except BaseException as exc:  # a timed-out or broken collective: the loader raises it
            arrivals.put(("error", exc))

    def _map_region(self, nbytes: int) -> None:
        """Map the region the learner names next; the group learns whether every actor could."""
        address = torch.empty(3, dtype=torch.int64, device=self.buffer_device)
        self._broadcast(address)
        self._drop_region()
        try:
            region = SharedRegion.attach(*(int(v) for v in address.tolist()), nbytes)
        except Exception as exc:  # the learner falls back to the broadcast, or stops the update
            log.warning("weight sync: cannot map the learner's shared region (%r); the weights come over "
                        "the group", exc)
            region = None
        if self._max_all_ranks(int(region is None)):
            if region is not None:
                region.close()
            return
        self._region = region
        self._buffers = []  # the buckets arrive in the region from now on

    def _drop_region(self) -> None:
        if self._region is not None:
            self._region.close()
            self._region = None

    def _receive_buffer(self, number: int, nbytes: int) -> torch.Tensor:
        """Bucket `number`'s buffer: kept from the last update on CPU, fresh on GPU."""
        if self.buffer_device.type != "cpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=self.buffer_device)
        if number == len(self._buffers):
            self._buffers.append(torch.empty(0, dtype=torch.uint8))
        if self._buffers[number].numel() != nbytes:
            self._buffers[number] = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffers[number]

    def _broadcast(self, tensor: torch.Tensor) -> None:
        broadcast_from_0(self.pg, tensor, self.buffer_device)

    def _max_all_ranks(self, value: int) -> int:
        return max_all_ranks(self.pg, value, self.buffer_device)

    def shutdown(self) -> None:
        if self.pg is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            stateless_destroy_torch_distributed_process_group(self.pg)
            self.pg = None
        self._buffers = []
        self._drop_region()


def register_engine() -> None:
    """Make `ENGINE_NAME` known to vLLM's factory (idempotent, per process)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if ENGINE_NAME not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(ENGINE_NAME, TorchDistWeightTransferEngine)


def engine_load_path(worker) -> str | None:
    """Run through `LLM.collective_rpc`: how this engine applies updates ("in place", or
    "reload: <why>" for vLLM's layerwise reload); None before the first update."""
    plan = worker.weight_transfer_engine._direct_plan
    if plan is None:
        return None
    return "in place" if plan[0] is not None else f"reload: {plan[1]}"


def engine_verdict(worker, reject: bool) -> bool:
    """Run through `LLM.collective_rpc`: the verdict step on the worker's engine."""
    return worker.weight_transfer_engine.verdict(reject)


def expected_hf_weights(hf_config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters a Hugging Face model of this config
    has: what a learner built from the same checkpoint will send.

    Built on the meta device, so it costs no memory.  Tied parameters (e.g. an
    lm_head tied to the embedding) appear once, under their first name, as in
    `named_parameters()`.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_update(
    meta: WeightSyncMeta, expected: dict[str, tuple[int, ...]], engine_dtype: str
) -> list[str]:
    """Everything wrong with `meta` for this engine, one line per problem
    (empty if it can be applied).  Every update must carry the full policy:
    vLLM's layerwise reload would fill a half-sent fused layer with garbage."""
    problems: list[str] = []
    for spec in meta.specs:
        if spec.name not in expected:
            problems.append(
                f"unknown parameter {spec.name!r}: the rollout model has no such "
                "Hugging Face parameter (send named_parameters() names of the policy)"
            )
        elif spec.shape != expected[spec.name]:
            problems.append(
                f"parameter {spec.name!r}: shape {spec.shape} sent, the rollout model "
                f"has {expected[spec.name]}"
            )
        if spec.dtype != engine_dtype:
            problems.append(
                f"parameter {spec.name!r}: dtype {spec.dtype} sent, the rollout engine "
                f"runs {engine_dtype}; cast on the learner before sending or set the "
                "actors' dtype to match"
            )
    missing = sorted(set(expected) - {s.name for s in meta.specs})
    if missing:
        problems.append(
            f"{len(missing)} parameters missing from the update, e.g. {missing[:3]}; "
            "every update must carry the full policy"
        )
    return problems


@torch.no_grad()
def engine_weights(worker) -> dict[str, torch.Tensor]:
    """Run through `LLM.collective_rpc`: every weight the engine computes with, under
    its Hugging Face name and shape, in the engine's dtype.

    On CPU the linear layers keep only a prepacked copy (oneDNN or sgl) and empty
    their parameters, so each linear weight W (N, K) is read back through the
    layer's own GEMM: eye(K) @ W^T multiplies each element by one and adds zeros,
    which is exact in any float dtype.  Fused layers (qkv_proj, gate_up_proj) are
    cut into their Hugging Face parts by `output_sizes`; every other parameter
    (embeddings, lm_head, norms) is read as it is, the embeddings' rows cut back
    from vLLM's padded vocabulary.  Tensor parallel size 1 only.
    """
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    model = worker.get_model()
    packed = getattr(model, "packed_modules_mapping", {})
    out: dict[str, torch.Tensor] = {}
    linear_params: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        linear_params.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
        if getattr(module, "bias", None) is not None:
            raise NotImplementedError(f"{name}: reading back a linear layer with a bias is not implemented")
        eye = torch.eye(module.input_size, dtype=module.params_dtype)
        weight = module.quant_method.apply(module, eye).t().contiguous()  # (N, K)
        prefix, _, leaf = name.rpartition(".")
        if leaf in packed:
            parts = weight.split(list(module.output_sizes), dim=0)
            for part_name, part in zip(packed[leaf], parts, strict=True):
                out[f"{prefix}.{part_name}.weight"] = part.clone()
        else:
            out[f"{name}.weight"] = weight
    vocab_rows = {f"{name}.weight": m.org_vocab_size for name, m in model.named_modules()
                  if isinstance(m, VocabParallelEmbedding)}
    for name, param in model.named_parameters():
        if name not in linear_params:
            out[name] = param.detach()[: vocab_rows.get(name)].clone()
    return out

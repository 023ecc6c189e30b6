"""Direct weight updates for vLLM's CPU engine: each received weight goes
straight into the form the engine computes with, without vLLM's layerwise reload.

vLLM 0.32's CPU backend keeps a linear layer's weight only in a prepacked form,
reached through the layer's `cpu_linear` closure: a oneDNN handler (the pointer
sits in the int64 tensor `handler.handler_tensor`, which compiled graphs read
at run time), or an sgl-packed tensor for small layers, or, with prepacking off,
the plain `weight` parameter.  On AMD CPUs with AVX-512, where vLLM routes
linear layers to zentorch (`ZenCpuPlatform`, `rollout.cpu_gemm`), the closure
holds zentorch's prepacked weight (`zen_weight`): a tensor of the weight's shape
whose bytes are in zentorch's blocked layout.  vLLM's general reload
(`initialize_layerwise_reload`) rebuilds every layer around that: it
materialises empty parameters, copies each received tensor into them through
the weight loaders, re-runs the backend's processing and swaps the layer's
tensors back; measured on the ~80M model, that is about as long again as the
repacking itself (benchmarks/weight_sync.py).

Here each layer is updated where it lies:

- a fused layer (q/k/v, gate/up) whose parts arrive next to each other in one
  bucket is packed straight from that view of the bucket (no staging copy);
  parts that arrive apart are joined first;
- oneDNN: a new handler is packed from the weight, its pointer is written into
  the layer's existing `handler_tensor` and the old handler is released, so
  eager code and compiled graphs both use the new weights at their next call;
- sgl: the packed tensor is overwritten in place; plain: the weight is copied;
- zentorch: the weight is written in zentorch's blocked layout straight into
  the tensor the closure holds (`actors/zen_pack.py`, checked against zentorch's
  own packing), or, where that does not apply, packed by zentorch and copied in;
- embeddings (whose padded vocabulary rows stay as they are), norms and biases
  are copied into their parameters; the lm_head, which also keeps a packed
  copy, is repacked from its parameter (with tied embeddings, from the
  embedding's, which it shares).

`DirectCpuLoader.build` decides once per engine whether this applies: a Llama
architecture (the only one whose weight loaders are plain copies that the tests
check here), every parameter covered by exactly one Hugging Face name of the
update, every linear layer in one of the four forms above.  Otherwise it says
why and the engine uses vLLM's reload.  `FLYWHEEL_CPU_WEIGHT_LOAD=reload`
forces vLLM's reload (the benchmark's baseline).  GPU engines always use it.

Imports vllm: only rollout-actor processes import this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from actors.zen_pack import PACKER

# The environment variable that picks the loading path: "auto" (direct where it applies) or "reload".
LOAD_ENV = "FLYWHEEL_CPU_WEIGHT_LOAD"
# Architectures (vLLM model class names) whose weight loaders copy each Hugging Face tensor
# unchanged into its place: the direct path reproduces exactly that.
ARCHITECTURES = frozenset({"LlamaForCausalLM"})
# oneDNN's primitive cache size, as vLLM's dispatch_cpu_unquantized_gemm creates the handlers.
ONEDNN_CACHE = 32


def load_mode() -> str:
    mode = os.environ.get(LOAD_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "reload"):
        raise ValueError(f"{LOAD_ENV} must be 'auto' or 'reload', got {mode!r}")
    return mode


@dataclass
class _Target:
    """One module the update writes: its parameters come from `parts` (Hugging Face names)."""

    module: torch.nn.Module
    kind: str  # "onednn", "sgl", "plain", "zentorch" (linear layers), "embedding", "copy"
    weights: list[str]  # HF names of the weight's parts, in the fused layer's row order
    biases: list[str] = field(default_factory=list)  # HF names of the bias's parts, same order
    param: str = "weight"  # for "copy": the parameter written
    heads: list = field(default_factory=list)  # for "embedding": output layers sharing its weight, repacked
    rows: list[int] = field(default_factory=list)  # output rows of each part
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # parts received this update

    @property
    def names(self) -> list[str]:
        return self.weights + self.biases


def _closure_vars(fn) -> dict:
    """The variables a function closes over, by name ({} for anything else)."""
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None) or ()
    return dict(zip(code.co_freevars, (c.cell_contents for c in cells))) if code is not None else {}


# The linear layers' forms this loader writes (besides embeddings and plain copies).
LINEAR_KINDS = ("onednn", "sgl", "plain", "zentorch")


def _linear_kind(module: torch.nn.Module) -> str | None:
    """How vLLM's CPU backend holds this linear layer's weight, from its `cpu_linear` closure."""
    fn = getattr(module, "cpu_linear", None)
    if fn is torch.nn.functional.linear:
        return "plain" if module.weight.numel() else None
    free = _closure_vars(fn)
    if isinstance(free.get("zen_weight"), torch.Tensor):
        # vLLM binds zentorch's "prepacked" flag as the lambda's one default. Unpacked,
        # zentorch keeps blocked copies keyed by the weight's address, which an update in
        # place would leave stale (the rollout actor refuses to start that way).
        return "zentorch" if getattr(fn, "__defaults__", None) == (True,) else None
    handler = free.get("handler")
    if handler is not None and isinstance(getattr(handler, "handler_tensor", None), torch.Tensor):
        return "onednn"
    if isinstance(free.get("packed_weight"), torch.Tensor) and "N" in free:
        return "sgl"
    return None


class DirectCpuLoader:
    """Applies an update's tensors to a vLLM CPU model in place (see the module docstring)."""

    def __init__(self, targets: list[_Target]) -> None:
        self._targets = targets
        self._by_name = {name: t for t in targets for name in t.names}

    # ------------------------------------------------------------------ planning

    @classmethod
    def build(cls, model: torch.nn.Module, hf_shapes: dict[str, tuple[int, ...]]) -> tuple[DirectCpuLoader | None, str]:
        """A loader for `model` given the update's names and shapes, or None and the reason it does not apply."""
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        if load_mode() == "reload":
            return None, f"{LOAD_ENV}=reload"
        if type(model).__name__ not in ARCHITECTURES:
            return None, f"architecture {type(model).__name__} (direct loading covers {sorted(ARCHITECTURES)})"
        modules = dict(model.named_modules())
        packed = getattr(model, "packed_modules_mapping", {})
        fused_of = {part: (fused, i) for fused, parts in packed.items() for i, part in enumerate(parts)}
        targets: dict[str, _Target] = {}
        for hf_name, shape in hf_shapes.items():
            path, _, param = hf_name.rpartition(".")
            parent, _, leaf = path.rpartition(".")
            if path in modules and isinstance(modules[path], LinearBase):
                key, shard = path, 0
            elif leaf in fused_of and f"{parent}.{fused_of[leaf][0]}" in modules:
                key, shard = f"{parent}.{fused_of[leaf][0]}", fused_of[leaf][1]
            elif path in modules and param in dict(modules[path].named_parameters(recurse=False)):
                module = modules[path]
                kind = "embedding" if isinstance(module, VocabParallelEmbedding) and param == "weight" else "copy"
                # The output layer keeps a packed copy of its weight for its GEMM; with tied
                # embeddings it is another module holding the embedding's parameter.
                heads = [m for m in (getattr(model, "lm_head", None),)
                         if kind == "embedding" and getattr(m, "weight", None) is module.weight]
                if any(_linear_kind(m) not in LINEAR_KINDS for m in heads):
                    return None, f"{path}: the output layer's CPU GEMM form is not one this loader knows"
                targets[hf_name] = _Target(module, kind, [hf_name], param=param, heads=heads)
                continue
            else:
                return None, f"{hf_name}: no module of the vLLM model takes it by name"
            module = modules[key]
            if not isinstance(getattr(module, "quant_method", None), UnquantizedLinearMethod):
                return None, f"{key}: quantized layers are reloaded by vLLM"
            kind = _linear_kind(module)
            if kind is None:
                return None, f"{key}: its CPU GEMM form is not one this loader knows"
            target = targets.setdefault(key, _Target(module, kind, []))
            sizes = list(getattr(module, "output_sizes", None) or [module.output_size])
            slot = target.biases if param == "bias" else target.weights
            if param not in ("weight", "bias") or shard >= len(sizes) or shape[0] != sizes[shard]:
                return None, f"{hf_name}: shape {shape} does not fit {key}'s outputs {sizes}"
            if param == "weight" and shape != (sizes[shard], module.input_size):
                return None, f"{hf_name}: shape {shape} does not fit {key} ({sizes[shard]}, {module.input_size})"
            slot.extend([None] * (len(sizes) - len(slot)))
            slot[shard] = hf_name
            target.rows = sizes
        for key, target in targets.items():
            if target.kind in LINEAR_KINDS:
                if None in target.weights or (target.biases and None in target.biases):
                    return None, f"{key}: the update does not carry every part of this fused layer"
                if target.biases and getattr(target.module, "bias", None) is None:
                    return None, f"{key}: biases sent for a layer without one"
                if not target.biases and getattr(target.module, "bias", None) is not None:
                    return None, f"{key}: the layer has a bias the update does not carry"
        covered = {id(p) for t in targets.values()
                   for p in ([getattr(t.module, t.param)] if t.kind in ("copy", "embedding")
                             else t.module.parameters(recurse=False))}
        missed = [n for n, p in model.named_parameters() if id(p) not in covered]
        if missed:
            return None, f"{len(missed)} parameters the update would not reach, e.g. {missed[:3]}"
        return cls(list({id(t): t for t in targets.values()}.values())), "direct"

    # ------------------------------------------------------------------ loading

    @torch.no_grad()
    def load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Take some of an update's tensors (views into a bucket are fine: each is used before
        this update's next bucket can overwrite it); apply every target whose parts are all in."""
        done = []
        for name, tensor in weights:
            target = self._by_name.get(name)
            if target is None:
                raise KeyError(f"{name}: not a parameter of this engine's model")
            target.pending[name] = tensor
            if len(target.pending) == len(target.names):
                done.append(target)
        for target in done:
            try:
                self._apply(target)
            finally:
                target.pending.clear()

    def finish(self) -> list[str]:
        """End an update; the names of the targets left incomplete (their old weights stay)."""
        incomplete = [n for t in self._targets if t.pending for n in t.names if n not in t.pending]
        for t in self._targets:
            t.pending.clear()
        return incomplete

    def _apply(self, target: _Target) -> None:
        parts = target.pending
        module = target.module
        if target.kind == "copy":
            getattr(module, target.param).copy_(parts[target.weights[0]])
            return
        if target.kind == "embedding":
            t = parts[target.weights[0]]
            module.weight[: t.shape[0]].copy_(t)
            for head in target.heads:
                kind = _linear_kind(head)
                if kind in ("onednn", "sgl", "zentorch"):
                    _repack(head, kind, head.weight)
            return
        if target.biases:
            offset = 0
            for name, rows in zip(target.biases, target.rows, strict=True):
                module.bias[offset : offset + rows].copy_(parts[name])
                offset += rows
        if target.kind == "plain":
            offset = 0
            for name, rows in zip(target.weights, target.rows, strict=True):
                module.weight[offset : offset + rows].copy_(parts[name])
                offset += rows
            return
        _repack(module, target.kind, _joined([parts[n] for n in target.weights]))


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts stacked by rows: a view when they lie one after another in memory, else a copy."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    rows = sum(p.shape[0] for p in parts)
    step = first.stride(0) * first.element_size()
    adjacent = all(p.is_contiguous() and p.dtype == first.dtype for p in parts) and all(
        b.data_ptr() == a.data_ptr() + a.shape[0] * step for a, b in zip(parts, parts[1:])
    )
    if adjacent:
        return first.as_strided((rows, first.shape[1]), first.stride())
    return torch.cat(parts)


def _repack(module: torch.nn.Module, kind: str, weight: torch.Tensor) -> None:
    """Give `module`'s packed GEMM form the values of `weight` (N, K), keeping the objects its
    `cpu_linear` closure (and any compiled graph) holds."""
    if kind == "onednn":
        handler = _closure_vars(module.cpu_linear)["handler"]
        fresh = torch.ops._C.create_onednn_mm_handler(weight.t(), ONEDNN_CACHE)
        old = int(handler.handler_tensor.item())
        handler.handler_tensor.fill_(fresh)
        torch.ops._C.release_dnnl_matmul_handler(old)
    elif kind == "zentorch":
        zen_weight = _closure_vars(module.cpu_linear)["zen_weight"]
        if not PACKER.pack_into(zen_weight, weight):  # one pass, straight into place (actors/zen_pack.py)
            zen_weight.copy_(_zen_prepack(weight))
    else:  # sgl
        _closure_vars(module.cpu_linear)["packed_weight"].copy_(torch.ops._C.convert_weight_packed(weight))


def _zen_prepack(weight: torch.Tensor) -> torch.Tensor:
    """zentorch's blocked form of an (N, K) weight, as vLLM's dispatch makes it at load time."""
    return torch.ops.zentorch.zentorch_weight_prepack_for_linear(weight.contiguous())

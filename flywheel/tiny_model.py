"""The embedded models: Llama policies and a BPE tokenizer built offline.

Two shapes, chosen by name (`EMBEDDED_MODELS`, the config's `model.embedded`):
"tiny" (about 2.1M parameters, the default for tests and the demo) and "small"
(77,064,960 parameters: hidden 768, 12 layers, 12 heads of 64, 4 KV heads,
MLP 2048), for benchmarks and realistic step times without a download.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on
`synthetic_task.corpus_lines`, so every task word is one token (with its
leading space) and any text round-trips. The policy is a randomly initialised
`LlamaForCausalLM` (bf16, safetensors) whose next-token distribution starts
near uniform; the reward model is a `LlamaForSequenceClassification` with one
output on the same tokenizer. Both builds are deterministic given the spec.

`ensure_embedded_model` builds once into a cache directory keyed by the spec
and CODE_VERSION (root `$FLYWHEEL_CACHE`, else `~/.cache/flywheel`): it builds
in a temporary directory and renames it into place, so concurrent callers and
a crash mid-build never leave a half-written model where a reader looks.

transformers, tokenizers and torch are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from flywheel import synthetic_task

log = logging.getLogger(__name__)

# Bump when a change here alters what a build writes: old caches are then ignored.
CODE_VERSION = "1"

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2
SPEC_FILE = "flywheel_spec.json"
STALE_TMP_S = 3600.0  # a temporary build directory this old belongs to a crashed build


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and seed of the embedded model (the default is about 2.1M parameters)."""

    vocab_size: int = 1024  # BPE target; training stops early (~1008) once the corpus has no pair left
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4  # head_dim = hidden_size / num_heads = 64, a size vLLM's CPU attention supports
    num_kv_heads: int = 2  # grouped-query attention, as in real Llama checkpoints
    intermediate_size: int = 768
    max_positions: int = 512
    init_std: float = 0.02  # small, so the untrained policy's next-token distribution is near uniform
    seed: int = 0  # seeds the tokenizer corpus and the weights
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # dtype of the saved weights

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self, vocab: int) -> int:
        """Parameters of the policy built from this spec with a `vocab`-token tokenizer,
        from the shapes alone (no weights built); `count_parameters` counts a built one.

        Per layer: q and o (hidden x hidden), k and v (hidden x kv_heads*head_dim),
        gate, up and down (hidden x intermediate), two RMSNorm scales; plus the
        embedding and the untied lm_head (vocab x hidden each) and the final norm.
        """
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h
        return self.num_layers * layer + 2 * vocab * h + h

    def cache_key(self, kind: str) -> str:
        """Directory name of a build: kind plus a hash of the spec and CODE_VERSION."""
        blob = json.dumps({"spec": asdict(self), "kind": kind, "code": CODE_VERSION}, sort_keys=True)
        return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# The embedded policies by name; `model.embedded` in the run config picks one.
EMBEDDED_MODELS: dict[str, TinyModelSpec] = {
    "tiny": TinyModelSpec(),
    # The shape of the issue-8 measurements: 77,064,960 parameters with the 1008-token tokenizer.
    "small": TinyModelSpec(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048),
}


def embedded_spec(name: str) -> TinyModelSpec:
    """The spec of the embedded model called `name` ("tiny" or "small")."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"model.embedded must be one of {', '.join(EMBEDDED_MODELS)}, got {name!r}")
    return EMBEDDED_MODELS[name]


# -------------------------------------------------------------------------------- tokenizer


def build_tokenizer(out_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec()):
    """Train the byte-level BPE, save it to out_dir, return a PreTrainedTokenizerFast.

    Encoding prepends `<s>`; decoding with skip_special_tokens gives back the text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: the prompt's first word stays as typed, so
    # decode(encode(text)) == text; completions carry their own leading space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any input encodes
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_task.corpus_lines(spec.seed), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )

    words = synthetic_task.all_task_words()
    split = [w for w in words if len(tok.encode(" " + w, add_special_tokens=False).ids) != 1]
    if split:
        raise RuntimeError(
            f"tokenizer with vocab_size={spec.vocab_size} splits task words {split[:8]}...: "
            "raise TinyModelSpec.vocab_size"
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,  # cleanup would glue " ." etc. and break round trips
        model_max_length=spec.max_positions,
    )
    out = Path(out_dir)
    fast.save_pretrained(str(out))
    # transformers 5 names its own class here and drops special_tokens_map.json;
    # the generic names keep the directory loadable by transformers 4 (e.g. a
    # GPU node whose vllm pins an older transformers).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return fast


# ----------------------------------------------------------------------------------- models


def _llama_config(tokenizer, spec: TinyModelSpec, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),  # exactly the tokenizer: no unused rows the policy could sample
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.init_std,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def _save_model(model_cls, out_dir: str | os.PathLike, spec: TinyModelSpec, **extra) -> Path:
    import torch

    out = Path(out_dir)
    tokenizer = build_tokenizer(out, spec)
    config = _llama_config(tokenizer, spec, **extra)
    torch.manual_seed(spec.seed)
    model = model_cls(config)  # random init, N(0, init_std) linears, unit norms
    model = model.to(getattr(torch, spec.dtype))
    model.config.dtype = spec.dtype
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise in run logs
    try:
        model.save_pretrained(str(out))  # safetensors, the only format in transformers 5
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    (out / SPEC_FILE).write_text(
        json.dumps({"spec": asdict(spec), "code_version": CODE_VERSION, "class": model_cls.__name__}, indent=2)
    )
    return out


def build_tiny_policy(out_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write tokenizer + random-init LlamaForCausalLM (safetensors) into out_dir."""
    from transformers import LlamaForCausalLM

    return _save_model(LlamaForCausalLM, out_dir, spec)


def build_tiny_reward_model(out_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write tokenizer + random-init LlamaForSequenceClassification (one score) into out_dir."""
    from transformers import LlamaForSequenceClassification

    return _save_model(LlamaForSequenceClassification, out_dir, spec, num_labels=1)


_BUILDERS = {"policy": build_tiny_policy, "reward": build_tiny_reward_model}


def count_parameters(model_dir: str | os.PathLike) -> int:
    """Number of parameters stored in a model directory's safetensors files."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


# ------------------------------------------------------------------------------------ cache


def default_cache_root() -> Path:
    return Path(os.environ.get("FLYWHEEL_CACHE") or Path.home() / ".cache" / "flywheel")


def ensure_embedded_model(
    kind: Literal["policy", "reward"] = "policy",
    spec: TinyModelSpec | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """Directory of the embedded model of this kind and spec, built on first use."""
    if kind not in _BUILDERS:
        raise ValueError(f"kind must be one of {sorted(_BUILDERS)}, got {kind!r}")
    spec = spec or TinyModelSpec()
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / spec.cache_key(kind)
    if (final / SPEC_FILE).is_file():  # a renamed-in directory is always complete
        return str(final)

    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".tmp-{final.name}-*"):  # left by a build that crashed
        try:
            if time.time() - stale.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:  # another caller removed it first
            pass
    # Same filesystem as `final`, so the rename below is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    t0 = time.perf_counter()
    log.info("building embedded %s model into %s", kind, final)
    try:
        _BUILDERS[kind](tmp, spec)
        # mkdtemp and safetensors make owner-only entries; the cache is meant to be shared.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.rename(tmp, final)
    except OSError:
        # Another process renamed its build in first: use that one.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / SPEC_FILE).is_file():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built embedded %s model in %.1f s: %s", kind, time.perf_counter() - t0, final)
    return str(final)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = embedded_spec(sys.argv[1] if len(sys.argv) > 1 else "tiny")
    for kind in ("policy", "reward"):
        path = ensure_embedded_model(kind, spec)
        print(f"{kind}: {path} ({count_parameters(path):,} parameters)")

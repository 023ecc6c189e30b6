"""The embedded tiny model: deterministic builds, transformers and vLLM load it.

The vLLM test runs the real CPU engine in-process (about 10-30 s); the others
take seconds. Nothing is downloaded.
"""

import math
import os
import time
from pathlib import Path

# vLLM reads these at import: in-process engine (no spawned workers, starts in
# ~2 s), and an explicit KV-cache size or it refuses to start on a busy machine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import torch
from safetensors.torch import load_file

from flywheel import synthetic_task, tiny_model
from flywheel.tiny_model import TinyModelSpec, build_tiny_policy, ensure_embedded_model

PROMPTS = [
    "Write about animals in a calm way:",
    "Some bright words about tools:",
    "Talk about weather, kind style:",
    "List music words, bold please:",
]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("policy"))


def test_two_builds_are_identical(policy_dir, tmp_path):
    other = build_tiny_policy(tmp_path / "again")
    assert (other / "tokenizer.json").read_bytes() == (policy_dir / "tokenizer.json").read_bytes()
    a = load_file(str(policy_dir / "model.safetensors"))
    b = load_file(str(other / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == torch.bfloat16, name
        assert torch.equal(a[name], b[name]), name
    # A different seed must give different weights, or the seed is not wired in.
    changed = build_tiny_policy(tmp_path / "seed1", TinyModelSpec(seed=1))
    c = load_file(str(changed / "model.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_files_and_size(policy_dir):
    names = {p.name for p in policy_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "flywheel_spec.json",
    } <= names
    n = tiny_model.count_parameters(policy_dir)
    assert 1_000_000 < n < 5_000_000, n


def test_transformers_loads_policy_and_tokenizer(policy_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    for text in PROMPTS + [" lion, TIGER!!  \t zebra\n", "caf\u00e9 \u65e5\u672c \x00 x", ""]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Every task word is a single token with its leading space, as it appears
    # after a prompt: the policy can emit any of them in one step.
    split = [w for w in synthetic_task.all_task_words() if len(tok(" " + w, add_special_tokens=False).input_ids) != 1]
    assert split == []

    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    assert model.config.vocab_size == len(tok)
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        logits = model(**tok(PROMPTS, return_tensors="pt", padding=True)).logits[:, -1]
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    # Untrained: near uniform over the vocabulary (log 1008 = 6.92 nats).
    assert (entropy > 0.97 * math.log(len(tok))).all(), entropy


def test_reward_model_scores_a_padded_batch(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = ensure_embedded_model("reward", cache_dir=tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    texts = [PROMPTS[0] + " lion tiger", PROMPTS[1] + " hammer"]
    with torch.no_grad():
        scores = model(**tok(texts, return_tensors="pt", padding=True)).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
    # Padding must not change a sequence's score (the head reads the last real token).
    with torch.no_grad():
        alone = model(**tok(texts[1:], return_tensors="pt")).logits
    torch.testing.assert_close(scores[1:], alone, atol=1e-4, rtol=1e-4)


def test_ensure_embedded_model_builds_once(tmp_path, monkeypatch):
    spec = TinyModelSpec()
    path = ensure_embedded_model("policy", spec, cache_dir=tmp_path)
    assert Path(path).name == spec.cache_key("policy")

    def must_not_build(out_dir, spec):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setitem(tiny_model._BUILDERS, "policy", must_not_build)
    t0 = time.perf_counter()
    assert ensure_embedded_model("policy", spec, cache_dir=tmp_path) == path
    assert time.perf_counter() - t0 < 1.0
    # Any change to the spec is a different cache entry.
    assert TinyModelSpec(num_layers=3).cache_key("policy") != spec.cache_key("policy")
    assert spec.cache_key("reward") != spec.cache_key("policy")
    assert [p.name for p in tmp_path.iterdir()] == [Path(path).name]  # no temp dir left


def test_ensure_embedded_model_loses_a_race_cleanly(tmp_path, monkeypatch):
    spec = TinyModelSpec(seed=7)
    final = tmp_path / spec.cache_key("policy")

    def racing_build(out_dir, spec):
        # Another process finishes first while this one is still building.
        final.mkdir()
        (final / tiny_model.SPEC_FILE).write_text("{}")
        (Path(out_dir) / tiny_model.SPEC_FILE).write_text("{}")
        (Path(out_dir) / "config.json").write_text("{}")

    monkeypatch.setitem(tiny_model._BUILDERS, "policy", racing_build)
    assert ensure_embedded_model("policy", spec, cache_dir=tmp_path) == str(final)
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # our temp build was removed


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(out_dir, spec):
        (Path(out_dir) / "half.bin").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setitem(tiny_model._BUILDERS, "policy", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_embedded_model("policy", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_vllm_generates_from_the_policy(policy_dir):
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(policy_dir), dtype="bfloat16", enforce_eager=True, max_model_len=256, seed=0)
    try:
        params = [SamplingParams(max_tokens=16, temperature=1.0, logprobs=0, seed=100 + i) for i in range(len(PROMPTS))]
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        del llm
    hf = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    vocab = hf.config.vocab_size
    for prompt, out in zip(PROMPTS, outs):
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        assert out.prompt_token_ids[0] == 0  # vLLM used our tokenizer, with <s>
        assert 1 <= len(ids) <= 16 and all(0 <= t < vocab for t in ids)
        assert comp.logprobs is not None and len(comp.logprobs) == len(ids)
        vllm_lp = torch.tensor([step[t].logprob for step, t in zip(comp.logprobs, ids)])
        assert torch.isfinite(vllm_lp).all()
        assert math.isfinite(synthetic_task.gold_reward(prompt, comp.text))
        # vLLM serves the saved weights, not a fresh init of its own: its
        # sampling logprobs match transformers' on the same tokens up to bf16
        # kernel noise (measured 0.006), far below the 0.3 spread between tokens
        # and the 0.8 gap to a model with other random weights.
        seq = torch.tensor([list(out.prompt_token_ids) + ids])
        with torch.no_grad():
            logp = torch.log_softmax(hf(seq).logits[0].float(), -1)
        p = len(out.prompt_token_ids)
        hf_lp = logp[p - 1 : p - 1 + len(ids)].gather(-1, torch.tensor(ids)[:, None])[:, 0]
        assert (vllm_lp - hf_lp).abs().max() < 0.05, (vllm_lp, hf_lp)

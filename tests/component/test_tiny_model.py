"""The embedded tiny model: deterministic builds, pretraining, transformers and vLLM load it.

The default policy is built once (about 50 s: 100 pretraining steps); the
determinism and cache tests build a few-step variant (seconds each). The vLLM
test runs the real CPU engine in-process (about 10-30 s). Nothing is downloaded.
"""

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

# vLLM reads these at import: in-process engine (no spawned workers, starts in
# ~2 s), and an explicit KV-cache size or it refuses to start on a busy machine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest
import torch
from safetensors.torch import load_file

from cluster import synthetic_task, tiny_model
from cluster.tiny_model import TinyModelSpec, build_tiny_policy, ensure_embedded_model

PROMPTS = [
    "Write about animals in a calm way:",
    "Some bright words about tools:",
    "Talk about weather, kind style:",
    "List music words, bold please:",
]


# A few pretraining steps go through the whole training path in seconds.
QUICK = TinyModelSpec(pretrain_steps=3, pretrain_batch=8)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("policy"))


def test_two_builds_are_identical(tmp_path):
    first = build_tiny_policy(tmp_path / "first", QUICK)
    other = build_tiny_policy(tmp_path / "again", QUICK)
    assert (other / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    a = load_file(str(first / "model.safetensors"))
    b = load_file(str(other / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == torch.bfloat16, name
        assert torch.equal(a[name], b[name]), name
    # A different seed must give different weights, or the seed is not wired in.
    changed = build_tiny_policy(tmp_path / "seed1", TinyModelSpec(seed=1, pretrain_steps=3, pretrain_batch=8))
    c = load_file(str(changed / "model.safetensors"))
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    # Pretraining must reach the saved weights: 0 steps saves the random init.
    untrained = build_tiny_policy(tmp_path / "init", TinyModelSpec(pretrain_steps=0))
    d = load_file(str(untrained / "model.safetensors"))
    assert not torch.equal(a["lm_head.weight"], d["lm_head.weight"])


def test_pretraining_loss_is_near_its_floor(policy_dir):
    # Completion tokens of the pretraining text: a mean of 15 words, each
    # uniform over 314 task words (ln 314 = 5.749 nats), then </s>, whose place
    # is uniform over 19 lengths (ln 19 = 2.944 nats in all). Floor per token:
    # (15 * 5.749 + 2.944) / 16 = 5.574. A random init scores ln 1008 = 6.92.
    record = json.loads((policy_dir / tiny_model.SPEC_FILE).read_text())
    assert record["code_version"] == tiny_model.CODE_VERSION
    assert 5.574 - 0.03 < record["pretrain_loss"] < 5.574 + 0.05, record["pretrain_loss"]


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
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    last = batch.attention_mask.sum(-1) - 1  # right padding: each prompt's own last token
    logp = torch.log_softmax(logits[torch.arange(len(PROMPTS)), last], -1)
    # Pretrained: the first word is near uniform over the 314 task words
    # (ln 314 = 5.75 nats; the random init was near uniform over all 1008
    # tokens, 6.92), whatever the topic the prompt names: the prompt's 25 topic
    # words get about 25 / 314 = 8% of the mass, which RL must raise.
    word_ids = {w: tok(" " + w, add_special_tokens=False).input_ids[0] for w in synthetic_task.all_task_words()}
    p = logp.exp()
    assert (p[:, list(word_ids.values())].sum(-1) > 0.97).all()
    entropy = -(p * logp).sum(-1)
    assert ((entropy - math.log(len(word_ids))).abs() < 0.15).all(), entropy
    for row, prompt in enumerate(PROMPTS):
        topic_ids = [word_ids[w] for w in synthetic_task.TOPICS[synthetic_task.prompt_topic(prompt)]]
        assert 0.04 < p[row, topic_ids].sum() < 0.14, (prompt, p[row, topic_ids].sum())


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
    spec = QUICK
    path = ensure_embedded_model("policy", spec, cache_dir=tmp_path)
    assert Path(path).name == spec.cache_key("policy")

    def must_not_build(out_dir, spec):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setitem(tiny_model._BUILDERS, "policy", must_not_build)
    t0 = time.perf_counter()
    assert ensure_embedded_model("policy", spec, cache_dir=tmp_path) == path
    assert time.perf_counter() - t0 < 1.0
    # Any change to the spec is a different cache entry.
    assert replace(spec, num_layers=3).cache_key("policy") != spec.cache_key("policy")
    assert replace(spec, pretrain_lr=1e-3).cache_key("policy") != spec.cache_key("policy")
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

    eval_prompts = synthetic_task.make_prompts(64, seed=0, split="eval")
    llm = LLM(model=str(policy_dir), dtype="bfloat16", enforce_eager=True, max_model_len=256, seed=0)
    try:
        params = [SamplingParams(max_tokens=16, temperature=1.0, logprobs=0, seed=100 + i) for i in range(len(PROMPTS))]
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        # As the demo samples before RL: 24 new tokens at temperature 1.
        params = [SamplingParams(max_tokens=24, temperature=1.0, seed=1000 + i) for i in range(len(eval_prompts))]
        eval_outs = llm.generate(eval_prompts, params, use_tqdm=False)
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
        # kernel noise (measured up to 0.009), far below the ~1.2 nats between
        # a task word here (ln 314 = 5.75) and under a random init (ln 1008 = 6.92).
        seq = torch.tensor([list(out.prompt_token_ids) + ids])
        with torch.no_grad():
            logp = torch.log_softmax(hf(seq).logits[0].float(), -1)
        p = len(out.prompt_token_ids)
        hf_lp = logp[p - 1 : p - 1 + len(ids)].gather(-1, torch.tensor(ids)[:, None])[:, 0]
        assert (vllm_lp - hf_lp).abs().max() < 0.05, (vllm_lp, hf_lp)

    # Before RL the policy speaks the task's words, of every topic, and stops by
    # itself at varied lengths: its gold reward is that of random task words.
    # Measured on these 64 prompts: 99.9% task words, 95% stopped, 15.5 tokens, gold 0.134.
    task_words = set(synthetic_task.all_task_words())
    words = [w for out in eval_outs for w in synthetic_task.completion_words(out.outputs[0].text)]
    stopped = [out.outputs[0].finish_reason == "stop" for out in eval_outs]
    lengths = [len(out.outputs[0].token_ids) for out in eval_outs]
    gold = synthetic_task.gold_rewards(eval_prompts, [out.outputs[0].text for out in eval_outs])
    # the random init put 32% of its next-token mass on task words, 68% on other tokens
    assert sum(w in task_words for w in words) / len(words) > 0.9
    # the text has 1 in 19 completions of 24 words, cut before their </s>: 95% stop
    assert sum(stopped) / len(stopped) > 0.75
    # the text's completions average 16 tokens (15 words + </s>)
    assert 11 < sum(lengths) / len(lengths) < 21 and len(set(lengths)) >= 8, lengths
    # the text's gold is 0.143; a topic-following policy would near 1
    assert 0.08 < gold.mean() < 0.3, gold.mean()

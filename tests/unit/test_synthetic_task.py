"""The synthetic task: the gold labeller's numbers, splits, data sets, determinism."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flywheel import synthetic_task as st
from flywheel.synthetic_task import gold_reward

ANIMALS = "Write about animals in a calm way:"


# ------------------------------------------------------------------ gold reward, by hand


def test_eight_distinct_on_topic_words_score_one():
    # credit 8 x 1, n = 8 = TARGET_MIN, no excess length: 8 / 8 * 1 = 1
    assert gold_reward(ANIMALS, " lion tiger bear wolf fox cat dog cow") == 1.0


def test_repeats_earn_diminishing_credit():
    # " lion lion": credit 1 + 1/2 = 1.5, n = 2 < 8 so divide by 8: 0.1875
    assert gold_reward(ANIMALS, " lion lion") == pytest.approx(0.1875)
    # ten lions: harmonic H_10 = 2.928968..., n = 10: 0.2928968
    assert gold_reward(ANIMALS, " lion" * 10) == pytest.approx(2.9289683 / 10)
    # so collapsing onto one word is far from the optimum of 1


def test_filler_off_topic_and_unknown_words():
    # lion 1 + the 0.2 + red (colours, off topic) 0 + xyzzy 0 = 1.2, over max(4, 8): 0.15
    assert gold_reward(ANIMALS, " lion the red xyzzy") == pytest.approx(0.15)
    # a topic name is neutral: " colours" earns filler credit in an animals prompt, 0.2 / 8
    assert gold_reward(ANIMALS, " colours") == pytest.approx(0.025)
    # the same words are on topic for a colours prompt: red 1 + the 0.2 + lion 0 = 1.2 / 8
    assert gold_reward("Describe colours in a bold voice:", " lion the red") == pytest.approx(0.15)


def test_long_completions_lose_a_little():
    words = list(st.TOPICS["animals"])
    # 24 distinct on-topic words: relevance 24/24 = 1, excess (24-16)/16 = 0.5,
    # length factor 1 - 0.25 * 0.5 = 0.875
    assert gold_reward(ANIMALS, " " + " ".join(words[:24])) == pytest.approx(0.875)
    # 16 words is still inside the target: no penalty
    assert gold_reward(ANIMALS, " " + " ".join(words[:16])) == 1.0
    # the penalty saturates at 25% from 32 words on: 25 distinct + 15 repeats
    # credit 25 + 15 x 1/2 = 32.5 over 40 words, times 0.75 = 0.609375
    text = " " + " ".join(words + words[:15])
    assert gold_reward(ANIMALS, text) == pytest.approx(32.5 / 40 * 0.75)


def test_reading_ignores_case_and_punctuation():
    assert gold_reward(ANIMALS, " Lion, TIGER!") == gold_reward(ANIMALS, " lion tiger") == pytest.approx(0.25)


@pytest.mark.parametrize(
    "prompt, completion, expected",
    [
        (ANIMALS, "", 0.0),
        (ANIMALS, "   \n\t", 0.0),
        (ANIMALS, ",,,,!!!\ufffd\x00", 0.0),
        (b"\xff\xfe", b"\x00\xff lion", 0.0),  # no topic named: lion is an unknown word
        ("no topic here", " the and", pytest.approx(0.05)),  # 0.2 + 0.2 over 8
        # non-ASCII letters are dropped: the words are "caf" (0) and "zebra" (1), 1 / 8
        (ANIMALS, "\u65e5\u672c caf\u00e9 zebra", pytest.approx(1 / 8)),
    ],
)
def test_gold_reward_is_total(prompt, completion, expected):
    score = gold_reward(prompt, completion)
    assert math.isfinite(score) and score == expected


def test_gold_reward_is_fast_and_bounded_on_garbage():
    rng = np.random.default_rng(0)
    for _ in range(200):
        junk = bytes(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8))
        score = gold_reward(ANIMALS, junk.decode("latin-1"))
        assert 0.0 <= score <= 1.0
    assert st.gold_rewards([ANIMALS, ANIMALS], [" lion", ""]).tolist() == [pytest.approx(1 / 8), 0.0]


# --------------------------------------------------------------------------------- prompts


def test_train_and_eval_prompts_are_disjoint_and_cover_every_topic():
    train, eval_ = st.prompt_pool("train"), st.prompt_pool("eval")
    assert set(train).isdisjoint(eval_)
    assert len(train) + len(eval_) == len(st.all_prompts()) == 768
    assert 100 < len(eval_) < 200  # about one in five
    for pool in (train, eval_):
        assert {st.prompt_topic(p) for p in pool} == set(st.TOPICS)
    # Whatever the seed, sampled eval prompts never appear in any train sample.
    sampled_train = set(st.make_prompts(3000, 1, "train")) | set(st.make_prompts(3000, 2, "train"))
    assert sampled_train.isdisjoint(st.make_prompts(500, 1, "eval"))


def test_make_prompts_is_deterministic_and_cycles_the_pool():
    a = st.make_prompts(700, seed=3, split="train")
    assert a == st.make_prompts(700, seed=3, split="train")
    assert a != st.make_prompts(700, seed=4, split="train")
    pool = st.prompt_pool("train")
    assert sorted(a[: len(pool)]) == sorted(pool)  # one full pass before any repeat
    with pytest.raises(ValueError, match="split must be"):
        st.make_prompts(1, 0, "test")


def test_every_prompt_names_its_topic_once():
    for p in st.all_prompts():
        words = st.completion_words(p)
        assert sum(w in st.TOPICS for w in words) == 1, p
        assert all(w in st.TOPICS or w in st.FILLER_WORDS for w in words), p


# -------------------------------------------------------------------- demonstrations, pairs


def test_sft_demonstrations_are_good_and_on_train_prompts():
    demos = st.make_sft_demonstrations(300, seed=0)
    train = set(st.prompt_pool("train"))
    assert all(d.prompt in train for d in demos)
    assert all(d.completion.startswith(" ") for d in demos)
    golds = np.array([d.gold for d in demos])
    assert golds.min() >= 0.8 and golds.mean() > 0.9
    assert golds.tolist() == [gold_reward(d.prompt, d.completion) for d in demos]
    assert demos == st.make_sft_demonstrations(300, seed=0)


def test_preference_labels_follow_bradley_terry():
    def agreement(beta):
        pairs = st.make_preference_pairs(2000, seed=0, beta=beta)
        for p in pairs:
            assert p.gold_chosen == gold_reward(p.prompt, p.chosen)
        gaps = np.array([p.gold_chosen - p.gold_rejected for p in pairs])
        return pairs, gaps

    # A near-deterministic labeller always prefers the higher gold score.
    _, gaps = agreement(beta=1e4)
    assert (gaps[np.abs(gaps) > 1e-3] > 0).all()
    # beta = 0 is a coin flip: about half the labels disagree with gold.
    _, gaps = agreement(beta=0.0)
    assert 0.45 < (gaps > 0).mean() < 0.55
    # beta = 10: the agreement rate matches the mean of sigmoid(10 |gap|).
    _, gaps = agreement(beta=10.0)
    expected = np.mean(1 / (1 + np.exp(-10 * np.abs(gaps))))
    assert abs((gaps > 0).mean() - expected) < 0.03
    assert 0.75 < expected < 0.95  # varied quality: neither trivial nor pure noise


def test_corpus_has_every_word_often_with_a_leading_space():
    text = "\n".join(st.corpus_lines(0))
    for w in st.all_task_words():
        assert text.count(" " + w + " ") + text.count(" " + w + "\n") >= 30, w


# ---------------------------------------------------------------------------------- files


def test_write_and_load_datasets(tmp_path):
    sizes = {"prompts_train": 50, "prompts_eval": 20, "sft": 10, "preferences": 10}
    paths = st.write_datasets(tmp_path / "a", seed=5, sizes=sizes)
    assert sorted(paths) == ["preferences", "prompts_eval", "prompts_train", "sft"]
    again = st.write_datasets(tmp_path / "b", seed=5, sizes=sizes)
    for name in paths:
        assert paths[name].read_bytes() == again[name].read_bytes(), name

    train = st.load_prompts(tmp_path / "a", "train")
    assert train == st.make_prompts(50, 5, "train")
    assert st.load_prompts(paths["prompts_eval"]) == st.make_prompts(20, 5, "eval")
    with pytest.raises(FileNotFoundError, match="write_datasets"):
        st.load_prompts(tmp_path, "train")
    with pytest.raises(ValueError, match="unknown data set names"):
        st.write_datasets(tmp_path / "c", 0, {"prompts": 3})
    # A run needs only its prompts: nothing else is generated.
    only = st.write_datasets(tmp_path / "d", 0, {"prompts_train": 4})
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["prompts_train.jsonl"] == [only["prompts_train"].name]


def test_module_import_is_light():
    code = "import sys, flywheel.synthetic_task; print(sorted({'datasets', 'torch', 'transformers'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"

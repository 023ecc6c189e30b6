"""The arithmetic task: exact-match rewards by hand, splits, data sets, tokenizer, rule registry."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flywheel import arithmetic_task as at
from flywheel.arithmetic_task import answer, exact_match_reward

THREE_PLUS_FIVE = "What is 3 + 5? Answer:"  # answer 8


# -------------------------------------------------------------------- the rule, by hand


@pytest.mark.parametrize(
    "completion, expected",
    [
        (" 8", 1.0),  # the SFT form
        ("8", 1.0),  # no leading space
        (" 08", 1.0),  # leading zeros allowed: the value is compared, 08 = 8
        (" 7", 0.0),
        (" 8 9", 1.0),  # only the first integer counts
        (" 9 8", 0.0),  # ... even when a later one is right
        (" 88", 0.0),  # the whole digit run is read: 88, not 8
        (" 8.5", 1.0),  # the run stops at the dot: 8
        (" the answer is 8", 1.0),  # words before the first integer are skipped
        (" -8", 0.0),  # a minus sign directly before digits belongs to them: -8
        ("", 0.0),
        ("   \n\t", 0.0),
        (" eight", 0.0),  # digits only, not number words
        ("\uff18", 0.0),  # a fullwidth 8 is not an ASCII digit
        (",,\x00\ufffd!!", 0.0),
        (b"\xff\xfe 8", 1.0),  # bytes are decoded with replacement, then read
        (b"\xff\xfe\x00", 0.0),
        (" " + "8" * 5000, 0.0),  # a huge run is not an answer (and int() is never asked)
    ],
)
def test_exact_match_reward_by_hand(completion, expected):
    assert exact_match_reward(THREE_PLUS_FIVE, completion) == expected


def test_subtraction_and_negative_answers_are_read():
    assert answer("What is 7 - 2? Answer:") == 5
    assert exact_match_reward("What is 7 - 2? Answer:", " 5") == 1.0
    # Never generated (results are non-negative) but parsed: 2 - 7 = -5, and " -5" reads as -5.
    assert answer("What is 2 - 7? Answer:") == -5
    assert exact_match_reward("What is 2 - 7? Answer:", " -5") == 1.0
    assert exact_match_reward("What is 2 - 7? Answer:", " - 5") == 0.0  # a detached sign is not read: 5


@pytest.mark.parametrize("prompt", ["Write about animals in a calm way:", "", "What is 3 * 5? Answer:", b"\xff\x00"])
def test_a_prompt_naming_no_problem_scores_zero(prompt):
    assert answer(prompt) is None
    assert exact_match_reward(prompt, " 8") == 0.0
    assert exact_match_reward(prompt, "") == 0.0


def test_reward_is_total_on_garbage():
    rng = np.random.default_rng(0)
    for _ in range(300):
        junk = bytes(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8))
        assert exact_match_reward(THREE_PLUS_FIVE, junk) in (0.0, 1.0)
        assert exact_match_reward(junk, junk.decode("latin-1")) in (0.0, 1.0)
    assert at.exact_match_rewards([THREE_PLUS_FIVE] * 2, [" 8", " 7"]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        at.exact_match_rewards([THREE_PLUS_FIVE] * 2, [" 8"])


# ------------------------------------------------------------------------------- prompts


def test_every_prompt_parses_to_its_operands_result():
    prompts = at.all_prompts()
    # All sums, differences with b <= a, each in every phrasing.
    assert len(prompts) == len(set(prompts)) == (100 + 55) * len(at.TEMPLATES)
    for p in prompts:
        words = p.replace("?", " ").replace(".", " ").split()  # "... A op B ... Answer:"
        i = next(k for k, w in enumerate(words) if w in ("+", "-"))
        a, op, b = int(words[i - 1]), words[i], int(words[i + 1])
        assert 0 <= a <= at.MAX_OPERAND and 0 <= b <= at.MAX_OPERAND, p
        expected = a + b if op == "+" else a - b
        assert answer(p) == expected and 0 <= expected <= 18, p
        assert exact_match_reward(p, f" {expected}") == 1.0
        assert exact_match_reward(p, f" {expected + 1}") == 0.0


def test_train_and_eval_prompts_are_disjoint_and_hold_both_operators():
    train, eval_ = at.prompt_pool("train"), at.prompt_pool("eval")
    assert set(train).isdisjoint(eval_)
    assert sorted(train + eval_) == sorted(at.all_prompts())
    assert 0.1 < len(eval_) / len(at.all_prompts()) < 0.35  # about one in five
    for pool in (train, eval_):
        assert {at.answer(p) for p in pool} == set(range(19))  # both operators, every answer 0-18
    # A held-out prompt asks a problem that training asks in another phrasing: the split tests
    # wording, not arithmetic the policy never saw.
    problem = lambda p: at._PROBLEM_RE.search(p).groups()  # noqa: E731
    assert {problem(p) for p in eval_} <= {problem(p) for p in train}
    # Whatever the seed, sampled eval prompts never appear in any train sample.
    sampled_train = set(at.make_prompts(1000, 1, "train")) | set(at.make_prompts(1000, 2, "train"))
    assert sampled_train.isdisjoint(at.make_prompts(200, 1, "eval"))


def test_make_prompts_is_deterministic_and_cycles_the_pool():
    a = at.make_prompts(1000, seed=3, split="train")
    assert a == at.make_prompts(1000, seed=3, split="train")
    assert a != at.make_prompts(1000, seed=4, split="train")
    pool = at.prompt_pool("train")
    assert sorted(a[: len(pool)]) == sorted(pool)  # one full pass before any repeat
    with pytest.raises(ValueError, match="split must be"):
        at.make_prompts(1, 0, "test")


def test_sft_demonstrations_are_correct_train_answers_with_nothing_after():
    demos = at.make_sft_demonstrations(500, seed=0)
    train = set(at.prompt_pool("train"))
    for d in demos:
        assert d.prompt in train
        assert d.completion == f" {answer(d.prompt)}"  # e.g. " 8": no trailing text or newline
        assert exact_match_reward(d.prompt, d.completion) == 1.0
    assert demos == at.make_sft_demonstrations(500, seed=0)


# ----------------------------------------------------------------------------- tokenizer


def test_embedded_tokenizer_round_trips_prompts_and_completions():
    from transformers import AutoTokenizer

    from flywheel.tiny_model import ensure_embedded_model

    tok = AutoTokenizer.from_pretrained(ensure_embedded_model("policy"))
    texts = [d.prompt + d.completion for d in at.make_sft_demonstrations(len(at.all_prompts()), 0)]
    texts += [p + f" {answer(p)}" for p in at.prompt_pool("eval")]
    for text in texts:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    # Digits are single byte tokens, so an answer is a space and at most two digits.
    assert len(tok(" 18", add_special_tokens=False)["input_ids"]) <= 3


# --------------------------------------------------------------------------------- files


def test_write_and_load_datasets(tmp_path):
    import datasets

    sizes = {"prompts_train": 50, "prompts_eval": 20, "sft": 10}
    paths = at.write_datasets(tmp_path / "a", seed=5, sizes=sizes)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["prompts_eval.jsonl", "prompts_train.jsonl", "sft.jsonl"]
    again = at.write_datasets(tmp_path / "b", seed=5, sizes=sizes)
    for name in paths:
        assert paths[name].read_bytes() == again[name].read_bytes(), name

    def load(name):
        return datasets.load_dataset("json", data_files=str(paths[name]), split="train")

    train, eval_, sft = load("prompts_train"), load("prompts_eval"), load("sft")
    assert train.column_names == eval_.column_names == ["prompt"]
    assert train["prompt"] == at.make_prompts(50, 5, "train")
    assert eval_["prompt"] == at.make_prompts(20, 5, "eval")
    assert sft.column_names == ["prompt", "completion"]
    assert [json.loads(line) for line in paths["sft"].read_text().splitlines()] == [
        {"prompt": d.prompt, "completion": d.completion} for d in at.make_sft_demonstrations(10, 5)
    ]
    # The synthetic task's loader reads these prompt files too.
    from flywheel.synthetic_task import load_prompts

    assert load_prompts(tmp_path / "a", "eval") == eval_["prompt"]

    with pytest.raises(ValueError, match="unknown data set names"):
        at.write_datasets(tmp_path / "c", 0, {"preferences": 3})
    only = at.write_datasets(tmp_path / "d", 0, {"prompts_train": 4})
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["prompts_train.jsonl"] == [only["prompts_train"].name]


# -------------------------------------------------------------------------------- wiring


def test_rule_is_registered_by_name():
    from reward_service.rules import get_rule

    rule = get_rule("arithmetic_exact")
    assert rule(THREE_PLUS_FIVE, " 8") == 1.0
    assert rule(THREE_PLUS_FIVE, " 7") == 0.0
    assert type(rule(THREE_PLUS_FIVE, " 8")) is float


def test_module_import_is_light():
    code = "import sys, flywheel.arithmetic_task; print(sorted({'datasets', 'torch', 'transformers'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"

"""flywheel.data_formats: every accepted row shape, read into exact records; every bad file named row by row."""

import json
import math
from pathlib import Path

import pytest

from flywheel import synthetic_task
from flywheel.data_formats import (
    DataError,
    PreferenceExample,
    SFTExample,
    expand_ranking,
    load_preferences,
    load_sft,
    shape_of,
    split_hh_transcript,
)

DATA = Path(__file__).resolve().parent.parent / "fixtures" / "data"

# A small template of our own: each turn "<|role|>\ncontent", assistant turns end with the eos text.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEMPLATE_NO_EOS = TEMPLATE.replace("{{ eos_token }}", "\n")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from flywheel.tiny_model import ensure_embedded_model

    tok = AutoTokenizer.from_pretrained(ensure_embedded_model("policy"))
    tok.chat_template = TEMPLATE
    assert tok.eos_token == "</s>"
    return tok


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ SFT


def test_sft_prompt_response():
    records = load_sft(DATA / "sft.jsonl")
    assert len(records) == 4
    assert records[0] == SFTExample("Question: How many legs does a spider have?\nAnswer:", " A spider has eight legs.")
    assert records[2] == SFTExample("Name a primary colour.\n", "Red is a primary colour.")  # text is never stripped


def test_sft_prompt_completion_ignores_extra_columns(tmp_path):
    path = write_jsonl(tmp_path / "demo.jsonl", [{"prompt": "Say hi:", "completion": " hi", "score": 0.5}])
    assert load_sft(path) == [SFTExample("Say hi:", " hi")]


def test_synthetic_task_files_load(tmp_path):
    paths = synthetic_task.write_datasets(tmp_path, 0, {"sft": 5, "preferences": 5})
    demos = synthetic_task.make_sft_demonstrations(5, 0)
    pairs = synthetic_task.make_preference_pairs(5, 0)
    assert load_sft(paths["sft"]) == [SFTExample(d.prompt, d.completion) for d in demos]
    assert load_preferences(paths["preferences"]) == [
        PreferenceExample(p.prompt, p.chosen, p.rejected, gold_margin=p.gold_chosen - p.gold_rejected) for p in pairs
    ]


def test_sft_chat_rendering(tokenizer):
    records = load_sft(DATA / "sft_chat.jsonl", chat_template_tokenizer=tokenizer)
    assert len(records) == 3
    assert records[0] == SFTExample(
        "<|user|>\nWhat is the boiling point of water at sea level?<|assistant|>\n",
        "It boils at 100 degrees Celsius at sea level.</s>",
    )
    # multi-turn: earlier assistant turns are prompt; only the last one is the response
    assert records[2] == SFTExample(
        "<|user|>\nCan you suggest a name for a goldfish?<|assistant|>\nHow about Bubbles?</s>"
        "<|user|>\nSomething less common, please.<|assistant|>\n",
        "Try Marmalade.</s>",
    )
    # the response continues the prompt exactly: together they are the rendered conversation
    rows = [json.loads(line) for line in (DATA / "sft_chat.jsonl").read_text().splitlines()]
    for row, rec in zip(rows, records):
        assert rec.prompt + rec.response == tokenizer.apply_chat_template(row["messages"], tokenize=False)


def test_sft_chat_without_eos_in_template_is_the_content(tokenizer):
    tokenizer_no_eos = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer_no_eos.chat_template = TEMPLATE_NO_EOS
    records = load_sft(DATA / "sft_chat.jsonl", chat_template_tokenizer=tokenizer_no_eos)
    assert records[1].response == "Hat."  # the template's "\n" after the turn is not part of it


def test_chat_needs_a_tokenizer_with_a_template(tokenizer):
    with pytest.raises(DataError, match=r"sft_chat\.jsonl.*no tokenizer was given.*chat template"):
        load_sft(DATA / "sft_chat.jsonl")
    bare = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(DataError, match=r"pairs_chat\.jsonl.*has no chat_template"):
        load_preferences(DATA / "pairs_chat.jsonl", chat_template_tokenizer=bare)


def test_sft_chat_bad_rows(tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
            {"messages": [{"role": "user", "content": "Hi"}]},
        ],
    )
    with pytest.raises(DataError) as err:
        load_sft(path, chat_template_tokenizer=tokenizer)
    msg = str(err.value)
    assert "chat.jsonl" in msg and "2 of 3 rows are bad, at lines 2, 3:" in msg
    assert "empty (whitespace-only) last assistant message in 'messages': lines 2" in msg
    assert "'messages' does not end with an assistant message: lines 3" in msg


def test_sft_empty_response_is_bad(tmp_path):
    rows = [{"prompt": "Q:", "response": " A"}, {"prompt": "Q:", "response": "\n "}]
    path = write_jsonl(tmp_path / "demo.jsonl", rows)
    with pytest.raises(DataError, match=r"at lines 2:\n  - empty \(whitespace-only\) field 'response': lines 2"):
        load_sft(path)


# ---------------------------------------------------------------------- preferences


def test_triples_and_parquet_twin():
    records = load_preferences(DATA / "pairs.jsonl")
    assert len(records) == 4
    assert records[1] == PreferenceExample("What is 7 times 8?", " 7 times 8 is 56.", " 7 times 8 is 54.", 1.0)
    assert load_preferences(DATA / "pairs.parquet") == records


def test_expand_ranking_by_hand():
    # ranking [2, 0, 1]: c is best, b worst; C(3, 2) = 3 pairs, best-vs-each first, each 1/3
    pairs = expand_ranking("p", ["a", "b", "c"], [2, 0, 1])
    assert [(p.chosen, p.rejected) for p in pairs] == [("c", "a"), ("c", "b"), ("a", "b")]
    assert [p.weight for p in pairs] == [1 / 3] * 3
    assert all(p.prompt == "p" for p in pairs)


def test_rankings_file():
    records = load_preferences(DATA / "rankings.jsonl")
    # rows rank 3, 2 and 4 completions: 3 + 1 + 6 pairs
    assert len(records) == 3 + 1 + 6
    assert records[0] == PreferenceExample(
        "Describe autumn in one sentence.",
        " Autumn paints the trees in red and gold before the first frost.",
        " Leaves fall.",
        1 / 3,
    )
    assert records[3] == PreferenceExample(
        "What should I pack for a day hike?", " Water, snacks, a map and a light jacket.", " Nothing.", 1.0
    )
    weights: dict[str, float] = {}
    for r in records:
        weights[r.prompt] = weights.get(r.prompt, 0.0) + r.weight
    assert all(math.isclose(w, 1.0) for w in weights.values()) and len(weights) == 3
    assert {r.weight for r in records[4:]} == {1 / 6}


def test_hh_split_by_hand():
    text = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant: Goodbye!"
    # split at the LAST "\n\nAssistant:"; the marker stays with the prompt
    assert split_hh_transcript(text) == ("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:", " Goodbye!")
    assert split_hh_transcript("\n\nHuman: Hi") is None


def test_hh_file():
    records = load_preferences(DATA / "hh.jsonl")
    assert len(records) == 3
    assert records[1] == PreferenceExample(
        "\n\nHuman: How long should I steep green tea?\n\nAssistant: About two to three minutes."
        "\n\nHuman: And the water temperature?\n\nAssistant:",
        " Around 80 degrees Celsius, just below boiling.",
        " Boiling hot, as hot as possible.",
    )


def test_chat_pairs(tokenizer):
    records = load_preferences(DATA / "pairs_chat.jsonl", chat_template_tokenizer=tokenizer)
    assert len(records) == 3
    assert records[0] == PreferenceExample(
        "<|user|>\nWhat is the capital of Australia?<|assistant|>\n",
        "The capital of Australia is Canberra.</s>",
        "The capital of Australia is Sydney.</s>",
    )
    assert records[2].prompt == "<|system|>\nAnswer briefly.<|user|>\nShould I water a cactus every day?<|assistant|>\n"


def test_chat_pairs_without_prompt_column_must_share_their_prefix(tokenizer, tmp_path):
    user = {"role": "user", "content": "Pick a fruit."}
    path = write_jsonl(
        tmp_path / "conv.jsonl",
        [
            {"chosen": [user, {"role": "assistant", "content": "Apple."}],
             "rejected": [user, {"role": "assistant", "content": "Rock."}]},
            {"chosen": [user, {"role": "assistant", "content": "Pear."}],
             "rejected": [{"role": "user", "content": "Pick a stone."}, {"role": "assistant", "content": "Rock."}]},
        ],
    )  # fmt: skip
    differ = r"1 of 2 rows are bad, at lines 2:\n  - chosen and rejected conversations differ"
    with pytest.raises(DataError, match=differ):
        load_preferences(path, chat_template_tokenizer=tokenizer)
    good = write_jsonl(tmp_path / "good.jsonl", [json.loads(path.read_text().splitlines()[0])])
    assert load_preferences(good, chat_template_tokenizer=tokenizer) == [
        PreferenceExample("<|user|>\nPick a fruit.<|assistant|>\n", "Apple.</s>", "Rock.</s>")
    ]


# ------------------------------------------------------------------------ detection


def test_shape_detection_rule():
    msgs = [{"role": "assistant", "content": "x"}]
    assert shape_of({"prompt", "completions", "ranking"}, [{}], "preferences") == "rankings"
    assert shape_of({"chosen", "rejected"}, [{"chosen": msgs}], "preferences") == "chat_pairs"
    assert shape_of({"prompt", "chosen", "rejected"}, [{"chosen": msgs}], "preferences") == "chat_pairs"
    assert shape_of({"prompt", "chosen", "rejected", "gold_chosen"}, [{"chosen": "x"}], "preferences") == "triples"
    assert shape_of({"chosen", "rejected"}, [{"chosen": "x"}], "preferences") == "hh_transcripts"
    assert shape_of({"prompt", "response"}, [{}], "preferences") is None
    assert shape_of({"messages"}, [{}], "sft") == "chat"
    assert shape_of({"prompt", "response", "completion"}, [{}], "sft") == "prompt_response"
    assert shape_of({"prompt", "completion", "gold"}, [{}], "sft") == "prompt_completion"
    assert shape_of({"text"}, [{}], "sft") is None


def test_unknown_shape_lists_columns_and_shapes():
    with pytest.raises(DataError) as err:
        load_sft(DATA / "pairs.jsonl")
    msg = str(err.value)
    assert "pairs.jsonl" in msg and "['chosen', 'prompt', 'rejected']" in msg
    assert all(name in msg for name in ("chat:", "prompt_response:", "prompt_completion:"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.jsonl: no such file"):
        load_preferences(tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match=r"nowhere\.parquet: no such file"):
        load_preferences(str(tmp_path / "nowhere.parquet"))


# ------------------------------------------------------------------------- bad files


def bad_message(loader, name: str) -> str:
    with pytest.raises(DataError) as err:
        loader(DATA / name)
    msg = str(err.value)
    assert str(DATA / name) in msg and msg.endswith("Fix or drop these rows, then load the file again.")
    return msg


def test_bad_pairs():
    msg = bad_message(load_preferences, "bad_pairs.jsonl")
    assert "3 of 5 rows are bad, at lines 2, 3, 5:" in msg
    assert "missing field 'rejected': lines 2\n" in msg
    assert "empty (whitespace-only) field 'chosen': lines 3\n" in msg
    assert "chosen equals rejected: lines 5\n" in msg


def test_bad_hh():
    msg = bad_message(load_preferences, "bad_hh.jsonl")
    assert "2 of 3 rows are bad, at lines 2, 3:" in msg
    assert "'chosen' transcript does not split: no '\\n\\nAssistant:' in it: lines 2\n" in msg
    assert "chosen and rejected transcripts differ before their last '\\n\\nAssistant:': lines 3\n" in msg


def test_bad_rankings():
    msg = bad_message(load_preferences, "bad_rankings.jsonl")
    assert "2 of 4 rows are bad, at lines 2, 3:" in msg
    assert "'ranking' is not a permutation of the completion indices 0..k-1: lines 2, 3\n" in msg


def test_ranking_row_problems(tmp_path):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"prompt": "Q", "completions": [" a", " b"], "ranking": [1, 0]},
            {"prompt": "Q", "completions": [" a"], "ranking": [0]},
            {"prompt": "Q", "completions": [" a", " a"], "ranking": [0, 1]},
            {"prompt": " ", "completions": [" a", ""], "ranking": [0, 1]},
        ],
    )
    msg = str(pytest.raises(DataError, load_preferences, path).value)
    assert "3 of 4 rows are bad, at lines 2, 3, 4:" in msg
    assert "fewer than 2 completions to rank: lines 2\n" in msg
    assert "two completions are identical (a pair would have chosen equal to rejected): lines 3\n" in msg
    assert "empty (whitespace-only) field 'prompt': lines 4\n" in msg
    assert "empty (whitespace-only) completion in 'completions': lines 4\n" in msg


def test_row_numbers_are_jsonl_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    good = json.dumps({"prompt": "Q", "chosen": " yes", "rejected": " no"})
    bad = json.dumps({"prompt": "Q", "chosen": " same", "rejected": " same"})
    path.write_text(f"{good}\n\n{good}\n\n{bad}\n")  # blank lines 2 and 4; the bad row is on line 5
    with pytest.raises(DataError, match=r"1 of 3 rows are bad, at lines 5:"):
        load_preferences(path)


def test_first_ten_rows_are_listed_and_the_count_is_whole(tmp_path):
    rows = [{"prompt": "Q", "chosen": " x", "rejected": " x"}] * 12
    msg = str(pytest.raises(DataError, load_preferences, write_jsonl(tmp_path / "many.jsonl", rows)).value)
    assert "12 of 12 rows are bad, at lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... (2 more):" in msg


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "Q", "response": " A"}\n{"prompt": "Q", "response": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl: not one JSON object per line at lines 2 \(1 in all\)"):
        load_sft(path)

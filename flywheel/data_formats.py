"""The data formats people already have, read into SFT and preference records.

This module owns how a file (or a hub data set) of demonstrations or
preferences becomes `SFTExample` / `PreferenceExample` records. Local `.jsonl`,
`.json` and `.parquet` files are read through `datasets`; any other source is
taken as a hub data set name and `split`. The shape of the rows is detected
once per file from its columns (`shape_of`), then every row is parsed by that
shape's function.

SFT shapes (first match wins):

- `chat`: `{"messages": [{"role", "content"}, ...]}`, rendered with a chat template;
- `prompt_response`: `{"prompt", "response"}`;
- `prompt_completion`: `{"prompt", "completion"}` (the synthetic task's `sft.jsonl`).

Preference shapes (first match wins):

- `rankings`: `{"prompt", "completions": [str, ...], "ranking": [int, ...]}`.
  `ranking` lists completion indices best first: `[2, 0, 1]` means completion 2
  is best and completion 1 worst. A ranking of k completions becomes all
  C(k, 2) pairs (better, worse), in the order `(ranking[i], ranking[j])` for
  i < j, each of weight 1 / C(k, 2), so every prompt weighs 1 in total, as in
  InstructGPT (Ouyang et al., 2022, section 3.5). Ties are not expressible.
- `chat_pairs`: `{"chosen": [messages], "rejected": [messages]}`, with an
  optional `"prompt"` list of messages put before both (a string `prompt`
  column is ignored: the conversations carry the prompt, as in
  UltraFeedback-binarized). The messages before the last assistant message
  must be the same in both; they are the prompt.
- `triples`: `{"prompt", "chosen", "rejected"}` (the synthetic task's `preferences.jsonl`).
- `hh_transcripts`: `{"chosen", "rejected"}` transcripts with no prompt column
  (Anthropic HH-RLHF). Each is split at its last "\\n\\nAssistant:": the prompt
  is the text up to and including it, the completion the rest. The two
  prompts must be identical.

Text is never stripped or rewritten: the prompt and its completion are used as
given, so `prompt + response` is the text the model sees. Extra columns are
ignored.

Chat rendering. With a tokenizer whose `chat_template` is set, the prompt is
the messages before the last assistant message rendered with
`add_generation_prompt=True`. The response is the template's own text after
that prompt, through the assistant message's content, and through the
tokenizer's eos token text when the template writes one after the content
(ChatML's `<|im_end|>` is only included when it is the eos token). So
`prompt + response` is always an exact prefix of the rendered conversation.

Bad rows are never dropped silently: every row is checked, and one `DataError`
names the source, the number of bad rows, their first row numbers (1-based;
for JSONL the line number) and one line per kind of problem.

Only the standard library is imported at module import; `datasets` is
imported inside the loader.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HH_ASSISTANT = "\n\nAssistant:"
MAX_ROWS_LISTED = 10  # row numbers quoted in an error; the count says how many in all


@dataclass(frozen=True)
class SFTExample:
    """One demonstration."""

    prompt: str  # text the model is conditioned on (loss masked out)
    response: str  # text it learns to produce; continues the prompt text exactly


@dataclass(frozen=True)
class PreferenceExample:
    """One comparison of two continuations of the same prompt."""

    prompt: str
    chosen: str  # continuation preferred by the labeller
    rejected: str
    weight: float = 1.0  # pairs expanded from one ranking share weight 1 per prompt
    # gold(chosen) - gold(rejected) where the data carries a gold labeller's scores (the synthetic
    # task's `gold_chosen` / `gold_rejected` columns): the true ordering behind a noisy choice.
    gold_margin: float | None = None


class DataError(ValueError):
    """A data file that cannot be trained on; the message names the file, the rows and the fix."""


# ------------------------------------------------------------------------- loading rows


@dataclass(frozen=True)
class _Rows:
    """The rows of one source, with the numbers a user can find them by."""

    label: str  # the file path or "name (split)" for messages
    rows: list[dict]
    columns: list[str]
    numbers: list[int]  # 1-based; the JSONL line number where there is one
    unit: str  # "line" or "row"


def _is_local(source: str | os.PathLike) -> bool:
    if isinstance(source, os.PathLike):
        return True
    text = str(source)
    return (
        Path(text).expanduser().exists()
        or Path(text).suffix in LOCAL_SUFFIXES
        or text.startswith(("/", "./", "../", "~"))
    )


def _jsonl_line_numbers(path: Path) -> list[int]:
    with open(path, encoding="utf-8") as f:
        return [i for i, line in enumerate(f, start=1) if line.strip()]


def _bad_json_lines(path: Path) -> list[int]:
    bad = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok:
                bad.append(i)
    return bad


def _load_error(label: str, path: Path | None, err: Exception) -> DataError:
    if path is not None and path.suffix == ".jsonl":
        bad = _bad_json_lines(path)
        if bad:
            return DataError(
                f"{label}: not one JSON object per line at lines {_numbers(bad)} ({len(bad)} in all); "
                "fix or drop these lines"
            )
    hint = (
        "check that every row has the same column types"
        if path is not None
        else "check the data set name and split, or pass a local .jsonl or .parquet path"
    )
    return DataError(f"{label}: could not load ({type(err).__name__}: {err}); {hint}")


def _load_rows(source: str | os.PathLike, split: str) -> _Rows:
    import datasets  # heavy (pyarrow, pandas); only the data path needs it

    path = Path(source).expanduser() if _is_local(source) else None
    if path is not None and not path.exists():
        raise DataError(f"{path}: no such file; pass an existing .jsonl or .parquet file, or a hub data set name")
    if path is not None and path.is_file():
        builder = LOCAL_SUFFIXES.get(path.suffix)
        if builder is None:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(LOCAL_SUFFIXES)}")
        label = str(path)
        load = lambda: datasets.load_dataset(builder, data_files=str(path), split="train")  # noqa: E731
    else:  # a hub name, or a local directory that `datasets` knows how to read
        label = f"{source} (split {split!r})"
        load = lambda: datasets.load_dataset(str(path or source), split=split)  # noqa: E731
    try:
        ds = load()
    except Exception as err:  # datasets raises many types; all mean "cannot read this source"
        raise _load_error(label, path if path is not None and path.is_file() else None, err) from err
    rows = ds.to_list()
    if not rows:
        raise DataError(f"{label}: no rows; nothing to train on")
    numbers, unit = list(range(1, len(rows) + 1)), "row"
    if path is not None and path.suffix == ".jsonl":
        lines = _jsonl_line_numbers(path)
        if len(lines) == len(rows):
            numbers, unit = lines, "line"
    return _Rows(label, rows, list(ds.column_names), numbers, unit)


# ---------------------------------------------------------------------- checking rows


class _BadRow(Exception):
    """Raised by a row parser with every problem it found in that row."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def _texts(row: Mapping, fields: Sequence[str]) -> list[str]:
    """The named fields as non-empty strings, or _BadRow naming every one that is not."""
    problems = []
    for name in fields:
        value = row.get(name)
        if value is None:
            problems.append(f"missing field {name!r}")
        elif not isinstance(value, str):
            problems.append(f"field {name!r} is not a string")
        elif not value.strip():
            problems.append(f"empty (whitespace-only) field {name!r}")
    if problems:
        raise _BadRow(problems)
    return [row[name] for name in fields]


def _numbers(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:MAX_ROWS_LISTED])
    return shown + (f", ... ({len(numbers) - MAX_ROWS_LISTED} more)" if len(numbers) > MAX_ROWS_LISTED else "")


def _bad_rows_error(src: _Rows, shape: _Shape, problems: dict[str, list[int]]) -> DataError:
    bad = sorted({n for ns in problems.values() for n in ns})
    lines = [
        f"{src.label} ({shape.name}: {shape.columns}): {len(bad)} of {len(src.rows)} rows are bad, "
        f"at {src.unit}s {_numbers(bad)}:"
    ]
    lines += [f"  - {kind}: {src.unit}s {_numbers(ns)}" for kind, ns in problems.items()]
    lines.append("Fix or drop these rows, then load the file again.")
    return DataError("\n".join(lines))


# ------------------------------------------------------------------------ chat templates


def _check_template(tokenizer: Any, label: str, shape: _Shape) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        what = "no tokenizer was given" if tokenizer is None else "the tokenizer has no chat_template"
        raise DataError(
            f"{label}: rows are chat messages ({shape.columns}) but {what}; pass "
            "chat_template_tokenizer=<a tokenizer with a chat template>, e.g. "
            "AutoTokenizer.from_pretrained(<an instruct model>), or set tokenizer.chat_template"
        )


def _messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        raise _BadRow([f"field {field!r} is not a list of {{role, content}} messages"])
    # `datasets` fills keys other rows have with None; the template should not see them
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def _render(tokenizer: Any, messages: list[dict], field: str) -> tuple[str, str]:
    """(prompt, response) of a conversation that ends with the assistant's message."""
    if not messages or messages[-1]["role"] != "assistant":
        raise _BadRow([f"{field!r} does not end with an assistant message"])
    content = messages[-1]["content"].strip()
    if not content:
        raise _BadRow([f"empty (whitespace-only) last assistant message in {field!r}"])
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # jinja raises whatever the template author chose
        raise _BadRow([f"the chat template raised {type(err).__name__}: {err}"]) from err
    start = full[len(prompt) :].find(content) if full.startswith(prompt) else -1
    if start < 0:
        raise _BadRow(["the chat template does not render the assistant message right after the prompt"])
    tail = full[len(prompt) :]
    end = start + len(content)
    eos = getattr(tokenizer, "eos_token", None) or ""
    eos_at = tail.find(eos, end) if eos else -1
    return prompt, tail[: eos_at + len(eos)] if eos_at >= 0 else tail[:end]


# ------------------------------------------------------------------------ SFT row shapes


def _sft_response(row: Mapping, tokenizer: Any) -> list[SFTExample]:
    return [SFTExample(*_texts(row, ("prompt", "response")))]


def _sft_completion(row: Mapping, tokenizer: Any) -> list[SFTExample]:
    return [SFTExample(*_texts(row, ("prompt", "completion")))]


def _sft_chat(row: Mapping, tokenizer: Any) -> list[SFTExample]:
    if row.get("messages") is None:
        raise _BadRow(["missing field 'messages'"])
    return [SFTExample(*_render(tokenizer, _messages(row["messages"], "messages"), "messages"))]


# ----------------------------------------------------------------- preference row shapes


def _distinct(chosen: str, rejected: str) -> None:
    if chosen == rejected:
        raise _BadRow(["chosen equals rejected"])


def _pref_triple(row: Mapping, tokenizer: Any) -> list[PreferenceExample]:
    prompt, chosen, rejected = _texts(row, ("prompt", "chosen", "rejected"))
    _distinct(chosen, rejected)
    return [PreferenceExample(prompt, chosen, rejected, gold_margin=_gold_margin(row))]


def _gold_margin(row: Mapping) -> float | None:
    golds = row.get("gold_chosen"), row.get("gold_rejected")
    if all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in golds):
        return float(golds[0]) - float(golds[1])
    return None


def split_hh_transcript(text: str) -> tuple[str, str] | None:
    """(prompt through the last "\\n\\nAssistant:", the rest), or None if there is no such marker."""
    at = text.rfind(HH_ASSISTANT)
    if at < 0:
        return None
    cut = at + len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def _pref_hh(row: Mapping, tokenizer: Any) -> list[PreferenceExample]:
    texts = _texts(row, ("chosen", "rejected"))
    halves = [split_hh_transcript(t) for t in texts]
    problems = [
        f"{name!r} transcript does not split: no '\\n\\nAssistant:' in it"
        for name, half in zip(("chosen", "rejected"), halves)
        if half is None
    ]
    problems += [
        f"{name!r} has an empty completion after the last '\\n\\nAssistant:'"
        for name, half in zip(("chosen", "rejected"), halves)
        if half is not None and not half[1].strip()
    ]
    if problems:
        raise _BadRow(problems)
    (prompt, chosen), (prompt_rejected, rejected) = halves
    if prompt != prompt_rejected:
        raise _BadRow(["chosen and rejected transcripts differ before their last '\\n\\nAssistant:'"])
    _distinct(chosen, rejected)
    return [PreferenceExample(prompt, chosen, rejected)]


def expand_ranking(prompt: str, completions: Sequence[str], ranking: Sequence[int]) -> list[PreferenceExample]:
    """All C(k, 2) pairs of a best-first ranking, each of weight 1 / C(k, 2).

    Pairs come in the order (ranking[i], ranking[j]) for i < j: the best
    against each worse one, then the second best, and so on.
    """
    k = len(ranking)
    weight = 1.0 / math.comb(k, 2)
    return [
        PreferenceExample(prompt, completions[ranking[i]], completions[ranking[j]], weight)
        for i in range(k)
        for j in range(i + 1, k)
    ]


def _pref_ranking(row: Mapping, tokenizer: Any) -> list[PreferenceExample]:
    problems = []
    try:
        (prompt,) = _texts(row, ("prompt",))
    except _BadRow as bad:
        prompt, problems = "", bad.problems
    completions, ranking = row.get("completions"), row.get("ranking")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        problems.append("field 'completions' is not a list of strings")
    elif len(completions) < 2:
        problems.append("fewer than 2 completions to rank")
    elif any(not c.strip() for c in completions):
        problems.append("empty (whitespace-only) completion in 'completions'")
    elif len(set(completions)) < len(completions):
        problems.append("two completions are identical (a pair would have chosen equal to rejected)")
    if isinstance(completions, list) and not (
        isinstance(ranking, list)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
        and sorted(ranking) == list(range(len(completions)))
    ):
        problems.append("'ranking' is not a permutation of the completion indices 0..k-1")
    if problems:
        raise _BadRow(problems)
    return expand_ranking(prompt, completions, ranking)


def _pref_chat(row: Mapping, tokenizer: Any) -> list[PreferenceExample]:
    missing = [f"missing field {name!r}" for name in ("chosen", "rejected") if row.get(name) is None]
    if missing:
        raise _BadRow(missing)
    shared = _messages(row["prompt"], "prompt") if isinstance(row.get("prompt"), list) else []
    chosen = shared + _messages(row["chosen"], "chosen")
    rejected = shared + _messages(row["rejected"], "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise _BadRow(["chosen and rejected conversations differ before their last message"])
    prompt, chosen_text = _render(tokenizer, chosen, "chosen")
    _, rejected_text = _render(tokenizer, rejected, "rejected")
    _distinct(chosen_text, rejected_text)
    return [PreferenceExample(prompt, chosen_text, rejected_text)]


# --------------------------------------------------------------------------- detection


def _first(rows: Sequence[Mapping], column: str) -> Any:
    return next((r[column] for r in rows if r.get(column) is not None), None)


@dataclass(frozen=True)
class _Shape:
    name: str
    columns: str  # the row as a user would write it, for messages
    matches: Callable[[set[str], Sequence[Mapping]], bool]
    parse: Callable[[Mapping, Any], list]
    needs_template: bool = False


SFT_SHAPES: tuple[_Shape, ...] = (
    _Shape("chat", '{"messages": [{"role", "content"}, ...]}', lambda c, r: "messages" in c, _sft_chat, True),
    _Shape("prompt_response", '{"prompt", "response"}', lambda c, r: {"prompt", "response"} <= c, _sft_response),
    _Shape(
        "prompt_completion", '{"prompt", "completion"}', lambda c, r: {"prompt", "completion"} <= c, _sft_completion
    ),
)

PREFERENCE_SHAPES: tuple[_Shape, ...] = (
    _Shape(
        "rankings",
        '{"prompt", "completions": [str, ...], "ranking": [best index, ..., worst index]}',
        lambda c, r: {"prompt", "completions", "ranking"} <= c,
        _pref_ranking,
    ),
    _Shape(
        "chat_pairs",
        '{"chosen": [messages], "rejected": [messages], optional "prompt": [messages]}',
        lambda c, r: {"chosen", "rejected"} <= c and isinstance(_first(r, "chosen"), list),
        _pref_chat,
        True,
    ),
    _Shape(
        "triples", '{"prompt", "chosen", "rejected"}', lambda c, r: {"prompt", "chosen", "rejected"} <= c, _pref_triple
    ),
    _Shape(
        "hh_transcripts",
        '{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."} (no prompt column)',
        lambda c, r: {"chosen", "rejected"} <= c and "prompt" not in c,
        _pref_hh,
    ),
)

_SHAPES: dict[str, tuple[_Shape, ...]] = {"sft": SFT_SHAPES, "preferences": PREFERENCE_SHAPES}


def _detect(columns: Collection[str], rows: Sequence[Mapping], task: str) -> _Shape | None:
    return next((s for s in _SHAPES[task] if s.matches(set(columns), rows)), None)


def shape_of(columns: Collection[str], rows: Sequence[Mapping], task: Literal["sft", "preferences"]) -> str | None:
    """The name of the row shape these columns (and rows) are read as, or None if none fits."""
    shape = _detect(columns, rows, task)
    return None if shape is None else shape.name


# ------------------------------------------------------------------------------ loaders


def _load(source: str | os.PathLike, split: str, tokenizer: Any, task: str) -> list:
    src = _load_rows(source, split)
    shape = _detect(src.columns, src.rows, task)
    if shape is None:
        accepted = "\n".join(f"  - {s.name}: {s.columns}" for s in _SHAPES[task])
        raise DataError(
            f"{src.label}: no {task} row shape matches the columns {sorted(src.columns)}; "
            f"rename the columns to one of the accepted shapes:\n{accepted}"
        )
    if shape.needs_template:
        _check_template(tokenizer, src.label, shape)
    records, problems = [], {}
    for number, row in zip(src.numbers, src.rows):
        try:
            records += shape.parse(row, tokenizer)
        except _BadRow as bad:
            for kind in bad.problems:
                problems.setdefault(kind, []).append(number)
    if problems:
        raise _bad_rows_error(src, shape, problems)
    logger.info("%s: %d rows read as %s, %d records", src.label, len(src.rows), shape.name, len(records))
    return records


def load_sft(
    source: str | os.PathLike, split: str = "train", chat_template_tokenizer: Any = None
) -> list[SFTExample]:
    """SFT demonstrations from a local .jsonl / .json / .parquet file or a hub data set.

    `chat_template_tokenizer` (a transformers tokenizer with `chat_template`
    set) is needed only for `{"messages": [...]}` rows. Raises DataError on an
    unknown shape, a missing file, or any bad row.
    """
    return _load(source, split, chat_template_tokenizer, "sft")


def load_preferences(
    source: str | os.PathLike, split: str = "train", chat_template_tokenizer: Any = None
) -> list[PreferenceExample]:
    """Preference pairs from a local .jsonl / .json / .parquet file or a hub data set.

    Rankings become weighted pairs (see `expand_ranking`); every other shape
    gives one pair of weight 1 per row. `chat_template_tokenizer` is needed
    only for chat rows. Raises DataError on an unknown shape, a missing file,
    or any bad row.
    """
    return _load(source, split, chat_template_tokenizer, "preferences")

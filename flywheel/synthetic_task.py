"""The synthetic RLHF task: prompts, a hidden "gold" labeller, and its data sets.

This module owns everything Flywheel knows about its default task, so that a
run needs nothing from a hub:

- a fixed vocabulary of plain lowercase English words: 8 topics of 25 words and
  100 neutral filler words (the embedded tokenizer keeps each as one token);
- prompts that name one topic ("Write about animals in a calm way:"), split
  into disjoint train and eval pools;
- `gold_reward`, the preference of a simulated human labeller. It stands beside
  any learned reward model, so a run can always say how good its policy really
  is (and catch a policy that games a learned reward);
- SFT demonstrations and Bradley-Terry preference pairs drawn from that
  labeller, a tokenizer-training corpus, and JSONL writers / a `datasets`
  loader.

All generation is deterministic given a seed and uses its own generator
(`numpy.random.default_rng(seed)`), never a global RNG. Only the standard
library and numpy are imported at module import; `datasets` is imported inside
`load_prompts`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flywheel.task_splits import draw_cycled, split_pool, write_jsonl

# --------------------------------------------------------------------------- vocabulary

TOPICS: dict[str, tuple[str, ...]] = {
    "animals": (
        "cat", "dog", "horse", "cow", "sheep", "goat", "pig", "lion", "tiger", "bear",
        "wolf", "fox", "rabbit", "mouse", "deer", "zebra", "monkey", "eagle", "owl", "duck",
        "frog", "snake", "whale", "shark", "camel",
    ),
    "colours": (
        "red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "grey",
        "silver", "violet", "crimson", "scarlet", "teal", "navy", "beige", "maroon", "amber",
        "ivory", "indigo", "magenta", "turquoise", "cyan", "lavender",
    ),
    "food": (
        "bread", "cheese", "apple", "banana", "rice", "soup", "pasta", "pizza", "cake",
        "cookie", "butter", "egg", "milk", "honey", "salad", "potato", "carrot", "tomato",
        "onion", "garlic", "lemon", "cherry", "grape", "orange", "sugar",
    ),
    "weather": (
        "rain", "snow", "wind", "storm", "cloud", "sun", "fog", "thunder", "lightning",
        "frost", "hail", "ice", "mist", "drizzle", "breeze", "sleet", "humid", "sunny",
        "cloudy", "rainy", "windy", "foggy", "freezing", "warm", "cold",
    ),
    "music": (
        "song", "guitar", "piano", "drum", "violin", "flute", "trumpet", "melody", "rhythm",
        "chord", "note", "singer", "choir", "band", "concert", "opera", "jazz", "blues",
        "harmony", "lyrics", "tempo", "bass", "cello", "harp", "chorus",
    ),
    "sport": (
        "football", "soccer", "tennis", "golf", "hockey", "rugby", "cricket", "baseball",
        "boxing", "swimming", "running", "cycling", "skiing", "surfing", "rowing", "goal",
        "ball", "team", "coach", "player", "referee", "match", "score", "stadium", "medal",
    ),
    "tools": (
        "hammer", "saw", "drill", "wrench", "screwdriver", "pliers", "chisel", "axe",
        "shovel", "rake", "ladder", "tape", "ruler", "knife", "scissors", "clamp", "nail",
        "screw", "bolt", "glue", "brush", "spanner", "toolbox", "sandpaper", "hatchet",
    ),
    "places": (
        "city", "town", "village", "river", "mountain", "forest", "beach", "desert",
        "island", "lake", "valley", "ocean", "park", "market", "harbor", "castle", "bridge",
        "museum", "library", "airport", "station", "garden", "farm", "street", "hospital",
    ),
}

# Prompt styles; they are filler words too, so every word of a prompt is known.
STYLES: tuple[str, ...] = (
    "calm", "simple", "happy", "quiet", "bright", "gentle", "clear", "lively",
    "plain", "friendly", "careful", "soft", "bold", "fresh", "kind", "sweet",
)

# Neutral words: function words, common adjectives, and the words of the
# prompt templates. The labeller tolerates them (small credit), so fluent text
# is not punished, but it prefers words on the prompt's topic.
FILLER_WORDS: tuple[str, ...] = STYLES + (
    "the", "a", "an", "and", "or", "but", "of", "to", "in", "on",
    "at", "with", "for", "from", "by", "as", "is", "are", "was", "were",
    "be", "it", "this", "that", "these", "those", "there", "here", "very", "quite",
    "so", "too", "also", "just", "really", "some", "many", "few", "more", "most",
    "all", "every", "each", "other", "such", "than", "then", "now", "today", "always",
    "often", "never", "again", "about", "over", "under", "after", "before", "into", "out",
    "up", "down", "my", "your", "our", "their", "we", "they", "you", "one",
    "two", "three", "new", "old", "big", "small", "good", "nice",
    "write", "tell", "me", "describe", "list", "talk", "words", "way", "voice", "keep",
    "please", "style",
)  # fmt: skip

# Every template names the topic once; "{style}" keeps the pool large enough
# for disjoint train / eval splits (8 topics x 6 templates x 16 styles = 768).
TEMPLATES: tuple[str, ...] = (
    "Write about {topic} in a {style} way:",
    "Tell me about {topic}. Keep it {style}:",
    "Describe {topic} in a {style} voice:",
    "Some {style} words about {topic}:",
    "List {topic} words, {style} please:",
    "Talk about {topic}, {style} style:",
)

# ------------------------------------------------------------------- the gold labeller

TARGET_MIN_WORDS = 8  # fewer words than this cannot earn full credit
TARGET_MAX_WORDS = 16  # more words than this are mildly penalised
FILLER_CREDIT = 0.2  # credit of a neutral word, relative to an on-topic word
LONG_PENALTY = 0.25  # largest fraction of the score lost to excess length

TOPIC_NAMES: tuple[str, ...] = tuple(TOPICS)
_WORD_TOPIC: dict[str, str] = {w: t for t, words in TOPICS.items() for w in words}
_NEUTRAL: frozenset[str] = frozenset(FILLER_WORDS) | frozenset(TOPIC_NAMES)
_WORD_RE = re.compile(r"[a-z]+")


def _check_vocabulary() -> None:
    # Overlaps would make the labeller ambiguous; fail at import, not mid-run.
    topic_words = [w for words in TOPICS.values() for w in words]
    dup = {w for w in topic_words if topic_words.count(w) > 1}
    clash = (set(topic_words) & _NEUTRAL) | dup
    if clash or len(set(FILLER_WORDS)) != len(FILLER_WORDS):
        raise AssertionError(f"synthetic_task vocabulary overlaps: {sorted(clash)}")


_check_vocabulary()


def all_task_words() -> list[str]:
    """Every word the task uses (topic words, topic names, filler), sorted."""
    return sorted(set(_WORD_TOPIC) | _NEUTRAL)


def completion_words(text: str | bytes) -> list[str]:
    """The words the labeller reads: lowercase ASCII letter runs; the rest is ignored."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return _WORD_RE.findall(str(text).lower())


def prompt_topic(prompt: str | bytes) -> str | None:
    """The first topic name in the prompt, or None if it names none."""
    for word in completion_words(prompt):
        if word in TOPICS:
            return word
    return None


def gold_reward(prompt: str | bytes, completion: str | bytes) -> float:
    """Score of the simulated labeller, in [0, 1]; total on any input.

    With the completion's words w_1..w_n (lowercase letter runs) and T the
    topic named in the prompt:

        credit(w_i) = base(w_i) / k_i,  k_i = occurrences of w_i among w_1..w_i
        base(w)     = 1 if w is a word of T, 0.2 if w is a filler word or a
                      topic name, 0 otherwise (other topics, unknown words)
        relevance   = sum_i credit(w_i) / max(n, 8)
        length      = 1 - 0.25 * min(1, max(0, n - 16) / 16)
        gold        = relevance * length

    So the best completion is 8-16 distinct words of the prompt's topic
    (gold = 1); repeating one word earns 1, 1/2, 1/3, ... (collapse is not
    optimal); fewer than 8 words cannot reach 1; 24 words lose 12.5%.
    An empty completion, or a prompt naming no topic, scores at most 0.2.
    """
    words = completion_words(completion)
    n = len(words)
    if n == 0:
        return 0.0
    topic = prompt_topic(prompt)
    seen: dict[str, int] = {}
    credit = 0.0
    for w in words:
        k = seen.get(w, 0) + 1
        seen[w] = k
        if topic is not None and _WORD_TOPIC.get(w) == topic:
            base = 1.0
        elif w in _NEUTRAL:
            base = FILLER_CREDIT
        else:
            base = 0.0
        credit += base / k
    relevance = credit / max(n, TARGET_MIN_WORDS)
    excess = max(0, n - TARGET_MAX_WORDS) / TARGET_MAX_WORDS
    return relevance * (1.0 - LONG_PENALTY * min(1.0, excess))


def gold_rewards(prompts: list[str], completions: list[str]) -> np.ndarray:
    """`gold_reward` of each pair, as float32 (B,)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return np.array([gold_reward(p, c) for p, c in zip(prompts, completions)], np.float32)


# ---------------------------------------------------------------------------- prompts

def all_prompts() -> list[str]:
    """Every prompt of the task (both splits), in a fixed order."""
    return [
        t.format(topic=topic, style=style)
        for topic in TOPIC_NAMES
        for t in TEMPLATES
        for style in STYLES
    ]


def prompt_pool(split: str) -> list[str]:
    """All prompts of one split ("train" or "eval"); the two pools are disjoint."""
    return split_pool(all_prompts(), split)


def make_prompts(n: int, seed: int, split: str = "train") -> list[str]:
    """n prompts of one split: the pool shuffled by `seed`, cycled if n exceeds it."""
    return draw_cycled(prompt_pool(split), n, seed)


# ------------------------------------------------------------------ demonstrations / pairs


@dataclass
class Demonstration:
    """A prompt and a completion the labeller likes, for SFT."""

    prompt: str
    completion: str  # starts with a space: it continues the prompt text
    gold: float  # gold_reward(prompt, completion)


@dataclass
class PreferencePair:
    """Two completions of one prompt, ordered by a (noisy) labeller's choice."""

    prompt: str
    chosen: str
    rejected: str
    gold_chosen: float
    gold_rejected: float  # may exceed gold_chosen: the labeller is Bradley-Terry noisy


def _join(words: list[str]) -> str:
    return " " + " ".join(words)


def _good_completion(rng: np.random.Generator, topic: str) -> str:
    """8-16 distinct on-topic words, with at most two filler connectives."""
    n = int(rng.integers(TARGET_MIN_WORDS, TARGET_MAX_WORDS + 1))
    n_filler = int(rng.integers(0, 3))
    words = [TOPICS[topic][i] for i in rng.choice(len(TOPICS[topic]), n - n_filler, replace=False)]
    for f in rng.choice(len(FILLER_WORDS), n_filler, replace=False):
        words.insert(int(rng.integers(1, len(words))), FILLER_WORDS[f])
    return _join(words)


def make_sft_demonstrations(n: int, seed: int) -> list[Demonstration]:
    """n demonstrations on train-split prompts (gold about 0.9 to 1)."""
    rng = np.random.default_rng(seed)
    prompts = make_prompts(n, seed, "train")
    out = []
    for prompt in prompts:
        completion = _good_completion(rng, prompt_topic(prompt) or TOPIC_NAMES[0])
        out.append(Demonstration(prompt, completion, gold_reward(prompt, completion)))
    return out


def _garbage_word(rng: np.random.Generator) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(letters[i] for i in rng.integers(0, 26, int(rng.integers(2, 7))))


def _varied_completion(rng: np.random.Generator, topic: str) -> str:
    """A completion of random quality: each word is on-topic with probability q."""
    quality = rng.random()
    n = int(rng.integers(2, 25))
    others = [w for t, ws in TOPICS.items() if t != topic for w in ws]
    words = []
    for _ in range(n):
        u = rng.random()
        if u < quality:  # with replacement, so repeats occur and cost credit
            words.append(TOPICS[topic][int(rng.integers(len(TOPICS[topic])))])
        elif u < quality + 0.4 * (1 - quality):
            words.append(FILLER_WORDS[int(rng.integers(len(FILLER_WORDS)))])
        elif u < quality + 0.8 * (1 - quality):
            words.append(others[int(rng.integers(len(others)))])
        else:
            words.append(_garbage_word(rng))
    return _join(words)


def _sigmoid(x: float) -> float:
    # The two branches never exponentiate a large positive number (no overflow at large beta).
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def make_preference_pairs(n: int, seed: int, beta: float = 10.0) -> list[PreferencePair]:
    """n pairs on train-split prompts, labelled by Bradley-Terry on the gold reward.

    P(a preferred over b) = sigmoid(beta * (gold(a) - gold(b))): with beta = 10
    a gold gap of 0.1 is chosen right 73% of the time, a gap of 0.3 95%.
    """
    rng = np.random.default_rng(seed)
    out = []
    for prompt in make_prompts(n, seed, "train"):
        topic = prompt_topic(prompt) or TOPIC_NAMES[0]
        a, b = _varied_completion(rng, topic), _varied_completion(rng, topic)
        ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
        p_a = _sigmoid(beta * (ga - gb))
        if rng.random() < p_a:
            out.append(PreferencePair(prompt, a, b, ga, gb))
        else:
            out.append(PreferencePair(prompt, b, a, gb, ga))
    return out


# ------------------------------------------------------------------------- corpus / files


def corpus_lines(seed: int) -> list[str]:
    """Text to train the tokenizer on: every prompt, demonstrations, word sequences.

    Each task word appears at least 60 times with a leading space (how it
    appears in completions), so byte-level BPE keeps it whole.
    """
    rng = np.random.default_rng(seed)
    lines = all_prompts()
    lines += [d.prompt + d.completion for d in make_sft_demonstrations(1000, seed)]
    words = all_task_words()
    for _ in range(60):  # each pass holds every word once, in a random order
        order = [words[i] for i in rng.permutation(len(words))]
        lines += [_join(order[i : i + 12]) for i in range(0, len(order), 12)]
    return lines


DEFAULT_SIZES: dict[str, int] = {
    "prompts_train": 4096,
    "prompts_eval": 256,
    "sft": 2048,
    "preferences": 4096,
}


def write_datasets(
    out_dir: str | os.PathLike, seed: int, sizes: dict[str, int] | None = None
) -> dict[str, Path]:
    """Write the named data sets as .jsonl files; return their paths.

    `sizes` names the sets to write and their row counts (default: all of
    DEFAULT_SIZES). Prompt rows are {"prompt", "topic"}.
    """
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown data set names {sorted(unknown)}; valid: {sorted(DEFAULT_SIZES)}")
    makers = {
        "prompts_train": lambda n: [{"prompt": p, "topic": prompt_topic(p)} for p in make_prompts(n, seed, "train")],
        "prompts_eval": lambda n: [{"prompt": p, "topic": prompt_topic(p)} for p in make_prompts(n, seed, "eval")],
        "sft": lambda n: [asdict(d) for d in make_sft_demonstrations(n, seed)],
        "preferences": lambda n: [asdict(p) for p in make_preference_pairs(n, seed)],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, n in sizes.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], makers[name](n))
    return paths


def load_prompts(path_or_name: str | os.PathLike, split: str = "train", column: str = "prompt") -> list[str]:
    """Load prompts through `datasets`.

    An existing local path is read as JSON lines: a directory written by
    `write_datasets` (its prompts_<split>.jsonl), or a .jsonl file itself.
    Anything else is taken as a Hugging Face hub data set name and `split`.
    """
    import datasets  # heavy (pyarrow, pandas); only the data path needs it

    path = Path(path_or_name)
    if path.is_dir():
        path = path / f"prompts_{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: write it with flywheel.synthetic_task.write_datasets({path.parent!s}, seed)"
            )
    if path.is_file():
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        ds = datasets.load_dataset(str(path_or_name), split=split)
    if column not in ds.column_names:
        raise KeyError(f"{path_or_name}: no column {column!r}; columns are {ds.column_names}")
    return [str(x) for x in ds[column]]

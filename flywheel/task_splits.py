"""What every embedded task shares: the held-out split, seeded prompt draws and
atomic JSONL files. Standard library and numpy only.

A prompt belongs to the eval split when a stable hash of its text says so (not
Python's salted hash, not the seed), so it lands in the same split in every
process and for every seed, and train and eval never overlap.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

EVAL_ONE_IN = 5  # about one prompt in five is held out for evaluation


def is_eval(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:8], "little") % EVAL_ONE_IN == 0


def split_pool(prompts: list[str], split: str) -> list[str]:
    """The prompts of one split ("train" or "eval"), in their given order; the two are disjoint."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    want_eval = split == "eval"
    return [p for p in prompts if is_eval(p) == want_eval]


def draw_cycled(pool: list[str], n: int, seed: int) -> list[str]:
    """n prompts: the pool shuffled by `seed`, reshuffled and cycled if n exceeds it."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        out.extend(pool[i] for i in rng.permutation(len(pool)))
    return out[:n]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written to a temporary file and renamed into place."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file

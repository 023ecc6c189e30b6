"""Sampling seeds: one per (run seed, stream, step, prompt, sample), none shared.

vLLM draws each request's samples from a generator seeded by the request's
seed, so two requests with the same seed (or with seeds that vLLM offsets per
sample) produce the same tokens. The seeds here come from SplitMix64 over
distinct counters: within one call every seed differs (the mix is a
bijection of 63-bit integers), and across calls the counters start at a
SHA-256 of (stream, run seed, step), so a collision is a 2^-60-scale accident.
They do not depend on how prompts are split over rollout actors, so a run
samples the same tokens with one actor or four. Standard library and numpy only.
"""

from __future__ import annotations

import hashlib

import numpy as np

_MASK = np.uint64(2**63 - 1)


def _mix63(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea and Flood, 2014) done modulo 2^63, elementwise.

    Adding a constant, x ^ (x >> k) and multiplying by an odd constant are each
    bijections of [0, 2^63), so distinct inputs give distinct outputs.
    """
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return z ^ (z >> np.uint64(31))


def sample_seeds(run_seed: int, step: int, num_prompts: int, samples: int, stream: str = "train") -> np.ndarray:
    """(num_prompts, samples) int64 seeds in [0, 2^63) for one generate call.

    `stream` separates independent uses (training steps, evaluation) that may
    share a step number.
    """
    key = hashlib.sha256(f"{stream}:{run_seed}:{step}".encode()).digest()
    base = np.frombuffer(key[:8], dtype=np.uint64)[0]
    with np.errstate(over="ignore"):
        counters = (base + np.arange(num_prompts * samples, dtype=np.uint64)) & _MASK
    return _mix63(counters).astype(np.int64).reshape(num_prompts, samples)

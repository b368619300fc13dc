"""Next-token choice: greedy (temperature 0) or temperature + top-p (nucleus) sampling.

Sampling draws from a numpy Generator seeded with `seed`, so a seed gives the same tokens every run.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.errors import InputError


def check_sampling(temperature: float, top_p: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise InputError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if math.isinf(temperature):
        raise InputError("temperature must be finite")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """`probs` with everything outside the top-p nucleus zeroed and the rest renormalised.

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p (at least one
    token; ties broken towards the lower id)."""
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    n = min(int(np.searchsorted(cum, top_p * cum[-1])) + 1, probs.size)
    out = np.zeros_like(probs)
    out[order[:n]] = probs[order[:n]]
    return out / out.sum()


class Sampler:
    """Picks a token id from one row of logits (vocab,)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        check_sampling(temperature, top_p)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)  # (V,)
        if self.greedy:
            return int(np.argmax(logits))  # first maximum on ties
        z = logits / self.temperature
        z = z - z.max()
        probs = np.exp(z)
        probs /= probs.sum()
        if self.top_p < 1.0:
            probs = nucleus(probs, self.top_p)
        cum = np.cumsum(probs)
        return int(min(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"), probs.size - 1))

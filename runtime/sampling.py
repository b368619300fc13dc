"""Next-token choice: greedy (temperature 0) or temperature + top-p (nucleus) sampling, and the
checks of the numeric generation arguments (which accept Python and numpy scalars alike).

Sampling draws from a numpy Generator seeded with `seed`, so a seed gives the same tokens every run.
"""

from __future__ import annotations

import math
import numbers
import operator
import reprlib
from collections.abc import Callable

import numpy as np

from runtime.errors import InputError

MAX_SEED = 2**63 - 1  # seeds are integers in [0, MAX_SEED]: non-negative int64


def describe(value) -> str:
    """A short one-line description of a bad argument, for error messages: `'0.5' (str)`."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {list(value.shape)} ({value.dtype})"
    if isinstance(value, int) and value.bit_length() > 256:  # repr() refuses ints over 4300 digits
        sign = "a negative" if value < 0 else "an"
        return f"{sign} integer of about {math.ceil(value.bit_length() * math.log10(2))} digits"
    text = reprlib.repr(value).replace("\n", " ")  # bounded length, one line
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return text
    return f"{text} ({type(value).__name__})"


def as_real(value, name: str, rule: str, ok: Callable[[float], bool]) -> float:
    """`value` (a Python or numpy real number, not a bool) as a float, when ok(float) holds;
    otherwise InputError "`name` must be `rule`, got ...". NaN reaches ok(), which should refuse it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be {rule}, got {describe(value)}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float range
        raise InputError(f"{name} must be {rule}, got {describe(value)}") from None
    if not ok(v):
        raise InputError(f"{name} must be {rule}, got {v!r}")
    return v


def as_int(value, name: str, rule: str, ok: Callable[[int], bool]) -> int:
    """`value` (a Python or numpy integer, not a bool; no float, even 3.0) as an int, when ok(int)
    holds; otherwise InputError "`name` must be `rule`, got ..."."""
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be {rule}, got {describe(value)}")
    try:
        v = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be {rule}, got {describe(value)}") from None
    if not ok(v):
        raise InputError(f"{name} must be {rule}, got {describe(v)}")
    return v


def check_keep_ratio(value) -> float:
    return as_real(value, "keep ratio", "in (0, 1] (1.0 keeps every vision token)", lambda v: 0.0 < v <= 1.0)


def check_keep_tokens(value) -> int:
    return as_int(value, "keep_tokens", "an integer >= 0 (vision tokens to keep)", lambda v: 0 <= v < 2**31)


def check_max_new_tokens(value) -> int:
    return as_int(value, "max_new_tokens", "an integer >= 0", lambda v: v >= 0)


def check_temperature(value) -> float:
    return as_real(value, "temperature", "a finite number >= 0 (0 = greedy)", lambda v: 0.0 <= v < math.inf)


def check_top_p(value) -> float:
    return as_real(value, "top_p", "in (0, 1]", lambda v: 0.0 < v <= 1.0)


def check_seed(seed) -> int | None:
    """None (fresh entropy from the OS) or an integer in [0, 2**63 - 1]. Negative seeds are refused,
    not mapped: numpy's generators take none, and folding them (-1 -> 2**64 - 1) would give one
    stream two spellings."""
    if seed is None:
        return None
    return as_int(seed, "seed", "an integer in [0, 2**63 - 1] (or None)", lambda v: 0 <= v <= MAX_SEED)


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
        """InputError for a bad argument (see check_temperature, check_top_p, check_seed)."""
        self.temperature = check_temperature(temperature)
        self.top_p = check_top_p(top_p)
        self.rng = np.random.default_rng(check_seed(seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)  # (V,)
        if self.greedy:
            return int(np.argmax(logits))  # first maximum on ties
        # Shift before dividing: a tiny temperature (1e-300) sends the others to -inf, never to NaN.
        with np.errstate(over="ignore"):
            z = (logits - logits.max()) / self.temperature  # (V,), max 0
        probs = np.exp(z)
        probs /= probs.sum()
        if self.top_p < 1.0:
            probs = nucleus(probs, self.top_p)
        cum = np.cumsum(probs)
        return int(min(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"), probs.size - 1))

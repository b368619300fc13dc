"""DART's counts and configuration: the single source of truth for how many tokens are kept.

Standard library only: the torch-free runtime imports this module on a Jetson.

Vocabulary (see ../shared/DESIGN.md, "DART in one paragraph"):
    S  sequence length of the prompt (text + vision tokens)
    a  span_start, index of the first vision token
    L  span_len, number of vision tokens, [a, a + L)
    T  quota, vision tokens harvested per pivot
    P  pivots_image + pivots_text

Kept vision tokens = P_img + P * T, kept sequence S' = S - L + P_img + P * T.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

# The ONNX custom op that carries DART inside exported graphs.
OP_DOMAIN = "dart"
OP_NAME = "DartPrune"
OP_VERSION = 1

# TensorRT's TopK takes a constant K of at most 3840; DartPrune pads its per-token score vectors
# to this length, so a vision span may hold at most this many tokens.
MAX_SPAN = 3840
# DartPrune's function body unrolls this many pivot steps: pivots_image + pivots_text <= MAX_PIVOTS.
MAX_PIVOTS = 16

PIVOT_ORDERS = ("canonical", "cpython")


@dataclass(frozen=True)
class Counts:
    """Effective counts for one prompt, after the degenerate cases are resolved.

    `prune` is False when nothing would be removed (no image, span too short, budget covering the
    span); then every token is kept and the other fields say so.
    """

    span_len: int
    text_after: int
    pivots_image: int  # image pivots actually used (<= configured)
    pivots_text: int  # text pivots actually used (<= configured)
    quota: int  # T actually used
    kept_vision: int

    @property
    def prune(self) -> bool:
        return self.kept_vision < self.span_len

    def kept_len(self, seq_len: int) -> int:
        """S' for a prompt of `seq_len` tokens."""
        return seq_len - self.span_len + self.kept_vision


def _no_pruning(span_len: int, text_after: int) -> Counts:
    return Counts(span_len, text_after, 0, 0, 0, span_len)


def effective_counts(
    span_len: int, text_after: int, quota: int, pivots_image: int = 4, pivots_text: int = 4
) -> Counts:
    """Resolve the pivots and quota actually used for a span of `span_len` vision tokens followed
    by `text_after` text tokens, given a requested quota T.

    Degenerate inputs prune less or not at all, never fail:
      - span_len == 0 (no image): nothing to prune;
      - fewer vision tokens than image pivots: they are all pivots, nothing pruned;
      - fewer text tokens after the span than text pivots: use the ones there are;
      - no pivot at all: nothing pruned;
      - a quota larger than the free tokens allow: T is clamped so that P * T <= L - P_img.
    DartPrune (ONNX) and the PyTorch reference both follow exactly these rules.
    """
    for name, value in (("span_len", span_len), ("text_after", text_after), ("quota", quota)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if pivots_image < 0 or pivots_text < 0:
        raise ValueError(f"pivot counts must be >= 0, got {pivots_image}+{pivots_text}")
    if span_len == 0:
        return _no_pruning(span_len, text_after)
    p_img = min(pivots_image, span_len)
    p_txt = min(pivots_text, text_after)
    p = p_img + p_txt
    if p == 0:
        return _no_pruning(span_len, text_after)
    t = min(quota, (span_len - p_img) // p)
    if p_img + p * t == span_len:  # the whole span survives: same as not pruning
        return _no_pruning(span_len, text_after)
    return Counts(span_len, text_after, p_img, p_txt, t, p_img + p * t)


def decoder_span(seq_len: int, span_start: int, span_len: int) -> int:
    """The span length the decoder prunes: span_len clamped so the prompt's last token stays out of
    it (it predicts the next token, so it is never pruned) and at 0 from below."""
    return max(min(span_len, seq_len - 1 - span_start), 0)


def kept_len(seq_len: int, span_start: int, span_len: int, quota: int, pivots_image: int = 4,
             pivots_text: int = 4) -> int:
    """S' for a prompt of `seq_len` tokens with the span [span_start, span_start + span_len) and
    quota T (a negative quota counts as 0, as in the op): the length of DartPruneSlots' kept_slots
    input (dart_ops/onnx_op_slots.py; the decoder's, with decoder_span's span)."""
    c = effective_counts(span_len, seq_len - span_start - span_len, max(int(quota), 0), pivots_image, pivots_text)
    return c.kept_len(seq_len)


@dataclass(frozen=True)
class DartConfig:
    """How DART prunes: at the input of decoder layer `layer` (K), with these pivots and budget.

    Exactly one of `keep_ratio` (fraction of vision tokens, in (0, 1]) and `budget` (absolute
    number of harvested tokens) sets how much is kept; a ratio of 1.0 means no pruning.
    Pivots are visited in canonical order (image pivots by descending score, then text pivots),
    as the graphs do; the reference's `select_keep(order="cpython")` reproduces the original code's
    Python-set order for the golden checks.
    """

    layer: int = 2
    pivots_image: int = 4
    pivots_text: int = 4
    keep_ratio: float | None = 0.111
    budget: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            # K = 0 would need layer -1's keys; DART scores with layer K-1's states.
            raise ValueError(f"layer (K) must be an integer >= 1, got {self.layer!r}")
        for name in ("pivots_image", "pivots_text"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.pivots_image + self.pivots_text == 0:
            raise ValueError("at least one pivot is needed (pivots_image + pivots_text >= 1)")
        if self.pivots_image + self.pivots_text > MAX_PIVOTS:
            raise ValueError(
                f"pivots_image + pivots_text must be <= {MAX_PIVOTS} (steps unrolled in DartPrune), "
                f"got {self.pivots_image}+{self.pivots_text}"
            )
        if (self.keep_ratio is None) == (self.budget is None):
            raise ValueError("give exactly one of keep_ratio and budget")
        if self.keep_ratio is not None:
            r = self.keep_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or math.isnan(r):
                raise ValueError(f"keep_ratio must be a number in (0, 1], got {r!r}")
            if not 0.0 < r <= 1.0:
                raise ValueError(f"keep_ratio must be in (0, 1], got {r}")
        if self.budget is not None:
            b = self.budget
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ValueError(f"budget must be an integer >= 0, got {b!r}")

    @property
    def pivots(self) -> int:
        return self.pivots_image + self.pivots_text

    def with_ratio(self, keep_ratio: float) -> DartConfig:
        """The same layer and pivots with another keep ratio (validated like the constructor)."""
        return dataclasses.replace(self, keep_ratio=keep_ratio, budget=None)

    def budget_for(self, span_len: int) -> int:
        """Harvest budget for `span_len` vision tokens: round(ratio * L) (halves up) or `budget`."""
        if self.budget is not None:
            return self.budget
        return int(math.floor(self.keep_ratio * span_len + 0.5))

    def counts(self, span_len: int, text_after: int) -> Counts:
        """What this config keeps of a prompt with `span_len` vision tokens and `text_after` text
        tokens after them. A budget that covers the whole span means no pruning at all."""
        if span_len < 0 or text_after < 0:
            raise ValueError(f"span_len and text_after must be >= 0, got {span_len}, {text_after}")
        budget = self.budget_for(span_len)
        if budget >= span_len:
            return _no_pruning(span_len, text_after)
        # T = budget // P with the configured P; effective_counts clamps it to what the span holds.
        quota = budget // self.pivots
        return effective_counts(span_len, text_after, quota, self.pivots_image, self.pivots_text)

    def describe(self, span_len: int, text_after: int) -> str:
        c = self.counts(span_len, text_after)
        if not c.prune:
            return f"keep all {span_len} vision tokens (no pruning)"
        return f"keep {c.kept_vision} of {span_len} vision tokens (T={c.quota})"


# --- CPython set iteration order (for order="cpython") -------------------------------------------
# The original DART code visits its pivots in `list(set(image_pivots + text_pivots))` order. We
# reproduce that order by simulating CPython's set table (Objects/setobject.c, 3.10-3.13): hash(i)
# == i for small non-negative ints, linear probing of 9 slots then perturbed probing, table grown
# to 4 x used when fill * 5 >= mask * 3, starting from 8 slots. Tested against real sets.

_SET_MINSIZE = 8
_LINEAR_PROBES = 9
_PERTURB_SHIFT = 5


def _probe(table: list, mask: int, key: int) -> int:
    """Slot where `key` is, or the empty slot where CPython would insert it."""
    perturb = key
    i = key & mask
    while True:
        probes = _LINEAR_PROBES if i + _LINEAR_PROBES <= mask else 0
        for j in range(i, i + probes + 1):
            if table[j] is None or table[j] == key:
                return j
        perturb >>= _PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask


def cpython_set_order(values: Sequence[int]) -> list[int]:
    """The order of `list(set(values))` on CPython for non-negative ints below 2**61 - 1."""
    table: list = [None] * _SET_MINSIZE
    fill = 0
    for v in values:
        v = int(v)
        if not 0 <= v < (1 << 61) - 1:
            raise ValueError(f"cpython_set_order handles non-negative ints below 2**61-1, got {v}")
        mask = len(table) - 1
        slot = _probe(table, mask, v)
        if table[slot] == v:
            continue
        table[slot] = v
        fill += 1
        if fill * 5 >= mask * 3:
            minused = fill * 2 if fill > 50000 else fill * 4
            size = _SET_MINSIZE
            while size <= minused:
                size <<= 1
            old, table = table, [None] * size
            for key in old:
                if key is not None:
                    table[_probe(table, size - 1, key)] = key
    return [k for k in table if k is not None]


# --- the vision span of a prompt -----------------------------------------------------------------


def find_span(ids: Sequence[int], token_id: int) -> tuple[int, int]:
    """(start, length) of the run of `token_id` in `ids`; (0, 0) when there is none.

    The one rule for where DART's vision span is (the eager baseline and the runtime both use it):
    the image tokens must form one contiguous run (one image per prompt), else ValueError.
    `ids` may be any sequence of ints (a list, a numpy array's rows flattened by iteration).
    """
    where = [i for i, t in enumerate(ids) if int(t) == token_id]
    if not where:
        return 0, 0
    start, length = where[0], len(where)
    if where[-1] - start + 1 != length:
        raise ValueError(f"the prompt's {length} image tokens (id {token_id}) are not one contiguous "
                         "run; give one image with one image token")
    return start, length

"""The readable PyTorch reference of DART's token selection. Every faster form (the DartPrune ONNX
function, engines) is checked against this, and this is checked against the original authors'
code through ../shared/golden/.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dart_ops.spec import PIVOT_ORDERS, cpython_set_order, effective_counts


def pivot_scores(keys: torch.Tensor) -> torch.Tensor:
    """(..., S, F) keys -> (..., S) fp32 pivot scores: the L1 norm of each token's keys."""
    return keys.float().abs().sum(-1)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, largest first; ties go to the lower index."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def _select_one(
    hidden: torch.Tensor,  # (S, D)
    keys: torch.Tensor,  # (S, F)
    a: int,
    L: int,
    quota: int,
    pivots_image: int,
    pivots_text: int,
    order: str,
) -> torch.Tensor:
    S = hidden.shape[0]
    c = effective_counts(L, S - a - L, quota, pivots_image, pivots_text)
    if not c.prune:
        return torch.arange(S, device=hidden.device)

    scores = pivot_scores(keys)  # (S,)
    image_pivots = (_top(scores[a : a + L], c.pivots_image) + a).tolist()
    text_pivots = (_top(scores[a + L :], c.pivots_text) + a + L).tolist()
    pivots = image_pivots + text_pivots  # canonical: image by score, then text by score
    if order == "cpython":
        pivots = cpython_set_order(pivots)

    h = hidden.float()
    span = h[a : a + L]  # (L, D)
    free = torch.ones(L, dtype=torch.bool, device=h.device)
    free[torch.tensor(image_pivots, device=h.device) - a] = False
    keep = torch.ones(S, dtype=torch.bool, device=h.device)
    keep[a : a + L] = ~free  # image pivots
    for p in pivots:
        dup = F.cosine_similarity(h[p].unsqueeze(0), span, dim=-1)  # (L,)
        least = (-dup).masked_fill(~free, float("-inf"))
        taken = _top(least, c.quota)  # the T free tokens least duplicated with pivot p
        free[taken] = False
        keep[taken + a] = True
    return keep.nonzero().squeeze(1)


def select_keep(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    span_start: int,
    span_len: int,
    quota: int,
    *,
    pivots_image: int = 4,
    pivots_text: int = 4,
    order: str = "canonical",
) -> torch.LongTensor:
    """Indices of the tokens DART keeps, ascending.

    hidden: (S, D) or (B, S, D), layer K-1's output passed through the model's final RMSNorm.
    keys:   (S, F) or (B, S, F), layer K-1's post-RoPE keys, KV heads concatenated.
    The vision span is [span_start, span_start + span_len); `quota` is T, tokens per pivot.
    Scores and cosines are computed in fp32; ties go to the lower index. Degenerate inputs prune
    less or nothing (see dart_ops.spec.effective_counts). Returns (S',) or (B, S') int64.
    """
    if order not in PIVOT_ORDERS:
        raise ValueError(f"order must be one of {PIVOT_ORDERS}, got {order!r}")
    if hidden.dim() not in (2, 3) or keys.dim() != hidden.dim():
        raise ValueError(
            f"hidden and keys must both be (S, D) or (B, S, D), got {tuple(hidden.shape)} "
            f"and {tuple(keys.shape)}"
        )
    if hidden.shape[:-1] != keys.shape[:-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and keys {tuple(keys.shape)} differ in batch or length"
        )
    a, L, T = int(span_start), int(span_len), int(quota)
    S = hidden.shape[-2]
    if a < 0 or L < 0 or a + L > S:
        raise ValueError(f"vision span [{a}, {a + L}) does not fit in a sequence of {S} tokens")
    if T < 0:
        raise ValueError(f"quota must be >= 0, got {T}")
    args = (a, L, T, pivots_image, pivots_text, order)
    if hidden.dim() == 2:
        return _select_one(hidden, keys, *args)
    return torch.stack([_select_one(h, k, *args) for h, k in zip(hidden, keys)])

"""Qwen2-VL / Qwen2.5-VL vision-graph inputs from the image grid, in numpy (no torch).

The vision graph runs one still image per call (t = 1). Everything data-dependent that transformers
derives from `grid_thw` (transformers/vision_utils.py, 5.24) is computed here instead, so the graph
has no Python loop over window lengths and no argsort (a TopK with a data-dependent K for TensorRT):

    vision_position_ids  [N, 2]    int32  (row, col) of each patch, merge-block-major (both kinds)
    window_index         [M]       int32  merge units in window order (Qwen2.5-VL)
    reverse_index        [M]       int32  argsort(window_index): un-permutes the merger output
    win_gather           [Wn, P]   int32  permuted-patch index of each window slot (0 in padding)
    win_valid            [Wn, P]   bool   slot holds a patch (a key mask for window attention)
    win_unpad            [N]       int32  slot of each permuted patch in the flattened [Wn * P] layout

N = gh * gw patches, M = N / merge**2 merge units (the image's LLM tokens), Wn windows, P patches
in a full window ((window_size // patch) ** 2 = 64 for Qwen2.5-VL's 112 px windows).

The index tables are int32, the dtype the graph's Gathers take without a cast in TensorRT 10.3
(docs/TENSORRT_10.3.md sections 3 and 7). Every value fits trivially: positions and window_index
lie below N <= MAX_PATCHES (2^26, the runtime's MAX_IMAGE_PIXELS: a patch is at least one pixel),
win_gather below N, win_unpad below Wn * P (checked against the int32 range; the padded tables are
computed in int64 and cast once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import InputError
from runtime.preprocess import MAX_IMAGE_PIXELS

__all__ = ["KINDS", "MAX_PATCHES", "QwenVisionConfig", "padded_windows", "vision_inputs", "vision_position_ids",
           "window_layout"]

KINDS = ("qwen2_vl", "qwen2_5_vl")
MAX_PATCHES = MAX_IMAGE_PIXELS  # no image the runtime accepts gives more patches than pixels
INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class QwenVisionConfig:
    """What the vision inputs depend on (the family stores it in the manifest)."""

    kind: str  # "qwen2_vl" | "qwen2_5_vl"
    patch: int = 14  # patch side in px
    merge: int = 2  # spatial merge size: merge x merge patches -> one LLM token
    temporal: int = 2  # temporal patch size (a still image is repeated this many times)
    channels: int = 3
    window_size: int = 112  # window side in px (qwen2_5_vl only)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown Qwen vision kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "qwen2_5_vl" and self.window_size % (self.merge * self.patch):
            raise ValueError(f"window_size {self.window_size} is not a multiple of merge * patch "
                             f"= {self.merge * self.patch}")

    @property
    def patch_dim(self) -> int:
        """Width of one pixel_values row: channels * temporal * patch * patch (1176)."""
        return self.channels * self.temporal * self.patch * self.patch

    @property
    def window_units(self) -> int:
        """Merge units along a window side (HF's vit_merger_window_size: 112 // 2 // 14 = 4)."""
        return self.window_size // self.merge // self.patch

    @property
    def window_patches(self) -> int:
        """Patches in a full window: (window_units * merge) ** 2 = 64."""
        return (self.window_units * self.merge) ** 2


def _check_grid(gh: int, gw: int, merge: int) -> None:
    if gh <= 0 or gw <= 0 or gh % merge or gw % merge:
        raise InputError(f"image grid {gh}x{gw} patches: each side must be a positive multiple of the "
                         f"merge size {merge}; resize the image with the family's smart_resize")
    if gh * gw > MAX_PATCHES:
        raise InputError(f"image grid {gh}x{gw} patches: more than MAX_PATCHES = {MAX_PATCHES}; "
                         "resize the image with the family's smart_resize")


def vision_position_ids(gh: int, gw: int, merge: int) -> np.ndarray:
    """(row, col) of every patch in merge-block-major order: [gh * gw, 2] int32
    (transformers' get_vision_position_ids for grid (1, gh, gw))."""
    _check_grid(gh, gw, merge)
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.int32), np.arange(gw, dtype=np.int32), indexing="ij")
    block = (gh // merge, merge, gw // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)  # (gh/m, gw/m, m, m) flattened
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=-1)  # (N, 2)


def window_layout(gh: int, gw: int, cfg: QwenVisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Port of transformers' get_vision_window_index for grid (1, gh, gw): window_index [M] int32
    (merge units, window by window, row-major inside a window) and cu_window_seqlens [Wn + 1] int32
    (window boundaries in patches, empty windows dropped as HF's unique_consecutive does)."""
    _check_grid(gh, gw, cfg.merge)
    ws = cfg.window_units
    lh, lw = gh // cfg.merge, gw // cfg.merge
    index = np.arange(lh * lw, dtype=np.int32).reshape(lh, lw)
    pad_h, pad_w = ws - lh % ws, ws - lw % ws  # as HF: a whole empty window row/col when divisible
    nh, nw = (lh + pad_h) // ws, (lw + pad_w) // ws
    padded = np.pad(index, ((0, pad_h), (0, pad_w)), constant_values=-100)
    padded = padded.reshape(nh, ws, nw, ws).transpose(0, 2, 1, 3).reshape(nh * nw, ws, ws)
    seqlens = (padded != -100).sum(axis=(1, 2))  # (nh * nw,) merge units per window
    flat = padded.reshape(-1)
    window_index = flat[flat != -100]  # (M,)
    cu = np.concatenate([[0], np.cumsum(seqlens) * cfg.merge ** 2]).astype(np.int32)
    cu = cu[np.concatenate([[True], cu[1:] != cu[:-1]])]  # unique_consecutive
    return window_index, cu


def padded_windows(cu_window_seqlens: np.ndarray, window_patches: int) -> dict[str, np.ndarray]:
    """Padded-window tables for window attention over the permuted patches: window w holds patches
    cu[w] .. cu[w+1]-1 in slots 0 .. len-1 of row w. Returns win_gather [Wn, P] int32 (0 in
    padding: any valid row, masked out by win_valid), win_valid [Wn, P] bool, win_unpad [N] int32."""
    cu = np.asarray(cu_window_seqlens, dtype=np.int64)
    starts, lengths = cu[:-1], np.diff(cu)  # (Wn,)
    if lengths.size == 0 or lengths.min() <= 0 or lengths.max() > window_patches:
        raise ValueError(f"window lengths {lengths.tolist()} must lie in 1..{window_patches}")
    if lengths.size * window_patches > INT32_MAX:  # win_unpad's values lie below Wn * P
        raise ValueError(f"{lengths.size} windows of {window_patches} patches overflow the int32 window "
                         "tables")
    slot = np.arange(window_patches, dtype=np.int64)  # (P,)
    valid = slot[None, :] < lengths[:, None]  # (Wn, P)
    gather = np.where(valid, starts[:, None] + slot[None, :], 0)  # (Wn, P)
    window_of = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)  # (N,) window of each patch
    unpad = window_of * window_patches + (np.arange(cu[-1], dtype=np.int64) - starts[window_of])  # (N,)
    return {"win_gather": gather.astype(np.int32), "win_valid": valid, "win_unpad": unpad.astype(np.int32)}


def vision_inputs(gh: int, gw: int, cfg: QwenVisionConfig) -> dict[str, np.ndarray]:
    """Every input of the vision graph except pixel_values, in graph input order, for an image of
    gh x gw patches."""
    out = {"vision_position_ids": vision_position_ids(gh, gw, cfg.merge)}  # (N, 2)
    if cfg.kind == "qwen2_5_vl":
        window_index, cu = window_layout(gh, gw, cfg)  # (M,), (Wn + 1,)
        out["window_index"] = window_index
        out["reverse_index"] = np.argsort(window_index, kind="stable").astype(np.int32)  # (M,)
        out.update(padded_windows(cu, cfg.window_patches))
    return out

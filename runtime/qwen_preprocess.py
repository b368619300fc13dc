"""Qwen2-VL / Qwen2.5-VL image preprocessing and M-RoPE prompt positions, in numpy and Pillow.

Equal (np.array_equal) to transformers' Qwen2VLImageProcessorPil, which both families use:

    RGB (runtime.preprocess.load_image: alpha or a colour key composited on white, as transformers'
    convert_to_rgb) -> smart_resize to a multiple of patch * merge per side, within [min_pixels,
    max_pixels] -> Pillow resize (bicubic) of the uint8 image -> uint8 * rescale (float64, then
    float32) -> (x - mean) / std in float32 -> patches (N, 3 * temporal * patch^2) in merge-block-major
    order, the still image repeated over the temporal patch

and the positions of transformers' Qwen2VLModel.get_rope_index for a prompt holding at most one
image: text tokens count up in all three rows; the image's tokens get (t, row, col) offsets from
the position where the image starts; the text after it resumes at that start + max(gh, gw) // merge.
Decode steps continue at S + t + rope_delta in all three rows, as transformers does.

Loading and the bounds on image size (MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, decompression bombs) are
runtime.preprocess's, so both families accept the same inputs: a path, a PIL image or an (H, W, 3)
uint8 array.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from runtime.errors import InputError
from runtime.preprocess import (
    _RESAMPLE,
    MAX_IMAGE_PIXELS,
    ImageLike,
    is_int,
    load_image,
    normalize_problem,
    spec_kwargs,
)

MAX_ASPECT = 200  # transformers' smart_resize refuses a longer side over 200 x the shorter one
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, kw_only=True)
class QwenPreprocessSpec:
    """What the image processor does, as the manifest records it (to_json / from_json). The defaults
    are Qwen2VLImageProcessor's; an engine should cap max_pixels (families.md pitfall 7)."""

    patch: int = 14  # patch side, px
    merge: int = 2  # spatial merge: merge x merge patches make one vision token
    temporal: int = 2  # temporal patch; a still image is repeated this many times
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale: float = 1 / 255
    resample: str = "bicubic"

    def __post_init__(self):
        problem = _problem(self)
        if problem:
            raise ValueError(f"Qwen preprocess spec: {problem}")

    @property
    def factor(self) -> int:
        """Each resized side is a multiple of this (28 for patch 14, merge 2)."""
        return self.patch * self.merge

    @property
    def patch_dim(self) -> int:
        """Values per patch row of pixel_values (1176 for patch 14, temporal 2)."""
        return 3 * self.temporal * self.patch * self.patch

    def to_json(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, d: dict) -> QwenPreprocessSpec:
        """The spec from its manifest object; ValueError (one line) for a missing, unknown or bad field."""
        kw = spec_kwargs(cls, d, "Qwen preprocess spec")
        return cls(**kw)


def _problem(s: QwenPreprocessSpec) -> str | None:
    """What is wrong with a spec, or None."""
    for name in ("patch", "merge", "temporal", "min_pixels", "max_pixels"):
        v = getattr(s, name)
        if not is_int(v) or v < 1:
            return f"{name} must be a positive integer, got {v!r}"
    if s.patch > 1024 or s.merge > 16 or s.temporal > 16:
        return f"patch {s.patch}, merge {s.merge}, temporal {s.temporal} are out of range (<= 1024, 16, 16)"
    if not s.min_pixels <= s.max_pixels <= MAX_IMAGE_PIXELS:
        return (f"need min_pixels <= max_pixels <= {MAX_IMAGE_PIXELS}, got min_pixels {s.min_pixels}, "
                f"max_pixels {s.max_pixels}")
    return normalize_problem(s)


# --- geometry --------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) after transformers' Qwen2-VL smart_resize: each side rounded to a multiple of
    `factor` (Python's round, half to even), then scaled by sqrt into [min_pixels, max_pixels]
    (floor when shrinking, ceil when growing). InputError when one side is over 200 x the other."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise InputError(f"image is {width}x{height}: aspect ratio {max(height, width) / min(height, width):.1f} "
                         f"is over {MAX_ASPECT}, which Qwen's preprocessing refuses; crop or pad it first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def grid_of(height: int, width: int, spec: QwenPreprocessSpec) -> tuple[int, int]:
    """(gh, gw): patches per side of an image of that size, after smart_resize."""
    h, w = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
    return h // spec.patch, w // spec.patch


def image_tokens(grid: tuple[int, int], merge: int = 2) -> int:
    """Vision tokens (<|image_pad|> placeholders) of a grid: gh * gw / merge^2."""
    gh, gw = grid
    return (gh // merge) * (gw // merge)


# --- pixels ----------------------------------------------------------------------------------------


def _spec(spec: QwenPreprocessSpec | dict) -> QwenPreprocessSpec:
    return QwenPreprocessSpec.from_json(spec) if isinstance(spec, dict) else spec


def patchify(x: np.ndarray, spec: QwenPreprocessSpec) -> np.ndarray:
    """(H, W, 3) float32 -> (gh * gw, 3 * T * p * p): merge blocks row-major, the patches of a block
    row-major inside it, each patch (C, T, p, p) with the image repeated over T."""
    p, m, t = spec.patch, spec.merge, spec.temporal
    gh, gw = x.shape[0] // p, x.shape[1] // p
    blocks = x.transpose(2, 0, 1).reshape(3, gh // m, m, p, gw // m, m, p)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    blocks = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))  # (..., C, T, p, p)
    return np.ascontiguousarray(blocks.reshape(gh * gw, 3 * t * p * p))


def preprocess(image: ImageLike, spec: QwenPreprocessSpec | dict) -> tuple[np.ndarray, tuple[int, int]]:
    """(pixel_values (N, 3 * T * p * p) float32, (gh, gw)) with N = gh * gw, as transformers'
    Qwen2VLImageProcessorPil gives pixel_values and image_grid_thw = [1, gh, gw]. `spec` is a
    QwenPreprocessSpec or its manifest object."""
    spec = _spec(spec)
    im = load_image(image)  # RGB
    h, w = smart_resize(im.height, im.width, spec.factor, spec.min_pixels, spec.max_pixels)
    try:
        x = np.asarray(im.resize((w, h), resample=_RESAMPLE[spec.resample]))  # (h, w, 3) uint8
        x = (x.astype(np.float64) * spec.rescale).astype(np.float32)  # transformers' rescale
        x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        return patchify(x, spec), (h // spec.patch, w // spec.patch)
    except MemoryError as exc:
        raise InputError(f"not enough memory to preprocess a {im.width}x{im.height} image into {w}x{h}; "
                         "downscale it") from exc


# --- M-RoPE positions ------------------------------------------------------------------------------


def _image_run(ids: np.ndarray, image_pad_id: int) -> tuple[int, int]:
    """(start, length) of the one run of image_pad_id in ids; (0, 0) if there is none."""
    where = np.flatnonzero(ids == image_pad_id)
    if where.size == 0:
        return 0, 0
    start, n = int(where[0]), int(where.size)
    if int(where[-1]) != start + n - 1:
        raise InputError("the prompt holds more than one run of image tokens; the Qwen path takes one image "
                         "per prompt")
    return start, n


def mrope_positions(ids, image_pad_id: int, grid: tuple[int, int] | None,
                    merge: int = 2) -> tuple[np.ndarray, int]:
    """(position_ids (3, 1, S) int32 (the decoder's INDEX_DTYPE), rope_delta) of a prompt, as transformers'
    Qwen2VLModel.get_rope_index computes them (one image of grid (gh, gw) patches, or none: grid None
    and no image token; then the three rows are arange(S) and rope_delta is 0). rope_delta =
    max(position) + 1 - S (negative with an image); decode step t uses decode_positions."""
    ids = np.asarray(ids).reshape(-1)  # (S,) from (S,) or (1, S)
    S = ids.size
    start, n = _image_run(ids, image_pad_id)
    pos = np.empty((3, S), np.int32)
    if grid is None:
        if n:
            raise InputError(f"the prompt holds {n} image tokens but no image grid was given")
        pos[:] = np.arange(S)
        return pos[:, None], 0
    lh, lw = grid[0] // merge, grid[1] // merge  # vision tokens per column / row
    if n != lh * lw:
        raise InputError(f"the prompt holds {n} image tokens, the image grid {grid[0]}x{grid[1]} (merge {merge}) "
                         f"needs {lh * lw}")
    pos[:, :start] = np.arange(start)  # text before the image
    pos[0, start:start + n] = start  # temporal index 0 (one still image)
    pos[1, start:start + n] = start + np.repeat(np.arange(lh), lw)  # row
    pos[2, start:start + n] = start + np.tile(np.arange(lw), lh)  # column
    resume = start + max(grid[0], grid[1]) // merge
    pos[:, start + n:] = resume + np.arange(S - start - n)  # text after the image
    return pos[:, None], int(pos.max()) + 1 - S


def decode_positions(S: int, t: int, rope_delta: int) -> np.ndarray:
    """position_ids (3, 1, 1) int32 of decode step t = 0, 1, ...: the token at sequence index S + t
    (the first generated token is fed back at index S) sits at S + t + rope_delta in all three rows.
    S counts the unpruned prompt, whatever DART kept."""
    return np.full((3, 1, 1), S + t + rope_delta, np.int32)

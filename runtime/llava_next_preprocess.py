"""LLaVA-NeXT ("anyres") image preprocessing, token layout and pack index, in numpy and Pillow.

Pixels equal (np.array_equal) transformers' LlavaNextImageProcessorPil; the pack index reproduces
LlavaNextModel.pack_image_features (families.md section 4):

    RGB (runtime.preprocess.load_image: alpha or a colour key composited on white, as transformers'
    convert_to_rgb) -> the pinpoint (bh, bw) of select_best_resolution ->
    base:  Pillow resize of the whole image to crop x crop (aspect not kept)
    tiles: Pillow resize to fit (bh, bw) (ceil on the short side), centred on black (zeros before
           rescaling), cut into (bh / crop) x (bw / crop) crops, row-major
    -> uint8 * rescale (float64, then float32) -> (x - mean) / std in float32 -> (1 + gh*gw, 3, crop, crop)

The processor pads a batch of images to its largest crop count with zero crops; for one image
there is nothing to pad, and preprocess returns exactly the image's crops.

Tokens. The crops' features (crops, grid^2, D) are laid out as a (gh*grid) x (gw*grid) map of tile
features; unpad_image keeps the rows (or columns) of the map that the resized image covers (rounding
int(round(x, 7)), as transformers), and image_newline follows every kept row:
    L = grid^2 + h' * (w' + 1)
pack_index(layout) gathers exactly those rows from concat(features.reshape(-1, D), image_newline[None]).

Range (token_range / crop_range). The most tokens come from an image of a pinpoint's exact size (no
unpadding; 2928 at the default pinpoints, any image 672 px square or larger). The fewest: unpadding
a map of ch rows keeps ch - 2k of them, so h' has ch's parity; a wide image too flat for one row of
features (W / H > cw, about) keeps 0 rows (ch even) or 1 (ch odd). A tall one keeps all ch rows, each
with its newline, however few columns. With the 24-token grid every ch is even, so the minimum is the
base alone, grid^2 = 576 tokens, reached e.g. by a 1008 x 1 (W x H) image, and by 1009 x 1: when no
pinpoint keeps a whole pixel row, select_best_resolution falls back to the least-area pinpoint
rather than failing, and transformers' processor and model accept such images. For an odd grid the
value returned is this parity bound, a lower bound that may not be reached.

Bounds. Loading refuses what runtime.preprocess refuses (MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, unreadable
files); every size transformers accepts beyond that is handled as transformers does. Memory past the
decoded image is bounded by the spec, not by the image: a pinpoint has at most MAX_PINPOINT_PIXELS
pixels and MAX_TILES crops, so pixel_values is at most (1 + MAX_TILES) crops. Pillow resizes in two
passes; its intermediate is (output width) x H for the horizontal pass first, W x (output height)
for the vertical one first (Pillow 13 picks that when the height shrinks more than twice the width).
For the tiles that is at most sqrt(W * H * pinpoint px) + H <= 2^25 + 2^18 px, or at most W * H. For
the base it is crop x H when the horizontal pass goes first (Pillow < 13 on a narrow, very tall
image such as 250 x 230000): past runtime.preprocess's _EXACT_PIXELS the base is then computed by
runtime.preprocess._resample_bounded, which equals that Pillow bit for bit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from runtime import preprocess as _pp
from runtime.errors import InputError
from runtime.preprocess import _RESAMPLE, ImageLike, is_int, load_image, normalize_problem, spec_kwargs

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # (height, width)
MAX_CROP = 2048  # px, crop side
MAX_TILES = 64  # crops per pinpoint (llava-onevision's largest pinpoint has 36)
MAX_PINPOINT_PIXELS = 1 << 24  # 4096^2 px per pinpoint (llava-onevision's largest: 2304^2)
_WHERE = "LLaVA-NeXT preprocess spec"


@dataclass(frozen=True, kw_only=True)
class NextPreprocessSpec:
    """What LlavaNextImageProcessor does, as the manifest records it (to_json / from_json). The
    defaults are llava-hf/llava-v1.6-mistral-7b-hf's preprocessor_config.json."""

    crop_size: int = 336  # crop side, px (the vision tower's image_size)
    shortest_edge: int = 336  # the processor's size; must equal crop_size (else it rescales crops)
    pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS  # (height, width), multiples of crop_size
    resample: str = "bicubic"
    rescale: float = 1 / 255
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    patch: int = 14  # vision patch side, px

    def __post_init__(self):
        for name in ("pinpoints", "mean", "std"):  # lists, as JSON or a processor gives them, -> tuples
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(tuple(p) if isinstance(p, list) else p for p in v))
        problem = _problem(self)
        if problem:
            raise ValueError(f"{_WHERE}: {problem}")

    @property
    def grid(self) -> int:
        """Tokens per crop side (24 for 336 px crops of 14 px patches)."""
        return self.crop_size // self.patch

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["pinpoints"] = [list(p) for p in self.pinpoints]
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_json(cls, raw: dict) -> NextPreprocessSpec:
        """The spec from its manifest object; ValueError (one line) for a missing, unknown or bad field."""
        kw = spec_kwargs(cls, raw, _WHERE)
        pins = raw["pinpoints"]
        if not isinstance(pins, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in pins):
            raise ValueError(f"{_WHERE}: pinpoints must be a list of [height, width] pairs, got {pins!r}")
        kw["pinpoints"] = tuple(tuple(p) for p in pins)
        return cls(**kw)


def _problem(s: NextPreprocessSpec) -> str | None:
    """What is wrong with a spec, or None."""
    for name in ("crop_size", "shortest_edge", "patch"):
        v = getattr(s, name)
        if not is_int(v) or v < 1:
            return f"{name} must be a positive integer, got {v!r}"
    if s.crop_size > MAX_CROP or s.crop_size % s.patch:
        return f"crop_size {s.crop_size} must be a multiple of patch {s.patch}, at most {MAX_CROP}"
    if s.shortest_edge != s.crop_size:
        return (f"shortest_edge {s.shortest_edge} != crop_size {s.crop_size} (the processor would rescale "
                "and center-crop every crop; the runtime reproduces equal sizes only)")
    pins = s.pinpoints
    if not isinstance(pins, tuple) or not pins:
        return f"pinpoints must be a non-empty list of [height, width] pairs, got {pins!r}"
    for p in pins:
        if not isinstance(p, tuple) or len(p) != 2 or not all(is_int(v) and v > 0 for v in p):
            return f"pinpoint {p!r} is not a [height, width] pair of positive integers"
        if p[0] % s.crop_size or p[1] % s.crop_size:
            return f"pinpoint {list(p)} is not a multiple of crop_size {s.crop_size} on both sides"
        if p[0] * p[1] > MAX_PINPOINT_PIXELS or (p[0] // s.crop_size) * (p[1] // s.crop_size) > MAX_TILES:
            return (f"pinpoint {list(p)} is over the runtime's limits ({MAX_PINPOINT_PIXELS} pixels, "
                    f"{MAX_TILES} crops)")
    return normalize_problem(s)


def _spec(spec: NextPreprocessSpec | dict) -> NextPreprocessSpec:
    return NextPreprocessSpec.from_json(spec) if isinstance(spec, dict) else spec


# --- geometry --------------------------------------------------------------------------------------


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """transformers' image_processing_utils.select_best_resolution: the (height, width) pinpoint that
    keeps the most image pixels once the image is scaled to fit it, then wastes the least area. When
    none keeps a whole pixel row (effective 0), the first pinpoint of least area."""
    best, max_effective, min_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = w * h - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best, max_effective, min_wasted = (h, w), effective, wasted
    return best


def patch_output_size(height: int, width: int, best: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized to fit `best` (image_processing_utils.get_patch_output_size)."""
    bh, bw = best
    scale_w, scale_h = bw / width, bh / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), bh), bw
    return bh, min(math.ceil(width * scale_h), bw)


@dataclass(frozen=True)
class NextLayout:
    """Where an image's crops and vision tokens come from."""

    original: tuple[int, int]  # (h, w) of the input image
    best: tuple[int, int]  # (bh, bw), the pinpoint chosen
    tiles: tuple[int, int]  # (gh, gw) crops per side of the tiled image
    grid: int  # tokens per crop side
    rows: tuple[int, int]  # (r0, r1): rows of the (gh*grid) x (gw*grid) tile map that unpadding keeps
    cols: tuple[int, int]  # (c0, c1): its columns kept

    @property
    def crops(self) -> int:
        """pixel_values' first dim: the base image and the tiles."""
        return 1 + self.tiles[0] * self.tiles[1]

    @property
    def base_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def tokens(self) -> int:
        """L, the image's vision tokens: the base, then every kept map row and its newline token."""
        (r0, r1), (c0, c1) = self.rows, self.cols
        return self.base_tokens + (r1 - r0) * (c1 - c0 + 1)


def _unpad(height: int, width: int, ch: int, cw: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, cols) of a ch x cw feature map that modeling_llava_next.unpad_image keeps."""
    if width / height > cw / ch:  # wider than the map: black bands above and below
        new_h = int(round(height * (cw / width), 7))
        pad = (ch - new_h) // 2
        return (pad, ch - pad), (0, cw)
    new_w = int(round(width * (ch / height), 7))
    pad = (cw - new_w) // 2
    return (0, ch), (pad, cw - pad)


def layout(height: int, width: int, spec: NextPreprocessSpec | dict) -> NextLayout:
    """The crops and token layout of an image of height x width px."""
    spec = _spec(spec)
    if not (is_int(height) and is_int(width) and height > 0 and width > 0):
        raise InputError(f"image size must be two positive integers, got {height!r} x {width!r}")
    bh, bw = select_best_resolution(height, width, spec.pinpoints)
    gh, gw, g = bh // spec.crop_size, bw // spec.crop_size, spec.grid
    rows, cols = _unpad(height, width, gh * g, gw * g)
    return NextLayout(original=(height, width), best=(bh, bw), tiles=(gh, gw), grid=g, rows=rows, cols=cols)


def pack_index(lay: NextLayout) -> np.ndarray:
    """(L,) int32: rows of concat(features.reshape(crops * grid^2, D), image_newline[None]) that give
    pack_image_features' output: the base crop's grid^2 rows, then each kept row of the tile map (its
    kept columns, then the newline row, index crops * grid^2). Map position (r, c) is crop
    1 + (r // grid) * gw + c // grid, patch (r % grid) * grid + c % grid.
    int32: the vision graph's Gather takes it without a cast in TensorRT 10.3 (docs/TENSORRT_10.3.md
    sections 3 and 7); every value is at most crops * grid^2 <= (1 + MAX_TILES) * MAX_CROP^2 < 2^28."""
    g, gw = lay.grid, lay.tiles[1]
    r = np.arange(*lay.rows, dtype=np.int32)[:, None]  # (h', 1)
    c = np.arange(*lay.cols, dtype=np.int32)[None, :]  # (1, w')
    crop = 1 + (r // g) * gw + c // g  # (h', w')
    kept = crop * (g * g) + (r % g) * g + c % g  # (h', w')
    newline = np.full((kept.shape[0], 1), lay.crops * g * g, np.int32)  # (h', 1)
    rows = np.concatenate([kept, newline], axis=1).reshape(-1)  # (h' * (w' + 1),)
    return np.concatenate([np.arange(g * g, dtype=np.int32), rows])  # (L,)


def token_range(spec: NextPreprocessSpec | dict) -> tuple[int, int]:
    """(fewest, most) vision tokens of one image (module doc): the most from a pinpoint-sized image,
    grid^2 + ch * (cw + 1); the fewest grid^2 + (ch % 2) * (cw + 1) (a wide image unpadded to 0 or 1
    rows) or grid^2 + ch * (cw % 2 + 1) (a tall one unpadded to 0 or 1 columns, each row still ending
    in a newline). (576, 2928) at the default pinpoints."""
    spec = _spec(spec)
    g = spec.grid
    maps = [(h // spec.crop_size * g, w // spec.crop_size * g) for h, w in spec.pinpoints]  # (ch, cw)
    lo = min(min(ch % 2 * (cw + 1), ch * (cw % 2 + 1)) for ch, cw in maps)  # wide, tall
    hi = max(ch * (cw + 1) for ch, cw in maps)
    return g * g + lo, g * g + hi


def crop_range(spec: NextPreprocessSpec | dict) -> tuple[int, int]:
    """(fewest, most) crops of one image: 1 + the tiles of the least-area pinpoint (a 1 x 1 image
    selects it) and of the largest (an image of its exact size selects it). (3, 5) by default."""
    spec = _spec(spec)
    tiles = [(h // spec.crop_size) * (w // spec.crop_size) for h, w in spec.pinpoints]
    return 1 + min(tiles), 1 + max(tiles)


# --- pixels ----------------------------------------------------------------------------------------


def _base(im: Image.Image, spec: NextPreprocessSpec) -> np.ndarray:
    """(crop, crop, 3) uint8: the whole image resized to crop x crop, by Pillow, unless Pillow's
    intermediate, crop x H pixels when it runs the horizontal pass first, passes _EXACT_PIXELS: then
    runtime.preprocess's bounded resampler computes the same bytes."""
    c = spec.crop_size
    if c * im.height <= _pp._EXACT_PIXELS or _vertical_pass_first(im.size, (c, c)):
        return np.asarray(im.resize((c, c), resample=_RESAMPLE[spec.resample]))
    return _pp._resample_bounded(im, im.size, (0, 0), None, (c, c), (0, 0), c, spec.resample)


def _vertical_pass_first(size: tuple[int, int], out: tuple[int, int]) -> bool:
    """Whether Pillow resizes (w, h) -> out vertical pass first, its intermediate then w x out_h.
    Pillow 13 does so when the height shrinks by more than twice what the width does; earlier
    versions always run the horizontal pass first (what _resample_bounded reproduces)."""
    (w, h), (ow, oh) = size, out
    return h - oh > 0 and h - oh > 2 * (w - ow) and _pillow_orders_passes()


@functools.cache
def _pillow_orders_passes() -> bool:
    """True if this Pillow picks the vertical pass first for a narrow image shrunk in height (probed on
    a 2 x 24 image whose two pass orders round differently, so no version number is assumed)."""
    probe = np.zeros((24, 2), np.uint8)
    probe[::2, 0], probe[1::3, 1] = 255, 255
    im, bicubic = Image.fromarray(probe, "L"), Image.Resampling.BICUBIC
    both = np.asarray(im.resize((5, 3), bicubic))
    vertical_first = np.asarray(im.resize((2, 3), bicubic).resize((5, 3), bicubic))
    horizontal_first = np.asarray(im.resize((5, 24), bicubic).resize((5, 3), bicubic))
    return np.array_equal(both, vertical_first) and not np.array_equal(both, horizontal_first)


def _tiles(im: Image.Image, lay: NextLayout, spec: NextPreprocessSpec) -> np.ndarray:
    """(gh * gw, crop, crop, 3) uint8: the image resized to fit the pinpoint, centred on black, cut
    row-major."""
    (bh, bw), (gh, gw), c = lay.best, lay.tiles, spec.crop_size
    nh, nw = patch_output_size(im.height, im.width, lay.best)
    resized = np.asarray(im.resize((nw, nh), resample=_RESAMPLE[spec.resample]))  # (nh, nw, 3)
    top, left = (bh - nh) // 2, (bw - nw) // 2  # the processor's _get_padding_size: the odd pixel after
    canvas = np.zeros((bh, bw, 3), np.uint8)
    canvas[top:top + nh, left:left + nw] = resized
    return canvas.reshape(gh, c, gw, c, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, c, c, 3)


def preprocess(image: ImageLike, spec: NextPreprocessSpec | dict) -> tuple[np.ndarray, NextLayout]:
    """(pixel_values (crops, 3, crop, crop) float32, layout): the base image first, then the tiles
    row-major, equal to LlavaNextImageProcessorPil's pixel_values[0] for this image alone. `spec` is
    a NextPreprocessSpec or its manifest object."""
    spec = _spec(spec)
    im = load_image(image)  # RGB
    lay = layout(im.height, im.width, spec)
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    try:
        crops = np.concatenate([_base(im, spec)[None], _tiles(im, lay, spec)])  # (crops, c, c, 3) uint8
        out = np.empty((lay.crops, 3, spec.crop_size, spec.crop_size), np.float32)
        for i, x in enumerate(crops):  # one crop at a time: the float64 temporary stays small
            x = (x.astype(np.float64) * spec.rescale).astype(np.float32)  # transformers' rescale
            out[i] = ((x - mean) / std).transpose(2, 0, 1)  # (3, c, c)
    except MemoryError as exc:
        raise InputError(f"not enough memory to preprocess a {im.width}x{im.height} image into "
                         f"{lay.crops} crops; downscale it") from exc
    return out, lay

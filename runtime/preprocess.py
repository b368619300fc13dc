"""Image preprocessing with Pillow and numpy, equal to the checkpoint's own image processor
(transformers' LlavaImageProcessor / CLIPImageProcessor, PIL backend), driven by the manifest's
"preprocess" object (runtime.manifest.PreprocessSpec):

    RGB -> [pad to square with int(255 * mean), LLaVA's expand2square] -> resize the shortest edge
    to spec.resize_edge (Pillow, spec.resample) -> center crop image_size^2 at ((size - crop) // 2)
    -> uint8 * rescale (float64, then float32) -> (x - mean) / std in float32 -> (1, 3, S, S)

Loading matches what a transformers user gets:
    a path       -> transformers' load_image(path) (EXIF orientation applied, Pillow's convert("RGB"),
                    which drops alpha), then the processor's RGB conversion (a PNG/GIF colour key
                    left by that is composited on white)
    a PIL image  -> the processor's RGB conversion only: alpha (or a colour key) composited on white,
                    no EXIF rotation (transformers does not rotate PIL inputs either)
    an (H, W, 3) uint8 array -> used as RGB
16- and 32-bit images ("I;16", "I", "F") are clipped to 0..255 by Pillow, for transformers too (a
16-bit PNG comes out mostly white); a warning is logged.

Bounds. An image over MAX_IMAGE_PIXELS pixels, or with a side over MAX_IMAGE_SIDE, is refused with
a one-line InputError from the file header, before decoding (checked again after decoding, and for
PIL/array inputs); any failure to read or convert an image is an InputError. The resize runs on
Pillow, as transformers does, while its intermediate (the padded square, or the whole shortest-edge
resize before the crop) has at most MAX_IMAGE_PIXELS pixels. Past that (a 30000 x 1 PNG pads to a
30000^2 canvas, or resizes to 10_080_000 x 336 before the crop) `_resample_bounded` computes only
the pixels the crop keeps, with Pillow's coefficients, pass order and fixed-point rounding, and the
padding as arithmetic, never built: about 100 MB at most beyond the decoded image. Its result
equals Pillow's bit for bit (tests/test_preprocess.py forces it on ordinary images to check that).
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from runtime.errors import EngineError, InputError
from runtime.manifest import PreprocessSpec, parse_preprocess

log = logging.getLogger(__name__)

ImageLike = str | Path | Image.Image | np.ndarray

MAX_IMAGE_PIXELS = 1 << 26  # 67,108,864 (8192 x 8192; a 48 MP photo passes); larger images are refused
MAX_IMAGE_SIDE = 1 << 18  # 262,144 px; a longer side is refused (resampling costs ~32 bytes per px of it)
_EXACT_PIXELS = MAX_IMAGE_PIXELS  # largest intermediate Pillow may build; larger -> _resample_bounded
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # Pillow's filter supports (libImaging/Resample.c)
_PRECISION_BITS = 22  # Pillow's 8-bit fixed point: 32 - 8 - 2
_CLIPPED_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# --- loading ---------------------------------------------------------------------------------------


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, or an (H, W, 3) uint8 array (see the module doc)."""
    if isinstance(image, (str, Path)):
        return _read(Path(image))
    if isinstance(image, Image.Image):
        return _guarded(lambda: _convert(image), "convert the PIL image")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"an image array must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        _check_size((image.shape[1], image.shape[0]), "image array")
        return Image.fromarray(np.ascontiguousarray(image))  # (H, W, 3) uint8 -> RGB
    raise InputError(f"image must be a path, a PIL.Image or an (H, W, 3) uint8 array, "
                     f"got {type(image).__name__}")


def _read(path: Path) -> Image.Image:
    def read() -> Image.Image:
        with Image.open(path) as im:  # reads the header only
            _check_size(im.size, f"image {path}")
            im.load()
            _check_size(im.size, f"image {path}")  # a few formats (ICO) learn their size while decoding
            _warn_clipped(im.mode)
            ImageOps.exif_transpose(im, in_place=True)  # transformers' load_image: rotate, convert("RGB")
            return _to_rgb(_rgb(im))  # then the processor's convert_to_rgb (a colour key may remain)

    return _guarded(read, f"read image {path}")


def _convert(im: Image.Image) -> Image.Image:
    _check_size(im.size, "image")  # a lazily opened image: before decoding
    im.load()
    _check_size(im.size, "image")
    _warn_clipped(im.mode)
    return _to_rgb(im)  # the processor's convert_to_rgb


def _guarded(fn, doing: str) -> Image.Image:
    """fn() with every failure of Pillow (or of a malformed file) as one InputError line."""
    try:
        return fn()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"cannot {doing}: {_reason(exc)}; the runtime's limit is MAX_IMAGE_PIXELS = "
                         f"{MAX_IMAGE_PIXELS} pixels, downscale it first") from exc
    except Exception as exc:  # Pillow plugins raise many types on corrupt files
        raise InputError(f"cannot {doing}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _check_size(size: tuple[int, int], what: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise InputError(f"{what} is {w}x{h}: an image needs at least one pixel")
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"{what} is {w}x{h} = {w * h} pixels, over the runtime's limit MAX_IMAGE_PIXELS = "
                         f"{MAX_IMAGE_PIXELS}; downscale it first")
    if max(w, h) > MAX_IMAGE_SIDE:
        raise InputError(f"{what} is {w}x{h}, a side over the runtime's limit MAX_IMAGE_SIDE = "
                         f"{MAX_IMAGE_SIDE}; crop or downscale it first")


def _warn_clipped(mode: str) -> None:
    if mode in _CLIPPED_MODES:
        log.warning("image mode %s: converted to 8-bit RGB as transformers does (Pillow clips values to "
                    "0..255); convert it to 8 bits first for a meaningful picture", mode)


def _to_rgb(im: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb: alpha or a colour key composited on white."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return _rgb(im)


def _rgb(im: Image.Image) -> Image.Image:
    """im.convert("RGB"), without its copy when im is RGB already (same pixels and info)."""
    return im if im.mode == "RGB" else im.convert("RGB")


# --- geometry --------------------------------------------------------------------------------------


def pad_color(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """Background for expand2square: int(255 * mean) per channel, truncated like LLaVA and transformers."""
    return tuple(int(255 * m) for m in mean)  # type: ignore[return-value]


def expand2square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: paste the image centred on a square of the longer side."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), color)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def resize_size(w: int, h: int, edge: int) -> tuple[int, int]:
    """(width, height) after resizing the shortest edge to `edge` (transformers' int() truncation)."""
    if w <= h:
        return edge, int(edge * h / w)
    return int(edge * w / h), edge


def _resized_crop(im: Image.Image, spec: PreprocessSpec, kind: str) -> np.ndarray:
    """(S, S, 3) uint8: [pad] -> resize -> center crop, with Pillow or bounded (module doc)."""
    w, h, size = im.width, im.height, spec.image_size
    if spec.pad_to_square:
        side = max(w, h)
        canvas, at, fill = (side, side), ((side - w) // 2, (side - h) // 2), pad_color(spec.mean)
        rw = rh = spec.resize_edge
    else:
        canvas, at, fill = (w, h), (0, 0), None
        rw, rh = resize_size(w, h, spec.resize_edge)
    left, top = (rw - size) // 2, (rh - size) // 2
    if max(canvas[0] * canvas[1], rw * rh) <= _EXACT_PIXELS:  # what transformers does, step by step
        if fill is not None:
            im = expand2square(im, fill)
        im = im.resize((rw, rh), resample=_RESAMPLE[kind])
        return np.asarray(im.crop((left, top, left + size, top + size)))
    fill_px = None if fill is None else np.asarray(fill, np.float64)
    return _resample_bounded(im, canvas, at, fill_px, (rw, rh), (left, top), size, kind)


# --- Pillow's resampling, output pixels only -------------------------------------------------------


def _filter(kind: str, x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic (a = -0.5) and bilinear filters, in its operation order."""
    x = np.abs(x)
    if kind == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _windows(in_size: int, out_size: int, outs: range, kind: str) -> list[tuple[int, np.ndarray]]:
    """(first input index, integer coefficients) of each output sample in `outs`: Pillow's
    precompute_coeffs (box 0..in_size passed as float32, as Pillow does) + normalize_coeffs_8bpc."""
    scale = float(np.float32(in_size)) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT[kind] * filterscale
    one = float(1 << _PRECISION_BITS)
    windows = []
    for o in outs:
        center = (o + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        n = min(int(center + support + 0.5), in_size) - xmin
        w = _filter(kind, ((np.arange(n) + xmin) - center + 0.5) * (1.0 / filterscale))
        ww = float(np.add.accumulate(w)[-1]) if n else 0.0  # sequential sum, as in C
        k = w / ww if ww != 0.0 else w
        windows.append((xmin, np.trunc(np.where(k < 0, -0.5 + k * one, 0.5 + k * one)).astype(np.int64)))
    return windows


def _pass(a: np.ndarray, axis: int, windows: list, start: int, fill: np.ndarray | None) -> np.ndarray:
    """Pillow's 8-bit resampling pass along `axis` (0 or 1) for the output samples of `windows`.
    `a` (rows, cols, 3) uint8 holds input samples start .. start + a.shape[axis] along `axis`; the
    samples outside are `fill` (broadcast over the other axis), or never read when fill is None."""
    n, out = a.shape[axis], []
    for xmin, k in windows:
        lo = max(xmin, start)
        hi = max(min(xmin + len(k), start + n), lo)
        k_in = k[lo - xmin:hi - xmin]
        kf = k_in.astype(np.float64)  # float64 sums of these integer products are exact (< 2^53)
        if axis == 0:
            rows = a[lo - start:hi - start].reshape(hi - lo, a.shape[1] * a.shape[2])
            acc = (kf @ rows).reshape(a.shape[1:])  # (cols, 3)
        else:
            part = np.ascontiguousarray(a[:, lo - start:hi - start].transpose(0, 2, 1), np.float64)
            acc = part @ kf  # (rows, 3)
        if fill is not None:
            acc = acc + float(k.sum() - k_in.sum()) * fill
        out.append(acc)
    acc = np.stack(out, axis=axis)
    half, one = 1 << (_PRECISION_BITS - 1), 1 << _PRECISION_BITS
    return np.clip(np.floor((acc + half) / one), 0, 255).astype(np.uint8)  # Pillow's clip8


def _resample_bounded(im: Image.Image, canvas: tuple[int, int], at: tuple[int, int], fill: np.ndarray | None,
                      size: tuple[int, int], crop: tuple[int, int], crop_size: int, kind: str) -> np.ndarray:
    """Pillow's resize of a canvas (width, height) of colour `fill` with `im` pasted at `at`, to
    `size`, then the crop_size^2 crop at `crop` -> (S, S, 3) uint8, computing only what the crop
    reads. Horizontal pass first, then vertical, as Pillow does; the image is read in row chunks."""
    (cw, ch), (rw, rh), (ox, oy), (w, h) = canvas, size, at, im.size
    wx = _windows(cw, rw, range(crop[0], crop[0] + crop_size), kind)
    wy = _windows(ch, rh, range(crop[1], crop[1] + crop_size), kind)
    meets = [x0 < ox + w and x0 + len(k) > ox for x0, k in wx]  # output columns that read the image
    v0, v1 = meets.index(True), len(meets) - meets[::-1].index(True)
    c0, c1 = max(wx[v0][0], ox), min(wx[v1 - 1][0] + len(wx[v1 - 1][1]), ox + w)  # image columns read
    r0 = max(wy[0][0], oy)  # image rows read by the vertical pass: r0 .. r1 (canvas coordinates)
    r1 = max(min(wy[-1][0] + len(wy[-1][1]), oy + h), r0)
    step = max(1, (1 << 22) // (3 * (c1 - c0)))  # rows per chunk: <= 4M samples, their float64 <= 32 MB

    def band(r: int) -> np.ndarray:  # (rows, c1 - c0, 3): the image at canvas rows r .. r + step
        return np.asarray(im.crop((c0 - ox, r - oy, c1 - ox, min(r + step, r1) - oy)))

    chunks = [_pass(band(r), 1, wx[v0:v1], c0, fill) for r in range(r0, r1, step)]  # each (rows, V, 3)
    rows = np.concatenate(chunks) if chunks else np.zeros((0, v1 - v0, 3), np.uint8)  # (r1 - r0, V, 3)
    out = np.empty((crop_size, crop_size, 3), np.uint8)
    if fill is None:
        out[:] = _pass(rows, 0, wy, r0, None)
        return out
    fill_row = _pass(np.zeros((1, 0, 3), np.uint8), 1, wx, 0, fill)[0].astype(np.float64)  # (S, 3)
    out[:, v0:v1] = _pass(rows, 0, wy, r0, fill_row[v0:v1])
    for a, b in ((0, v0), (v1, crop_size)):  # columns that read only padding
        if b > a:
            out[:, a:b] = _pass(np.zeros((0, b - a, 3), np.uint8), 0, wy, 0, fill_row[a:b])
    return out


# --- spec checks shared by the families' processor ports (runtime/qwen_preprocess.py, llava_next_preprocess.py)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def spec_kwargs(cls, raw, where: str) -> dict:
    """Constructor keywords of the spec dataclass `cls` from its manifest object `raw`: every field
    present and no other, mean and std lists made tuples; ValueError (one line, `where` first)
    otherwise. The values themselves are checked by the spec's own problem function."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")  # noqa: TRY004
    names = [f.name for f in fields(cls)]
    missing, unknown = [n for n in names if n not in raw], sorted(set(raw) - set(names))
    if missing or unknown:
        raise ValueError(f"{where}: missing {missing}, unknown {unknown}; re-export the engine")
    kw = dict(raw)
    for key in ("mean", "std"):
        if not isinstance(kw[key], (list, tuple)):
            raise ValueError(f"{where}: {key} must be a list of 3 numbers, got {kw[key]!r}")  # noqa: TRY004
        kw[key] = tuple(kw[key])
    return kw


def normalize_problem(spec) -> str | None:
    """What is wrong with a spec's rescale / normalise / resample fields (mean, std: 3-tuples), or None."""
    for name in ("mean", "std"):
        v = getattr(spec, name)
        if not isinstance(v, tuple) or len(v) != 3 or not all(is_num(x) for x in v):
            return f"{name} must be 3 finite numbers, got {v!r}"
    if not all(x > 0 for x in spec.std):
        return f"std must be positive, got {spec.std!r}"
    if not is_num(spec.rescale) or spec.rescale <= 0:
        return f"rescale must be a positive finite number, got {spec.rescale!r}"
    if spec.resample not in _RESAMPLE:
        return f"resample {spec.resample!r} is not one the runtime reproduces ({', '.join(_RESAMPLE)})"
    return None


# --- the whole transform ---------------------------------------------------------------------------


def check_spec(spec: PreprocessSpec) -> str:
    """The resample name, after checking that the runtime reproduces this preprocessing (a spec
    built in code; the manifest reader already refuses these)."""
    problem = spec.problem()
    if problem:
        raise EngineError(f"manifest.json: {problem}; re-export the engine")
    return spec.resample.lower()


def preprocess(image: ImageLike, spec: PreprocessSpec | dict) -> np.ndarray:
    """pixel_values (1, 3, S, S) float32 for the vision encoder, S = spec.image_size. `spec` is the
    manifest's PreprocessSpec or its "preprocess" object as a plain dict."""
    if isinstance(spec, dict):
        spec = parse_preprocess(spec)
    kind = check_spec(spec)
    im = load_image(image)
    try:
        x = _resized_crop(im, spec, kind)  # (S, S, 3) uint8
    except MemoryError as exc:
        raise InputError(f"not enough memory to preprocess a {im.width}x{im.height} image; "
                         "downscale it") from exc
    x = (x.astype(np.float64) * spec.rescale).astype(np.float32)  # transformers' rescale
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, S, S)

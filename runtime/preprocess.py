"""LLaVA-1.5 image preprocessing with Pillow and numpy, driven by the manifest's "preprocess" dict.

    RGB -> pad to square with the mean colour (LLaVA's expand2square) -> bicubic resize to
    image_size x image_size -> * rescale -> (x - mean) / std -> float32 (1, 3, H, W)

This is what transformers' LlavaImageProcessor(do_pad=True) does with its PIL backend; the pad
colour is int(255 * mean) per channel (truncated, as in LLaVA's own code and in transformers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.errors import EngineError, InputError
from runtime.manifest import PreprocessSpec, parse_preprocess

ImageLike = str | Path | Image.Image | np.ndarray

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, or an (H, W, 3) uint8 array."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise InputError(f"cannot read image {image}: {reason}") from exc
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"an image array must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        return Image.fromarray(np.ascontiguousarray(image))  # (H, W, 3) uint8 -> RGB
    raise InputError(f"image must be a path, a PIL.Image or an (H, W, 3) uint8 array, got {type(image).__name__}")


def pad_color(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """Background for expand2square: int(255 * mean) per channel, truncated like LLaVA's code."""
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


def preprocess(image: ImageLike, spec: PreprocessSpec | dict) -> np.ndarray:
    """pixel_values (1, 3, S, S) float32 for the vision encoder, S = spec.image_size. `spec` is the
    manifest's PreprocessSpec or its "preprocess" object as a plain dict."""
    if isinstance(spec, dict):
        spec = parse_preprocess(spec)
    resample = _RESAMPLE.get(spec.resample.lower())
    if resample is None:
        raise EngineError(f"manifest.json: preprocess.resample {spec.resample!r} is not one of "
                          f"{', '.join(_RESAMPLE)}; re-export the engine")
    im = load_image(image)
    if spec.pad_to_square:
        im = expand2square(im, pad_color(spec.mean))
    size = spec.image_size
    im = im.resize((size, size), resample=resample)
    x = np.asarray(im, dtype=np.float64) * spec.rescale  # (S, S, 3)
    x = x.astype(np.float32)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, S, S)

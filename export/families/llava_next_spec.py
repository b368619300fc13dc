"""LLaVA-NeXT's image preprocessing, read from a checkpoint's image processor into the manifest's
preprocess object (runtime.llava_next_preprocess.NextPreprocessSpec.to_json(); the family adds
"kind"), and the image processor of llava-hf/llava-v1.6-mistral-7b-hf for the tiny presets.

What LlavaNextImageProcessor(Pil) does with each setting, for one image (transformers 5.24):
- the pinpoint, the tiles (crop_size, or size when crop_size is unset) and the base image (size) are
  made whatever do_resize says; then each crop is resized to `size` (do_resize) and center-cropped to
  crop_size (do_center_crop). Both are no-ops exactly when size is crop_size (shortest_edge, or a
  height = width square): the only case the runtime reproduces;
- do_pad pads a batch to its largest crop count: nothing for one image;
- resample: the runtime reproduces bicubic and bilinear (Pillow's own filters; None means bilinear);
- do_rescale / rescale_factor, do_normalize / image_mean / image_std: recorded (1.0, 0 and 1 when off);
- do_convert_rgb=False is refused (the runtime always converts to RGB).
"""

from __future__ import annotations

from export.families.llava import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, PATCH_SIZE

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6's (height, width)
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's


def default_image_processor():
    """LlavaNextImageProcessorPil as llava-hf/llava-v1.6-mistral-7b-hf's preprocessor_config.json sets it
    up (the PIL backend, named explicitly: transformers picks torchvision's when it imports, and only
    PIL's is reproduced exactly; families.md pitfall 6)."""
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS, resample=3, do_resize=True, do_center_crop=True, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_pad=True,
        do_convert_rgb=True,
    )


def _square(size, what: str, name: str) -> int | None:
    """The side of a size setting: shortest_edge, or height == width; None when unset."""
    d = {k: v for k, v in dict(size or {}).items() if v is not None}
    if not d:
        return None
    if set(d) == {"shortest_edge"}:
        return int(d["shortest_edge"])
    if set(d) == {"height", "width"} and d["height"] == d["width"]:
        return int(d["height"])
    raise ValueError(f"{name}: {what} {d} is not a square side (shortest_edge, or height = width); "
                     "the runtime's preprocessing cannot reproduce it")


def _triple(x) -> list[float]:
    return [float(x)] * 3 if isinstance(x, (int, float)) else [float(v) for v in x]


def preprocess_spec(ip, patch: int = PATCH_SIZE) -> dict:
    """The manifest's LLaVA-NeXT preprocess object (without "kind") read from a checkpoint's
    LlavaNextImageProcessor(Pil); `patch` is the vision tower's patch size. ValueError, one line naming
    the setting, for a behaviour the runtime cannot reproduce."""
    from runtime.llava_next_preprocess import NextPreprocessSpec

    name = type(ip).__name__

    def refuse(what: str) -> ValueError:
        return ValueError(f"{name}: {what}; the runtime's preprocessing cannot reproduce it")

    if getattr(ip, "do_convert_rgb", True) is False:
        raise refuse("do_convert_rgb=False (the runtime always converts to RGB)")
    edge = _square(getattr(ip, "size", None), "size", name)
    crop = _square(getattr(ip, "crop_size", None), "crop_size", name) or edge
    if edge is None:
        raise refuse("size unset")
    if crop != edge:
        raise refuse(f"size {edge} != crop_size {crop} (each crop would be resized to {edge}, then "
                     f"{'center-cropped' if getattr(ip, 'do_center_crop', True) else 'left'} at {crop})")
    resample = _RESAMPLE_NAMES.get(2 if ip.resample is None else int(ip.resample))
    if resample not in ("bicubic", "bilinear"):
        raise refuse(f"resample {resample or ip.resample} (the runtime has bicubic, bilinear)")
    normalize = getattr(ip, "do_normalize", True)
    mean, std = (ip.image_mean, ip.image_std) if normalize else (0.0, 1.0)
    raw = {
        "crop_size": crop, "shortest_edge": edge,
        "pinpoints": [list(p) for p in (getattr(ip, "image_grid_pinpoints", None) or [])],
        "resample": resample,
        "rescale": float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0,
        "mean": _triple(mean), "std": _triple(std), "patch": int(patch),
    }
    try:
        return NextPreprocessSpec.from_json(raw).to_json()
    except ValueError as exc:
        raise refuse(str(exc)) from exc

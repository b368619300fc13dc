"""What differs between model families in a benchmark run: a table keyed by the manifest's family
name (FAMILIES[name], a dict lookup), so the runners and bench.run stay family-neutral.

Per family:
    inputs(builder, preprocess, image, prompt) -> Inputs
                      the prompt ids (image tokens expanded), the image span and the preprocessed
                      pixels every row shares; built once per run, outside every timed region
    engine_request(inputs) -> dict
                      the runtime Request's fields (Pipeline.prepare runs them, untimed)
    hf_kwargs(model, inputs, ids) -> dict
                      extra arguments of Hugging Face `generate` besides input_ids / pixel_values
    dart_kwargs(model, inputs, ids) -> dict
                      extra arguments of dart_ops.eager.EagerDart.generate (positions, image kwargs)
    flop_shape(shape, inputs) -> ModelShape
                      the family's flop_shape bound to this image (a Qwen tower's cost depends on it,
                      a LLaVA-NeXT tower's on its crop count)
    image_size        the bench image's default size (W, H) (None: the image as given)

These are the hooks export.families.Family could own (the table is the interim home of that logic).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.probes import BenchError

log = logging.getLogger(__name__)

NATIVE = (0, 0)  # BenchConfig.image_size: keep the image's own size, whatever the family's default
# W x H: examples/sample.png (480 x 320) scaled 2.275x: 52 x 78 patches = 26 x 39 = 1014 vision tokens when the
# engine's max_pixels admits them (>= 1014 * 28 * 28)
QWEN_IMAGE_SIZE = (1092, 728)
# W x H: a 672 px square is its own anyres pinpoint (2 x 2 tiles + the base image = 5 crops, nothing
# unpadded): 576 + 48 * (48 + 1) = 2928 vision tokens, LLaVA-NeXT's maximum (the DART paper's "2880-token"
# setting)
NEXT_IMAGE_SIZE = (672, 672)


@dataclass(frozen=True)
class Inputs:
    """What every row of one run is fed (built once, untimed)."""

    ids: list[int]  # (S,) the templated prompt, image tokens expanded
    span: tuple[int, int]  # (start, L) of the image tokens in ids
    pixels: np.ndarray  # the vision graph's pixel_values: LLaVA (1, 3, H, W); Qwen (N, 1176);
    # LLaVA-NeXT (crops, 3, 336, 336)
    image: Any  # the RGB PIL image the pixels come from (after the bench's resize)
    grid: tuple[int, int] | None = None  # Qwen: (gh, gw) patches of the resized image
    layout: Any = None  # LLaVA-NeXT: runtime.llava_next_preprocess.NextLayout of the resized image


@dataclass(frozen=True)
class BenchFamily:
    inputs: Callable[..., Inputs]
    engine_request: Callable[[Inputs], dict]
    hf_kwargs: Callable[[Any, Inputs, Any], dict]
    dart_kwargs: Callable[[Any, Inputs, Any], dict]
    flop_shape: Callable[[Any, Inputs], Any]
    image_size: tuple[int, int] | None = None


def _none(*_args) -> dict:
    return {}


# --- LLaVA-1.5: one fixed-size image, positions arange(S) ----------------------------------------------


def _llava_inputs(builder, preprocess, image, prompt: str) -> Inputs:
    from runtime.preprocess import preprocess as clip_preprocess
    from runtime.prompt import find_span

    ids = builder.encode(prompt, with_image=True)  # image token expanded to image_seq_len
    pixels = clip_preprocess(image, preprocess)  # (1, 3, H, W) float32
    return Inputs(ids, find_span(ids, builder.tokens.image_token_id), pixels, image)


LLAVA = BenchFamily(
    inputs=_llava_inputs,
    engine_request=lambda inp: {"input_ids": inp.ids, "pixel_values": inp.pixels},
    hf_kwargs=_none, dart_kwargs=_none,
    flop_shape=lambda shape, inp: shape,
)


# --- Qwen2-VL / Qwen2.5-VL: the image's own grid, M-RoPE positions ------------------------------------


def _qwen_inputs(builder, preprocess, image, prompt: str) -> Inputs:
    from runtime.prompt import expand_image_tokens, find_span
    from runtime.qwen_preprocess import image_tokens, smart_resize
    from runtime.qwen_preprocess import preprocess as qwen_preprocess

    spec = preprocess.image
    pixels, grid = qwen_preprocess(image, spec)  # (N, 1176), (gh, gw) patches
    L = image_tokens(grid, spec.merge)
    h, w = smart_resize(image.height, image.width, spec.factor, spec.min_pixels, max_pixels=1 << 62)
    uncapped = (h // spec.factor) * (w // spec.factor)  # the image's tokens without the engine's cap
    if uncapped > L:
        log.warning("bench: the %dx%d image gives %d vision tokens, not %d: the engine's max_pixels %d caps an image "
                    "at %d tokens", image.width, image.height, L, uncapped, spec.max_pixels,
                    spec.max_pixels // spec.factor ** 2)
    image_id = builder.tokens.image_token_id
    ids = expand_image_tokens(builder.encode(prompt, with_image=True), image_id, L)
    return Inputs(ids, find_span(ids, image_id), pixels, image, grid)


def _qwen_hf(model, inp: Inputs, ids) -> dict:
    """image_grid_thw and mm_token_type_ids (1 on the image tokens) as Qwen2VLProcessor returns them."""
    import torch

    grid = torch.tensor([[1, *inp.grid]], dtype=torch.long, device=ids.device)  # (1, 3)
    return {"image_grid_thw": grid, "mm_token_type_ids": (ids == model.config.image_token_id).long()}


def _qwen_dart(model, inp: Inputs, ids) -> dict:
    """Hugging Face's own M-RoPE ids (3, 1, S) and rope delta (get_rope_index), and the grid."""
    import torch

    hf = _qwen_hf(model, inp, ids)
    pos, delta = model.model.get_rope_index(ids, mm_token_type_ids=hf["mm_token_type_ids"],
                                            image_grid_thw=hf["image_grid_thw"], attention_mask=torch.ones_like(ids))
    return {"position_ids": pos, "rope_delta": int(delta.reshape(-1)[0]),
            "image_kwargs": {"image_grid_thw": hf["image_grid_thw"]}}


QWEN2_VL = BenchFamily(
    inputs=_qwen_inputs,
    engine_request=lambda inp: {"input_ids": inp.ids, "image": inp.image},  # the engine derives the grid
    hf_kwargs=_qwen_hf, dart_kwargs=_qwen_dart,
    flop_shape=lambda shape, inp: shape.with_grid(*inp.grid),
    image_size=QWEN_IMAGE_SIZE,
)


# --- LLaVA-NeXT: anyres crops of the image, its own token count, positions arange(S) -------------------


def _next_inputs(builder, preprocess, image, prompt: str) -> Inputs:
    from runtime.llava_next_preprocess import preprocess as next_preprocess
    from runtime.prompt import expand_image_tokens, find_span

    pixels, layout = next_preprocess(image, preprocess.image)  # (crops, 3, 336, 336) float32, L layout.tokens
    image_id = builder.tokens.image_token_id
    ids = expand_image_tokens(builder.encode(prompt, with_image=True), image_id, layout.tokens)
    return Inputs(ids, find_span(ids, image_id), pixels, image, layout=layout)


def _next_hf(model, inp: Inputs, ids) -> dict:
    """image_sizes [[H, W]] (the image's own size) as LlavaNextProcessor returns them. The runners pass
    pixel_values as the crops (crops, 3, 336, 336): get_image_features takes that stacked 4-D form as it
    is, and the processor's (1, crops, 3, 336, 336) as the same crops."""
    import torch

    return {"image_sizes": torch.tensor([inp.layout.original], dtype=torch.long, device=ids.device)}  # (1, 2)


LLAVA_NEXT = BenchFamily(
    inputs=_next_inputs,
    engine_request=lambda inp: {"input_ids": inp.ids, "image": inp.image},  # the engine derives the crops
    hf_kwargs=_next_hf,
    dart_kwargs=lambda model, inp, ids: {"image_kwargs": _next_hf(model, inp, ids)},  # to get_image_features
    flop_shape=lambda shape, inp: shape.with_crops(inp.pixels.shape[0], inp.span[1]),
    image_size=NEXT_IMAGE_SIZE,
)


FAMILIES: dict[str, BenchFamily] = {"llava": LLAVA, "qwen2_vl": QWEN2_VL, "llava_next": LLAVA_NEXT}


def for_family(name: str) -> BenchFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise BenchError(f"the benchmark has no inputs for model family {name!r} (known: "
                         f"{', '.join(FAMILIES)}); add it to bench/families.py") from None


def load_image(path, size: tuple[int, int] | None, family: BenchFamily):
    """The RGB image every row gets: `path` resized (bicubic) to `size` (W, H), or to the family's
    default size when `size` is None; NATIVE keeps it as it is."""
    from PIL import Image

    from runtime.preprocess import load_image as runtime_load

    image = runtime_load(path)
    size = family.image_size if size is None else size
    if size and size != NATIVE and size != image.size:
        image = image.resize(size, Image.BICUBIC)
    return image

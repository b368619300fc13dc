"""Qwen2-VL / Qwen2.5-VL run-time rules (manifest family "qwen2_vl"): one image per prompt at its
own resolution.

    image -> smart_resize within [min_pixels, max_pixels] -> patches (N, 1176), grid (gh, gw)
          -> vision graph inputs from the grid (runtime/qwen_vision.py) -> features (L, D), L = N / 4
    prompt: the chat template's one <|image_pad|> expanded to L; the span is that run
    positions: M-RoPE (3, 1, S) from the grid (get_rope_index's rule); decode step t at
               S + t + rope_delta in all three rows (S: the unpruned prompt)
    kept_positions: the decoder returns kept sequence indices directly

The manifest's "preprocess" object has kind "qwen2_vl": the image processor's numbers
(runtime/qwen_preprocess.py QwenPreprocessSpec) plus "vision": the vision graph's kind and window
size (runtime/qwen_vision.py QwenVisionConfig).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from runtime.errors import EngineError, InputError
from runtime.families import Positions, Span, VisionInput, np_dtype, place_features, register
from runtime.manifest import EXPORT_HINT, register_preprocess
from runtime.preprocess import ImageLike, load_image
from runtime.prompt import PromptBuilder, expand_image_tokens, find_span
from runtime.qwen_preprocess import QwenPreprocessSpec, decode_positions, mrope_positions, preprocess
from runtime.qwen_vision import QwenVisionConfig, vision_inputs

KIND = "qwen2_vl"


@dataclass(frozen=True)
class QwenSpec:
    """The manifest's "preprocess" object of kind "qwen2_vl"."""

    image: QwenPreprocessSpec
    vision: QwenVisionConfig

    def to_json(self) -> dict:
        return {"kind": KIND, **self.image.to_json(), "vision": asdict(self.vision)}

    @classmethod
    def from_json(cls, raw: dict) -> QwenSpec:
        """ValueError (one line) for anything the runtime cannot use."""
        rest = {k: v for k, v in raw.items() if k not in ("kind", "vision")}
        image = QwenPreprocessSpec.from_json(rest)
        v = raw.get("vision")
        if not isinstance(v, dict):
            raise ValueError("'preprocess.vision' must be an object (kind, patch, merge, temporal, channels, "
                             "window_size)")
        try:
            vision = QwenVisionConfig(**v)
        except TypeError as exc:
            raise ValueError(f"'preprocess.vision': {exc}") from None
        for key in ("patch", "merge", "temporal"):
            if getattr(vision, key) != getattr(image, key):
                raise ValueError(f"'preprocess.vision.{key}' {getattr(vision, key)} differs from "
                                 f"'preprocess.{key}' {getattr(image, key)}")
        return cls(image, vision)


register_preprocess(KIND, QwenSpec.from_json)


@register(KIND)
class QwenRules:
    """Qwen2-VL / Qwen2.5-VL: one image per prompt, L = gh * gw / merge^2 tokens each."""

    def __init__(self, manifest, prompt: PromptBuilder):
        if not isinstance(manifest.preprocess, QwenSpec):
            raise EngineError(f"manifest.json: a qwen2_vl engine needs a 'preprocess' of kind {KIND!r}; re-export "
                              f"the engine with: {EXPORT_HINT}")
        self.manifest, self.prompt, self.spec = manifest, prompt, manifest.preprocess
        stage = manifest.stages["vision_encoder"]
        self.input_names = [t.name for t in stage.inputs]
        self.pixel_dtype = np_dtype(stage.inputs[0].dtype, "vision_encoder")
        axis = manifest.dynamic_axes.get("vision_tokens")
        self.max_tokens = axis.max if axis else manifest.dart.max_span

    def vision_inputs(self, image: ImageLike | None, pixel_values) -> VisionInput | None:
        if pixel_values is not None:
            raise InputError("a Qwen engine takes image= (it derives the patch grid from the image); "
                             "pixel_values= is for fixed-size engines")
        if image is None:
            return None
        im = load_image(image)
        pixels, (gh, gw) = preprocess(im, self.spec.image)  # (N, 1176), grid in patches
        L = gh * gw // self.spec.image.merge ** 2
        if L > self.max_tokens:  # the processor caps max_pixels; the engine was exported for fewer
            raise InputError(f"the image gives {L} vision tokens, more than this engine's {self.max_tokens}")
        feeds = {"pixel_values": pixels.astype(self.pixel_dtype, copy=False),
                 **vision_inputs(gh, gw, self.spec.vision)}
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise EngineError(f"vision_encoder takes inputs {missing} this runtime does not compute; re-export")
        return VisionInput({n: feeds[n] for n in self.input_names}, (L,), grids=((gh, gw),), image=im,
                           layout=im.size)

    def regions(self, vision: VisionInput) -> list:
        """28 x 28 px merged patches over the resized image, in the input image's pixels."""
        from runtime.kept_image import qwen_panels

        (gh, gw), patch = vision.grids[0], self.spec.image.patch
        return qwen_panels(*vision.layout, (gh * patch, gw * patch), (gh, gw), self.spec.image.merge)

    def prompt_ids(self, text: str | None, ids: list[int] | None, vision: VisionInput | None) -> list[int]:
        """The chat template around `text`, or checked `ids`; the one <|image_pad|> expanded to the
        image's L tokens (ids may also hold the run of exactly L)."""
        ids = self.prompt.encode(text, vision is not None) if text is not None else list(ids)
        if vision is None:
            return ids
        return expand_image_tokens(ids, self.manifest.tokens.image_token_id, vision.tokens[0])

    def spans(self, ids: Sequence[int]) -> tuple[Span, ...]:
        start, length = find_span(ids, self.manifest.tokens.image_token_id)
        return ((start, length),) if length else ()

    @staticmethod
    def place(embeds: np.ndarray, features: np.ndarray, spans: Sequence[Span]) -> np.ndarray:
        return place_features(embeds, features[None] if features.ndim == 2 else features, spans)  # (1, S, D)

    def positions(self, ids: Sequence[int], spans: Sequence[Span], vision: VisionInput | None) -> Positions:
        grid = vision.grids[0] if vision is not None and spans else None
        pos, delta = mrope_positions(ids, self.manifest.tokens.image_token_id, grid, self.spec.image.merge)
        return Positions(pos, len(ids) + delta)  # (3, 1, S); decode step t at S + t + rope_delta

    @staticmethod
    def decode_positions(position: int) -> np.ndarray:
        return decode_positions(position, 0, 0)  # (3, 1, 1), all rows equal

    @staticmethod
    def kept_indices(kept: np.ndarray, positions: Positions) -> list[int]:
        """The decoder's kept output is already sequence indices (ascending, < S)."""
        S = positions.prefill.shape[-1]
        if kept.size and (kept.min() < 0 or kept.max() >= S or np.any(np.diff(kept) <= 0)):
            raise EngineError(f"decoder returned kept indices {kept.tolist()[:8]}... that are not ascending "
                              f"indices of the {S}-token prompt; the engine is corrupt: re-export")
        return [int(i) for i in kept]

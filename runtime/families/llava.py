"""LLaVA-1.5's run-time rules: one image, preprocessed to one square crop (runtime/preprocess.py),
expanded to tokens.image_seq_len image tokens by the chat template; its features replace that one
run of image tokens; positions are arange(S) in prefill and S + t at decode step t; the decoder's
kept_positions are the kept tokens' position ids, which arange(S) makes the sequence indices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.errors import EngineError, InputError
from runtime.families import (
    Positions,
    Span,
    VisionInput,
    as_array,
    indices_of_positions,
    np_dtype,
    place_features,
    register,
)
from runtime.manifest import EXPORT_HINT, PreprocessSpec
from runtime.preprocess import ImageLike, load_image, preprocess
from runtime.prompt import PromptBuilder, find_span


@register("llava")
class LlavaRules:
    """LLaVA-1.5 (llava-hf/llava-1.5-*): one image per prompt, image_seq_len tokens each."""

    def __init__(self, manifest, prompt: PromptBuilder):
        if manifest.tokens.image_seq_len is None or not isinstance(manifest.preprocess, PreprocessSpec):
            raise EngineError("manifest.json: a LLaVA-1.5 engine needs 'tokens.image_seq_len' and a clip "
                              f"'preprocess'; re-export the engine with: {EXPORT_HINT}")
        self.manifest, self.prompt = manifest, prompt
        spec = manifest.stages["vision_encoder"].inputs[0]
        self.pixel_name, self.pixel_dtype = spec.name, np_dtype(spec.dtype, "vision_encoder")

    def vision_inputs(self, image: ImageLike | None, pixel_values) -> VisionInput | None:
        """The vision graph's feeds for `image` (preprocessed here) or checked `pixel_values`."""
        if image is not None and pixel_values is not None:
            raise InputError("give either image or pixel_values, not both")
        tokens = (self.manifest.tokens.image_seq_len,)
        if image is not None:
            im = load_image(image)
            pixels = preprocess(im, self.manifest.preprocess).astype(self.pixel_dtype, copy=False)
            return VisionInput({self.pixel_name: pixels}, tokens, image=im, layout=im.size)
        pixels = self._pixels(pixel_values)
        return None if pixels is None else VisionInput({self.pixel_name: pixels}, tokens)

    def regions(self, vision: VisionInput) -> list:
        """The image_size / patch grid over the processed square, in the input image's pixels."""
        from runtime.kept_image import llava_panels

        grid = int(round(self.manifest.tokens.image_seq_len ** 0.5))
        return llava_panels(self.manifest.preprocess, *vision.layout, grid=grid)

    def _pixels(self, pixel_values) -> np.ndarray | None:
        if pixel_values is None:
            return None
        size = self.manifest.preprocess.image_size
        want = f"a float array [1, 3, {size}, {size}]"
        pv = as_array(pixel_values, "pixel_values", want)
        if pv.shape != (1, 3, size, size) or not np.issubdtype(pv.dtype, np.floating):
            raise InputError(f"pixel_values must be {want}, got {pv.dtype} {list(pv.shape)}")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused below
            pv = pv.astype(self.pixel_dtype, copy=False)  # (1, 3, H, W): small, the shape is checked
        if not np.isfinite(pv).all():
            raise InputError(f"pixel_values hold NaN or infinite values (as {pv.dtype}); give finite, normalised "
                             "pixels (or pass image= and let the engine preprocess it)")
        return pv

    def prompt_ids(self, text: str | None, ids: list[int] | None, vision: VisionInput | None) -> list[int]:
        """The chat template around `text`, or checked `ids`; one image token expanded to image_seq_len."""
        if text is not None:
            return self.prompt.encode(text, vision is not None)
        return self.prompt.expand(ids)

    def spans(self, ids: Sequence[int]) -> tuple[Span, ...]:
        start, length = find_span(ids, self.manifest.tokens.image_token_id)
        return ((start, length),) if length else ()

    @staticmethod
    def place(embeds: np.ndarray, features: np.ndarray, spans: Sequence[Span]) -> np.ndarray:
        return place_features(embeds, features, spans)  # (1, S, D)

    @staticmethod
    def positions(ids: Sequence[int], spans: Sequence[Span], vision: VisionInput | None) -> Positions:
        S = len(ids)
        return Positions(np.arange(S, dtype=np.int32)[None], S)  # (1, S) int32 (INDEX_DTYPE); decode step t at S + t

    @staticmethod
    def decode_positions(position: int) -> np.ndarray:
        return np.array([[position]], dtype=np.int32)  # (1, 1)

    @staticmethod
    def kept_indices(kept: np.ndarray, positions: Positions) -> list[int]:
        return indices_of_positions(kept, positions.prefill)

"""LLaVA-NeXT run-time rules (manifest family "llava_next"): one image per prompt, tiled "anyres".

    image -> best pinpoint, resize, pad, 336 px tiles + the base image (runtime/llava_next_preprocess.py)
          -> pixel_values (crops, 3, 336, 336) and pack_index (L,) -> vision graph -> features (1, L, D)
    prompt: the chat template's one <image> expanded to the image's L tokens (L = 576 + h'(w' + 1)
            varies with the image's size and aspect); the span is that run (base, tiles, newlines)
    positions: arange(S); decode step t at S + t (as LLaVA-1.5)
    kept_positions: the kept tokens' position ids = their sequence indices

The manifest's "preprocess" object has kind "llava_next": runtime/llava_next_preprocess.py's
NextPreprocessSpec (crop size, grid pinpoints, resampling, mean/std).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import EngineError, InputError
from runtime.families import VisionInput, np_dtype, register
from runtime.families.llava import LlavaRules
from runtime.llava_next_preprocess import NextLayout, NextPreprocessSpec, pack_index, preprocess
from runtime.manifest import EXPORT_HINT, register_preprocess
from runtime.preprocess import ImageLike, load_image
from runtime.prompt import PromptBuilder, expand_image_tokens

KIND = "llava_next"


@dataclass(frozen=True)
class NextSpec:
    """The manifest's "preprocess" object of kind "llava_next"."""

    image: NextPreprocessSpec

    def to_json(self) -> dict:
        return {"kind": KIND, **self.image.to_json()}

    @classmethod
    def from_json(cls, raw: dict) -> NextSpec:
        """ValueError (one line) for anything the runtime cannot use."""
        return cls(NextPreprocessSpec.from_json({k: v for k, v in raw.items() if k != "kind"}))


register_preprocess(KIND, NextSpec.from_json)


@register(KIND)
class LlavaNextRules(LlavaRules):
    """LLaVA-NeXT (llava-hf/llava-v1.6-*): one image per prompt, L tokens from its size. Spans,
    placement, positions and kept indices are LLaVA-1.5's (inherited)."""

    def __init__(self, manifest, prompt: PromptBuilder):
        if not isinstance(manifest.preprocess, NextSpec):
            raise EngineError(f"manifest.json: a llava_next engine needs a 'preprocess' of kind {KIND!r}; "
                              f"re-export the engine with: {EXPORT_HINT}")
        self.manifest, self.prompt, self.spec = manifest, prompt, manifest.preprocess.image
        stage = manifest.stages["vision_encoder"]
        self.input_names = [t.name for t in stage.inputs]
        if sorted(self.input_names) != ["pack_index", "pixel_values"]:
            raise EngineError(f"vision_encoder takes inputs {self.input_names}; a llava_next engine takes "
                              "pixel_values and pack_index: re-export")
        self.pixel_dtype = np_dtype(stage.input("pixel_values").dtype, "vision_encoder")
        tokens, crops = manifest.dynamic_axes.get("vision_tokens"), manifest.dynamic_axes.get("crops")
        self.max_tokens = tokens.max if tokens else manifest.dart.max_span
        self.max_crops = crops.max if crops else None

    def vision_inputs(self, image: ImageLike | None, pixel_values) -> VisionInput | None:
        if pixel_values is not None:
            raise InputError("a LLaVA-NeXT engine takes image= (its tiling and token count follow the image's "
                             "size); pixel_values= is for fixed-size engines")
        if image is None:
            return None
        im = load_image(image)
        pixels, lay = preprocess(im, self.spec)  # (crops, 3, 336, 336)
        if lay.tokens > self.max_tokens or (self.max_crops and lay.crops > self.max_crops):
            raise InputError(f"the image gives {lay.crops} crops and {lay.tokens} vision tokens, more than this "
                             f"engine's {self.max_crops} crops / {self.max_tokens} tokens")
        feeds = {"pixel_values": pixels.astype(self.pixel_dtype, copy=False), "pack_index": pack_index(lay)}
        return VisionInput(feeds, (lay.tokens,), image=im, layout=lay)

    def prompt_ids(self, text: str | None, ids: list[int] | None, vision: VisionInput | None) -> list[int]:
        """The chat template around `text`, or checked `ids`; the one <image> expanded to the image's L
        tokens (ids may also hold the run of exactly L)."""
        ids = self.prompt.encode(text, vision is not None) if text is not None else list(ids)
        if vision is None:
            return ids
        return expand_image_tokens(ids, self.manifest.tokens.image_token_id, vision.tokens[0])

    @staticmethod
    def regions(vision: VisionInput) -> list:
        """Two panels: the base image's grid over the whole image, and the unpadded tile grid."""
        from runtime.kept_image import next_panels

        lay: NextLayout = vision.layout
        h, w = lay.original
        return next_panels(lay, w, h)

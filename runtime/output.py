"""What generate() returns, and how its text reaches a `stream` callback as it is generated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.errors import InputError


@dataclass(frozen=True)
class GenerateOutput:
    """What generate() returns.

    token_ids:      generated ids only, without the prompt and without the final eos (if reached).
    text:           token_ids decoded, special tokens skipped.
    kept_positions: SEQUENCE indices into the unpruned prompt of the tokens the decoder kept at
                    layer K (all of them when not pruned), ascending, for every family.
    timings:        vision_ms, embed_ms, prefill_ms, decode_ms, total_ms (and preprocess_ms),
                    tokens_per_s (decode steps per second after prefill), prompt_tokens,
                    kept_tokens, vision_tokens, kept_vision_tokens, new_tokens, decode_steps,
                    kv_bytes (bytes of the KV cache after prefill, both layer groups),
                    max_new_tokens (the limit used: the one asked for, or less when capped to
                    max_context - prompt_tokens).
    keep_ratio:     the ratio used (None when the request gave keep_tokens).
    first_logits:   (V,) float32 logits of the prefill step (what chose the first new token).
    image_pivots:   SEQUENCE indices of the image pivots DART chose (best first; empty when it did
                    not prune or the engine predates the output).
    view:           what kept_image() draws (None for a text-only prompt or pixel_values input).
    """

    token_ids: list[int]
    text: str
    kept_positions: list[int]
    timings: dict[str, float]
    keep_ratio: float | None
    first_logits: np.ndarray | None = None
    image_pivots: list[int] = field(default_factory=list)
    view: KeptView | None = field(default=None, repr=False)

    def kept_image(self, max_side: int = 768):
        """The input image with the regions of pruned vision tokens dimmed and the image pivots
        outlined, one panel per token grid of the family, and a caption (PIL.Image.Image, RGB;
        runtime/kept_image.py). InputError when the request had no image to draw on."""
        if self.view is None:
            raise InputError("nothing to draw: the request had no image (or gave pixel_values, which carry no "
                             "original image); pass image=")
        return self.view.render(max_side)


@dataclass(frozen=True)
class KeptView:
    """One request's picture inputs: the RGB image, its token regions (a callable returning
    runtime.kept_image.Panel objects, evaluated only when drawn), the image span (start, L), the kept
    sequence indices, the image pivots' sequence indices, and the caption (render adds the pivots)."""

    image: Any
    regions: Callable[[], list]
    span: tuple[int, int]
    kept: list[int]
    pivots: list[int]
    caption: str

    def render(self, max_side: int = 768):
        from runtime.kept_image import masks, render

        kept, pivots = masks(self.span[1], self.span[0], self.kept, self.pivots)
        panels = self.regions()
        drawn = {int(t) for p in panels for t in p.tokens}
        hidden = sum(1 for i in self.pivots if i - self.span[0] not in drawn)
        caption = self.caption
        if self.pivots:
            caption += f", {len(self.pivots) - hidden} image pivots outlined"
            caption += f" ({hidden} more on tokens without a region: newline tokens)" if hidden else ""
        return render(self.image, panels, kept, pivots, caption, max_side=max_side)


def cap_new_tokens(max_new_tokens: int, prompt_tokens: int, max_context: int) -> int:
    """How many tokens generate() may add: prompt + new tokens fit the engine's max_context (the KV
    cache's length bound), as transformers' generate stops at max_length. 0 when the prompt fills it."""
    return max(0, min(max_new_tokens, max_context - prompt_tokens))


class Streamer:
    """Incremental detokenisation: decode all generated ids, emit the new suffix. Holds back text
    ending in U+FFFD (a multi-byte character cut in the middle) until it completes."""

    def __init__(self, decode: Callable[[list[int]], str], sink: Callable[[str], None]):
        self.decode = decode
        self.sink = sink
        self.sent = ""

    def push(self, tokens: list[int]) -> None:
        text = self.decode(tokens)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def finish(self, text: str) -> None:
        self._emit(text)

    def _emit(self, text: str) -> None:
        if len(text) > len(self.sent):
            self.sink(text[len(self.sent):])
            self.sent = text

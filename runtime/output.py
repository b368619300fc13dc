"""What generate() returns, and how its text reaches a `stream` callback as it is generated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


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
    """

    token_ids: list[int]
    text: str
    kept_positions: list[int]
    timings: dict[str, float]
    keep_ratio: float | None
    first_logits: np.ndarray | None = None


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

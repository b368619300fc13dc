"""What passes between generate's steps (runtime/pipeline.py): Request (the arguments as given)
-> prepare -> Prompt (checked, tokenized, spans and positions fixed) -> prefill -> State (the KV
loop, the latest logits, the kept sequence indices) -> decode_step -> State."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dart_ops.spec import Counts
from runtime.families import Positions, Span, VisionInput
from runtime.preprocess import ImageLike
from runtime.sampling import Sampler
from runtime.stage import KVLoop


@dataclass(frozen=True)
class Request:
    """One generate() call's arguments, as given (prepare checks them; see Pipeline.generate)."""

    prompt: str | None = None
    image: ImageLike | None = None
    input_ids: Sequence[int] | np.ndarray | None = None
    pixel_values: np.ndarray | None = None
    keep_ratio: float | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: Callable[[str], None] | None = None
    ignore_eos: bool = False
    keep_tokens: int | None = None  # an absolute budget instead of keep_ratio


@dataclass(frozen=True)
class Prompt:
    """A checked request, ready for prefill. ids: the full prompt (S), image tokens expanded;
    vision: the vision graph's feeds (None: text only); spans: (start, length) of each image's
    tokens; span: the one DART prunes ((0, 0): none); positions: prefill ids and decode start;
    counts: DART's numbers for `ratio` (or `keep_tokens`); max_new_tokens: capped to the engine's
    max_context. ratio is None when the request gave keep_tokens."""

    ids: list[int]
    vision: VisionInput | None
    spans: tuple[Span, ...]
    span: Span
    positions: Positions
    ratio: float | None
    counts: Counts
    max_new_tokens: int
    sampler: Sampler
    stream: Callable[[str], None] | None
    ignore_eos: bool

    @property
    def span_len(self) -> int:
        """The span length fed to the decoder: 0 when DART does not prune (nothing to prune). The
        counts are those of the span as the decoder clamps it (dart_ops.spec.decoder_span: the last
        prompt token is never pruned), so this may be one less than span[1]."""
        return self.counts.span_len if self.counts.prune else 0

    @property
    def kept_len(self) -> int:
        """S', the prefill's kept length (the decoder's kept_slots length): S when nothing is pruned."""
        return self.counts.kept_len(len(self.ids)) if self.counts.prune else len(self.ids)


@dataclass
class State:
    """One generation after prefill: the decoder's KV loop, the latest logits (V,), the kept
    SEQUENCE indices into the unpruned prompt, decode steps run so far, and prefill's timings."""

    prompt: Prompt
    loop: KVLoop
    logits: np.ndarray
    kept: list[int]
    kv_bytes: int
    steps: int = 0
    vision_s: float = 0.0
    embed_s: float = 0.0
    prefill_s: float = 0.0
    pivots: list[int] = field(default_factory=list)  # image pivots' sequence indices (none if not pruned)
    finish: str = "length"  # why Pipeline.tokens stopped: "stop" (an eos token) or "length"



def step_timings(p: Prompt, state: State, tokens: list[int], pre_s: float, decode_s: float,
             total_s: float) -> dict[str, float]:
    """generate()'s timings (GenerateOutput.timings) from its prompt, state and new tokens."""
    steps = state.steps
    in_span = sum(1 for i in state.kept if any(a <= i < a + n for a, n in p.spans))
    return {
        "preprocess_ms": 1e3 * pre_s,
        "vision_ms": 1e3 * state.vision_s,
        "embed_ms": 1e3 * state.embed_s,
        "prefill_ms": 1e3 * state.prefill_s,
        "decode_ms": 1e3 * decode_s,
        "total_ms": 1e3 * total_s,
        "tokens_per_s": steps / decode_s if steps and decode_s > 0 else 0.0,
        "prompt_tokens": len(p.ids),
        "kept_tokens": len(state.kept),
        "vision_tokens": sum(n for _, n in p.spans),
        "kept_vision_tokens": in_span,
        "new_tokens": len(tokens),
        "decode_steps": steps,
        "kv_bytes": state.kv_bytes,
        "max_new_tokens": p.max_new_tokens,
    }

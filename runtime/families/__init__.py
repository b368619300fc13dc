"""Run-time rules per model family, chosen by a dict lookup on manifest.family.

    rules = rules_for(manifest, prompt_builder)   # EngineError for a family this runtime lacks
    vision = rules.vision_inputs(image, pixel_values)    # preprocessing -> the vision graph's feeds
    ids = rules.prompt_ids(text, input_ids, vision)      # chat template, image tokens expanded
    spans = rules.spans(ids)                             # where the vision features go
    embeds = rules.place(embeds, features, spans)        # the features spliced into the embeddings
    pos = rules.positions(ids, spans, vision)            # prefill position ids, decode start
    rules.decode_positions(pos.decode_start + t)         # decode step t
    rules.kept_indices(kept_positions, pos)              # the decoder's kept output -> sequence indices
    rules.regions(vision)                                # runtime.kept_image.Panel list: token -> image area

One module per family registers its rules class with @register("name"). What the next families
need (../shared/notes/families.md): Qwen2-VL's positions are [3, B, S] with decode at
S + t + rope_delta (Positions.decode_start = S + rope_delta) and its graph returns kept indices
(runtime/families/qwen2_vl.py); LLaVA-NeXT has a variable number of vision tokens per image
(VisionInput.tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import EngineError, InputError
from runtime.sampling import describe

Span = tuple[int, int]  # (start, length) of one image's tokens in the prompt


@dataclass(frozen=True)
class VisionInput:
    """One request's images as the vision graph takes them.

    feeds:  the vision graph's inputs by name (LLaVA-1.5: pixel_values (1, 3, H, W)).
    tokens: vision tokens each image becomes in the prompt, in order (LLaVA-1.5: (image_seq_len,)).
    grids:  each image's patch grid (gh, gw), for families whose positions depend on it (Qwen).
    image:  the RGB PIL image the feeds come from (None for pixel_values given directly): what the
            kept-token picture draws on.
    layout: the family's geometry of that image (what its `regions` maps tokens to image areas with)."""

    feeds: dict[str, np.ndarray]
    tokens: tuple[int, ...]
    grids: tuple[tuple[int, int], ...] = ()
    image: Any = None
    layout: Any = None


@dataclass(frozen=True)
class Positions:
    """Position ids of one prompt: `prefill` as the decoder takes them ((1, S), or (3, 1, S) for
    M-RoPE); decode step t (t = 0 for the first generated token) is at decode_start + t."""

    prefill: np.ndarray
    decode_start: int


def np_dtype(name: str, where: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError as exc:
        raise EngineError(f"{where}: dtype {name!r} is not supported by the numpy runtime") from exc


def as_array(value, name: str, want: str) -> np.ndarray:
    """np.asarray, with numpy's errors on ragged nested lists turned into InputError."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError):
        raise InputError(f"{name} must be {want}, got {describe(value)}, not a rectangular array") from None


def place_features(embeds: np.ndarray, features: np.ndarray, spans: Sequence[Span]) -> np.ndarray:
    """embeds (1, S, D) with features (1, N, D) written over the spans, in order (N = their total
    length); EngineError when the vision graph's output does not fit the spans."""
    n = sum(length for _, length in spans)
    if features.shape[0] != 1 or features.shape[1] != n or features.shape[2] != embeds.shape[2]:
        raise EngineError(f"vision_encoder returned features {list(features.shape)} for {n} image tokens "
                          f"of width {embeds.shape[2]} (tokens.image_seq_len disagrees); re-export")
    embeds = embeds.copy()
    at = 0
    for start, length in spans:
        embeds[0, start:start + length] = features[0, at:at + length]  # (L, D)
        at += length
    return embeds


def indices_of_positions(kept: np.ndarray, prefill: np.ndarray) -> list[int]:
    """Sequence indices of the kept tokens, from their position ids (kept (S',), prefill (1, S)
    ascending): the index where each kept position sits in the prompt's positions."""
    pos = prefill[0]
    idx = np.searchsorted(pos, kept)  # (S',)
    if kept.size and (idx.max() >= pos.size or not np.array_equal(pos[idx], kept)):
        raise EngineError(f"decoder returned kept_positions {kept.tolist()[:8]}... that are not positions of "
                          "the prompt; the engine is corrupt: re-export")
    return [int(i) for i in idx]


_RULES: dict[str, Callable] = {}
def register(name: str):
    """Class decorator: the run-time rules of family `name` (built as cls(manifest, prompt_builder))."""
    def add(cls):
        if name in _RULES:
            raise ValueError(f"run-time rules for family {name!r} are registered twice")
        _RULES[name] = cls
        return cls
    return add


def unregister(name: str) -> None:
    """Remove a family's rules (tests that register rules of their own clean up with this)."""
    _RULES.pop(name, None)


def families() -> list[str]:
    """Families this runtime has rules for."""
    return sorted(_RULES)


def rules_class(family: str):
    """The rules class of `family`; EngineError (one line) naming the known families otherwise."""
    cls = _RULES.get(family)
    if cls is None:
        raise EngineError(f"manifest.json: family {family!r} has no run-time rules in this runtime (known: "
                          f"{', '.join(families())}); use a runtime that supports it or re-export")
    return cls


def rules_for(manifest, prompt):
    """The run-time rules of manifest.family, for this engine's manifest and PromptBuilder."""
    return rules_class(manifest.family)(manifest, prompt)


from runtime.families import llava, llava_next, qwen2_vl  # noqa: F401, E402  (registers the built-in families)

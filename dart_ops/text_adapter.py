"""What DART's decoder needs of a Hugging Face text model: one adapter per text model_type.

`DartDecoder` (dart_ops/decoder.py) and `EagerDart` (dart_ops/eager.py) run a decoder stack
layer by layer and prune between layers K-1 and K. Everything they know about the stack comes
from a `TextAdapter`:

    layers, norm, embed, lm_head, rotary_emb   the HF modules (norm: the FINAL RMSNorm)
    dims / kv_dims()                           sizes from the HF config (flops.TextShape)
    position_shape                             ("batch", "seq") or (3, "batch", "seq") (M-RoPE)
    rotary(h, position_ids) -> (cos, sin)      (B, S, dh) each, from ids of that layout
    positions(pos)                             (B, S) plain positions -> ids of that layout
    gather_positions((cos, sin), keep)         the kept tokens' rows: they keep ORIGINAL positions
    kept_positions(position_ids, keep)         the decoder graph's `kept_positions` output
    run_layer(layer, h, mask, cache, cos_sin)  one layer with an explicit cache object
    scoring_keys(keys)                         layer K-1's post-RoPE keys -> DART's (B, S, Hkv*dh)
    sliding_window                             None, or the window the stack was trained with

Where the scoring keys come from: every supported attention applies RoPE to its keys and hands
them to `cache.update(key, value, layer_idx)`; the decoder's cache stand-in records them there.

A family picks nothing by hand: `for_model(text_model, lm_head)` looks the adapter up by the text
config's `model_type`. Registered:
    llama, mistral, qwen2                    1-D RoPE, position_ids (B, S)
    qwen2_vl_text, qwen2_5_vl_text           M-RoPE, position_ids (3, B, S) (rows T, H, W); HF's
    (+ qwen2_vl, qwen2_5_vl: older names)    rotary module turns them into one (cos, sin) of
                                             (B, S, dh), so from there on it is the 1-D path
Planned, refused with NotImplementedError: qwen3_vl_text (see `_PLANNED`).
"""

from __future__ import annotations

import inspect

import torch

from dart_ops.flops import TextShape

_ADAPTERS: dict[str, type[TextAdapter]] = {}

# model_type -> why it is not supported yet, and the plan.
_PLANNED = {
    "qwen3_vl_text": (
        "Qwen3-VL needs a per-layer additive input on DartDecoder first: its deepstack features "
        "[3, B, S, D] are added to the vision positions after layers 0-2 and must be gathered by the "
        "kept indices behind DartPrune (../shared/notes/families.md, section 5). Its interleaved "
        "M-RoPE is inside HF's rotary module and its q/k norms come before RoPE, so MRopeAdapter "
        "fits once the decoder has that input"
    ),
}
_PLANNED["qwen3_vl"] = _PLANNED["qwen3_vl_text"]


def register(*model_types: str):
    """Class decorator: use this adapter for text configs of these model types."""

    def add(cls):
        for model_type in model_types:
            if model_type in _ADAPTERS:
                raise ValueError(f"a text adapter for model_type {model_type!r} is already registered")
            _ADAPTERS[model_type] = cls
        return cls

    return add


def supported() -> list[str]:
    return sorted(_ADAPTERS)


def for_model(text_model: torch.nn.Module, lm_head: torch.nn.Module) -> TextAdapter:
    """The adapter of a HF decoder stack (e.g. LlamaModel: .layers, .norm, .rotary_emb) and its
    LM head, by the stack's config.model_type."""
    model_type = getattr(getattr(text_model, "config", None), "model_type", None)
    if model_type in _PLANNED:
        raise NotImplementedError(f"DART text model_type {model_type!r} is not supported yet: "
                                  f"{_PLANNED[model_type]}")
    if model_type not in _ADAPTERS:
        raise ValueError(f"no DART text adapter for model_type {model_type!r} (supported: "
                         f"{', '.join(supported())}); register one in dart_ops/text_adapter.py")
    return _ADAPTERS[model_type](text_model, lm_head)


def _cache_kwarg(layer: torch.nn.Module) -> str:
    """The name under which this transformers version's decoder layer takes its cache: `cache`
    (5.x; `past_key_values` is deprecated there and goes in 5.40), else the older names."""
    params = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    raise ValueError(f"{type(layer).__name__}.forward takes no cache argument; cannot run it with DART")


@register("llama", "mistral", "qwen2")
class TextAdapter:
    """A Llama-style stack with 1-D RoPE: position_ids (B, S)."""

    position_shape: tuple = ("batch", "seq")

    def __init__(self, text_model: torch.nn.Module, lm_head: torch.nn.Module):
        self.config = text_model.config
        self.layers = text_model.layers
        self.norm = text_model.norm
        self.rotary_emb = text_model.rotary_emb
        self.embed = text_model.get_input_embeddings()
        self.lm_head = lm_head
        self.dims = TextShape.from_config(self.config.to_dict())
        self._cache_kwarg = _cache_kwarg(self.layers[0])
        self._check_modules()

    def _check_modules(self) -> None:
        """The config's sizes are the modules' sizes (the graph's KV inputs are declared from them)."""
        d, attn = self.dims, self.layers[0].self_attn
        found = {
            "num_hidden_layers": (d.layers, len(self.layers)),
            "head_dim": (d.head_dim, attn.head_dim),
            "num_key_value_heads * head_dim": (d.kv_heads * d.head_dim, attn.k_proj.out_features),
            "hidden_size": (d.hidden, self.norm.weight.shape[0]),
            "vocab_size": (d.vocab, self.lm_head.out_features),
        }
        bad = [f"{k} {want} (modules: {got})" for k, (want, got) in found.items() if want != got]
        if bad:
            raise ValueError(f"{self.config.model_type} config does not match its modules: {'; '.join(bad)}")

    # --- sizes --------------------------------------------------------------------------------------

    def kv_dims(self) -> dict:
        """The decoder graph's sizes, as the manifest's "decoder" object names them."""
        d = self.dims
        return {"num_layers": d.layers, "num_kv_heads": d.kv_heads, "head_dim": d.head_dim,
                "hidden_size": d.hidden, "vocab_size": d.vocab}

    @property
    def sliding_window(self) -> int | None:
        """The attention window of the stack, None for full attention. DartDecoder's causal mask
        has no window: a context longer than this would differ from the model, so callers cap it."""
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)  # qwen2: windows only where declared
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        return window

    @property
    def attn_implementation(self) -> str:
        """Read at call time: export switches it to "eager" for the duration of a trace."""
        return getattr(self.layers[0].self_attn.config, "_attn_implementation", "eager")

    # --- positions ----------------------------------------------------------------------------------

    @property
    def mrope(self) -> bool:
        return len(self.position_shape) == 3

    def positions(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, S) plain positions (text-only prompts, decode steps) -> ids of the declared layout."""
        return pos

    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B, S, dh), for hidden states h (B, S, D) at `position_ids`."""
        if position_ids.dim() != len(self.position_shape):
            raise ValueError(f"{self.config.model_type} takes position_ids of shape "
                             f"{list(self.position_shape)}, got {list(position_ids.shape)}")
        return self.rotary_emb(h, position_ids)

    @staticmethod
    def gather_positions(cos_sin: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor):
        """The rows of the kept tokens (B, S') of (cos, sin) (B, S, dh): each kept token keeps the
        rotary of its original position (for M-RoPE too: it is the authors' position_ids[..., keep]
        followed by recomputing the rotary)."""
        idx = keep.unsqueeze(-1)  # (B, S', 1)
        return tuple(torch.gather(t, 1, idx.expand(-1, -1, t.shape[-1])) for t in cos_sin)

    def kept_positions(self, position_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The graph's kept_positions (B, S'): the kept tokens' position ids. With a prefill's
        arange(S) positions these are the kept sequence indices."""
        return torch.gather(position_ids, 1, keep)

    # --- layers -------------------------------------------------------------------------------------

    def run_layer(self, layer, h, mask, cache, cos_sin) -> torch.Tensor:
        """One decoder layer on h (B, S, D) with an additive mask (or None) and a cache object."""
        out = layer(h, attention_mask=mask, position_embeddings=cos_sin, **{self._cache_kwarg: cache})
        return out[0] if isinstance(out, tuple) else out  # transformers < 4.54 returns a tuple

    @staticmethod
    def scoring_keys(keys: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys of layer K-1 as the cache receives them (B, Hkv, S, dh) -> DART's scoring
        input (B, S, Hkv * dh): all KV heads concatenated per token."""
        B, _, S, _ = keys.shape
        return keys.transpose(1, 2).reshape(B, S, -1)


@register("qwen2_vl_text", "qwen2_5_vl_text", "qwen2_vl", "qwen2_5_vl")
class MRopeAdapter(TextAdapter):
    """Qwen2-VL / Qwen2.5-VL text stack: M-RoPE, position_ids (3, B, S) with rows (T, H, W).

    HF's rotary module takes the three rows to one (cos, sin) of (B, S, dh) (chunk i of
    `mrope_section` from row i % 3), so layers, gathering and scoring are the 1-D ones.
    kept_positions are the kept sequence indices: M-RoPE ids of image tokens repeat across a row,
    so the ids say nothing about which tokens were kept."""

    position_shape = (3, "batch", "seq")

    def positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Text tokens and decode steps: all three rows equal (decode: S + t + rope_delta)."""
        return pos.unsqueeze(0).expand(3, -1, -1)  # (3, B, S)

    def kept_positions(self, position_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return keep

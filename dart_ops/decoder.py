"""The decoder with DART at layer K: one implementation, run eagerly and exported to ONNX.

`DartDecoder` runs a Hugging Face decoder stack (Llama, Mistral, Qwen2, Qwen2-VL's M-RoPE text
model: whatever dart_ops.text_adapter has an adapter for) and the LM head. It calls the layers
itself with explicit position embeddings, an explicit additive causal mask and plain KV tensors
(a tiny cache stand-in with an `update()` method), so the same module traces into one ONNX graph
that serves prefill and decode:

    inputs:  inputs_embeds (B, S, D), position_ids (B, S) or (3, B, S) as the adapter declares,
             span_start, span_len, quota (0-d integers: data only, they decide no shape),
             kept_slots (B, S'): only its length is read, S' = the kept length the counts give,
             past KV of layers < K (B, Hkv, P_full, dh) and of layers >= K (B, Hkv, P_kept, dh)
    outputs: logits of the last token (B, V), present KV (same two groups), kept positions (B, S')
             int32, image pivots (B, max(pivots_image, 1)) int32: sequence indices, best first, -1 in
             unused slots

At the input of layer K, `torch.ops.dart.prune` picks the kept tokens from layer K-1's output
(through the final RMSNorm) and its post-RoPE keys; hidden states and position embeddings are
gathered, so kept tokens keep their original positions. span_len 0 keeps all tokens (S' = S), which
is how decode steps (and unpruned prompts) run through the same graph. The pruned length comes from
kept_slots' shape, never from the scalars' values, so the exported graph has no shape-tensor input
(dart_ops/onnx_op_slots.py; docs/TENSORRT_10.3.md section 4); the integer outputs are int32, what
TensorRT 10.3's TopK and Gather produce natively (docs/TENSORRT_10.3.md section 7). Everything
model-specific (which modules, the rotary of the position layout, how a cache is passed) goes
through the adapter.
"""

from __future__ import annotations

import torch
from torch import nn

import dart_ops.torch_op  # noqa: F401  (registers torch.ops.dart.prune)
from dart_ops import spec
from dart_ops.reference import pivot_scores
from dart_ops.text_adapter import TextAdapter, for_model


def kept_len(seq: int, span_start: int, span_len: int, quota: int, pivots_image: int, pivots_text: int) -> int:
    """S', the length of the decoder's kept_slots input, for a prompt of `seq` tokens with the vision span
    [span_start, span_start + span_len) and quota T (per request). The span is clamped as the decoder
    clamps it (the last prompt token is never pruned), so this is the length the graph produces;
    the runtime computes the same with dart_ops.spec (runtime.steps.Prompt.kept_len)."""
    return spec.kept_len(seq, span_start, spec.decoder_span(seq, span_start, span_len), quota, pivots_image,
                         pivots_text)


class _KVStandIn:
    """What HF attention layers need of a cache: update(k, v, layer_idx) -> full (k, v).

    Keeps the new keys of every layer (post-RoPE, this step only) so DART can read layer K-1's.
    """

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], first_layer: int):
        self.past = past
        self.first_layer = first_layer
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.new_keys: dict[int, torch.Tensor] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        past_k, past_v = self.past[layer_idx - self.first_layer]
        self.new_keys[layer_idx] = key  # (B, Hkv, S, dh)
        k = torch.cat([past_k, key], dim=2)  # (B, Hkv, P + S, dh)
        v = torch.cat([past_v, value], dim=2)
        self.present.append((k, v))
        return k, v


def causal_mask(q_len: int, past_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive mask (1, 1, q_len, past_len + q_len): query i sees keys j <= past_len + i."""
    q = torch.arange(q_len, device=device).unsqueeze(1) + past_len  # (q, 1)
    k = torch.arange(past_len + q_len, device=device).unsqueeze(0)  # (1, past + q)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(k <= q, zero, blocked)[None, None]


def image_pivots(keys: torch.Tensor, span_start: torch.Tensor, span_len: torch.Tensor, k: int) -> torch.Tensor:
    """The image pivots DartPrune picks, as an output for the kept-token picture: sequence indices of
    the `k` best pivot scores inside the span [span_start, span_start + span_len), best first
    (B, k); -1 in slots past the span's length. A constant-K TopK over scores padded with k -inf
    entries, so it runs at any S (a decode step's S is 1). Equal to dart_ops.reference's image pivots
    except on exactly tied scores (TopK's tie order is the backend's)."""
    scores = pivot_scores(keys)  # (B, S)
    B, S = scores.shape
    pos = torch.arange(S, device=scores.device)  # (S,)
    inside = (pos >= span_start) & (pos < span_start + span_len)  # (S,)
    scores = torch.where(inside, scores, torch.full_like(scores, float("-inf")))
    padded = torch.cat([scores, scores.new_full((B, k), float("-inf"))], dim=1)  # (B, S + k)
    best, idx = torch.topk(padded, k, dim=1)  # (B, k)
    # ONNX TopK's indices are int64 (TensorRT 10.3's are int32: docs/TENSORRT_10.3.md section 6): one Cast.
    return torch.where(best > float("-inf"), idx, torch.full_like(idx, -1)).to(torch.int32)


class DartDecoder(nn.Module):
    """Decoder layers + final norm + LM head of a HF text model, with DART at layer K.

    text:    a TextAdapter (what a family supplies), or the HF decoder stack itself (e.g.
             LlamaModel: .layers, .norm, .rotary_emb), adapted by its config's model_type.
    lm_head: the output projection; needed only with a bare stack (an adapter carries its own).
    layer:   K, where pruning happens (layers < K see all S tokens, layers >= K see S').
    """

    def __init__(
        self,
        text: TextAdapter | nn.Module,
        lm_head: nn.Module | None = None,
        layer: int = 2,
        pivots_image: int = 4,
        pivots_text: int = 4,
    ):
        super().__init__()
        if not isinstance(text, TextAdapter):
            if lm_head is None:
                raise TypeError("DartDecoder needs lm_head with a bare text model (or pass a TextAdapter)")
            text = for_model(text, lm_head)
        n_layers = len(text.layers)
        if not 1 <= layer <= n_layers - 1:
            raise ValueError(f"DART layer K={layer} must be in [1, {n_layers - 1}] for {n_layers} layers")
        self.text = text  # a plain object; its modules are registered here, under the names below
        self.layers = text.layers
        self.norm = text.norm
        self.rotary_emb = text.rotary_emb
        self.lm_head = text.lm_head
        self.layer = layer
        self.pivots_image = pivots_image
        self.pivots_text = pivots_text

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _mask(self, q_len: int, past_len: int, dtype, device):
        """The additive causal mask, or None where SDPA's own causal path is exact and faster: an
        eager (not exported) run with SDPA attention and either no past (prefill: queries and keys
        are the same tokens, in order, also after pruning) or one query (a decode step)."""
        if (self.text.attn_implementation == "sdpa" and not torch.compiler.is_exporting()
                and not torch.jit.is_tracing() and isinstance(q_len, int) and isinstance(past_len, int)
                and (past_len == 0 or q_len == 1)):
            return None
        return causal_mask(q_len, past_len, dtype, device)

    def _run_layers(self, h, cos_sin, mask, layers, cache):
        for layer in layers:
            h = self.text.run_layer(layer, h, mask, cache, cos_sin)
        return h

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, S, D)
        position_ids: torch.Tensor,  # (B, S) or (3, B, S) int32, the adapter's layout
        span_start: torch.Tensor,  # () int32
        span_len: torch.Tensor,  # () int32; 0 = keep all tokens
        quota: torch.Tensor,  # () int32, T tokens per pivot
        past_low: list[tuple[torch.Tensor, torch.Tensor]],  # K x (B, Hkv, P_full, dh)
        past_high: list[tuple[torch.Tensor, torch.Tensor]],  # (N-K) x (B, Hkv, P_kept, dh)
        kept_slots: torch.Tensor | None = None,  # (B, S'), values unused; None: sized here (eager only)
    ):
        K, text = self.layer, self.text
        h = inputs_embeds
        S = h.shape[1]
        cos_sin = text.rotary(h, position_ids)  # (cos, sin), (B, S, dh) each

        low = _KVStandIn(past_low, 0)
        mask = self._mask(S, past_low[0][0].shape[2], h.dtype, h.device)
        h = self._run_layers(h, cos_sin, mask, self.layers[:K], low)

        # DART at the input of layer K: pivots and duplication from layer K-1's states.
        keys = text.scoring_keys(low.new_keys[K - 1])  # (B, S, Hkv * dh)
        # The last prompt token predicts the next one, so it is never pruned.
        span_len = torch.clamp(torch.minimum(span_len, S - 1 - span_start), min=0)
        if kept_slots is None:
            kept_slots = self.kept_slots(h.shape[0], S, int(span_start), int(span_len), int(quota), h.device)
        keep = torch.ops.dart.prune(
            self.norm(h), keys, span_start, span_len, quota, kept_slots, self.pivots_image, self.pivots_text
        )  # (B, S') int64
        pivots = image_pivots(keys, span_start, span_len, max(self.pivots_image, 1))  # (B, P)
        h = torch.gather(h, 1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, S', D)
        cos_sin = text.gather_positions(cos_sin, keep)  # (B, S', dh) each, original positions
        kept_positions = text.kept_positions(position_ids, keep).to(torch.int32)  # (B, S')

        high = _KVStandIn(past_high, K)
        mask = self._mask(h.shape[1], past_high[0][0].shape[2], h.dtype, h.device)
        h = self._run_layers(h, cos_sin, mask, self.layers[K:], high)

        logits = self.lm_head(self.norm(h[:, -1]))  # (B, V)
        return logits, low.present, high.present, kept_positions, pivots

    def kept_slots(self, batch: int, seq: int, span_start: int, span_len: int, quota: int, device=None):
        """The `kept_slots` input for a prompt (B, S'), zeros: S' as kept_len gives it."""
        n = kept_len(seq, span_start, span_len, quota, self.pivots_image, self.pivots_text)
        return torch.zeros(batch, n, dtype=torch.int32, device=device)

    def empty_past(self, batch: int, dtype: torch.dtype, device=None):
        """Zero-length past KV for both groups (what a prefill step passes)."""
        d = self.text.dims
        empty = lambda: torch.zeros(batch, d.kv_heads, 0, d.head_dim, dtype=dtype, device=device)
        low = [(empty(), empty()) for _ in range(self.layer)]
        high = [(empty(), empty()) for _ in range(self.num_layers - self.layer)]
        return low, high


# The decoder graph's inputs before the KV cache (FlatDecoder's order).
HEAD_INPUTS = ("inputs_embeds", "position_ids", "span_start", "span_len", "quota", "kept_slots")


class FlatDecoder(nn.Module):
    """`DartDecoder` with the KV cache as one flat tuple of tensors: the decoder graph's signature.

    forward(inputs_embeds, position_ids, span_start, span_len, quota, kept_slots, past) where `past` is
    (key_0, value_0, key_1, value_1, ...) over all layers (layers < K hold P_full entries, layers
    >= K hold P_kept) and returns (logits, *present in the same order, kept_positions, image_pivots).
    """

    def __init__(self, decoder: DartDecoder):
        super().__init__()
        self.decoder = decoder

    def input_names(self) -> list[str]:
        return list(HEAD_INPUTS) + self._kv("past")

    def output_names(self) -> list[str]:
        return ["logits"] + self.present_names() + ["kept_positions", "image_pivots"]

    def present_names(self) -> list[str]:
        return self._kv("present")

    def _kv(self, prefix: str) -> list[str]:
        return [f"{prefix}_{kind}_{i}" for i in range(self.decoder.num_layers) for kind in ("key", "value")]

    def forward(self, inputs_embeds, position_ids, span_start, span_len, quota, kept_slots, past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.decoder.num_layers)]
        K = self.decoder.layer
        logits, low, high, kept, pivots = self.decoder(
            inputs_embeds, position_ids, span_start, span_len, quota, pairs[:K], pairs[K:], kept_slots
        )
        return (logits, *[t for kv in low + high for t in kv], kept, pivots)

"""Analytic FLOP model of a VLM prefill, and the speed-up limit of a DART keep ratio.

Stdlib only. Conventions (state them with every number you quote):
- Only matrix products are counted; a multiply-add is 2 FLOPs, so (m, k) @ (k, n) = 2*m*k*n.
  Norms, softmax, activations, RoPE and embedding lookups are left out (O(S*D), a few per cent at
  most at these shapes).
- Attention scores and the weighted sum are counted dense: q_len x kv_len per head, no causal
  halving, because eager PyTorch and ONNX Runtime both compute the full masked product.
- Vision: patch embedding (a stride-p convolution = one matmul per patch), the encoder layers up
  to the feature layer (layers after it do not change the output), and the 2-layer MLP projector
  (on the patches, plus CLS with the "full" strategy; input width x the number of concatenated
  feature layers).
- Decoder: layers < K see all S prompt tokens; layers >= K see the S' kept tokens (queries and
  keys); the LM head runs on the last token only. DART's own selection (pivot-vs-token cosine
  similarities) is counted as `dart`.

The shapes are plain numbers: `TextShape.from_config` reads any Hugging Face decoder config
(Llama, Mistral, Qwen2, Qwen2-VL's text config: the standard keys), `VisionShape` describes a
CLIP-style tower + projector (`VisionShape.from_llava_config` reads LLaVA's). A family combines them:

    shape = ModelShape.from_llava_config(hf_config.to_dict())  # = ModelShape(vision, text) for LLaVA
    limit = speedup_limit(shape, seq=633, span_start=5, span_len=576, dart=DartConfig(keep_ratio=0.111))
"""

from __future__ import annotations

from dataclasses import dataclass

from dart_ops.spec import DartConfig


@dataclass(frozen=True)
class VisionShape:
    """A CLIP-style ViT (patch conv, `layers` pre-norm layers run) + 2-layer MLP projector."""

    image_size: int
    patch_size: int
    hidden: int
    intermediate: int
    layers: int  # encoder layers that have to run (up to the feature layer)
    out_hidden: int  # projector output width (the decoder's hidden size)
    channels: int = 3
    cls_token: bool = True  # the tower prepends a CLS token (CLIP does)
    keep_cls: bool = False  # ... and it goes on to the projector (feature strategy "full")
    feature_layers: int = 1  # layers concatenated for the projector (a list of feature layers)

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq(self) -> int:
        return self.patches + (1 if self.cls_token else 0)

    @property
    def projector_tokens(self) -> int:
        return self.patches + (1 if self.cls_token and self.keep_cls else 0)

    @classmethod
    def from_llava_config(cls, config: dict) -> VisionShape:
        """The tower + projector of a LlavaConfig as a dict (`config.to_dict()` or a config.json)."""
        v, t = config["vision_config"], config["text_config"]
        n_vis = v["num_hidden_layers"]
        feature = config.get("vision_feature_layer")
        feature = -2 if feature is None else feature
        n_features = len(feature) if isinstance(feature, (list, tuple)) else 1
        if isinstance(feature, (list, tuple)):  # several layers concatenated: the deepest decides
            feature = max(f if f >= 0 else n_vis + 1 + f for f in feature)
        used = feature if feature >= 0 else n_vis + 1 + feature  # hidden_states[i] = after layer i
        return cls(
            image_size=v["image_size"], patch_size=v["patch_size"], hidden=v["hidden_size"],
            intermediate=v["intermediate_size"], layers=used, out_hidden=t["hidden_size"],
            channels=v.get("num_channels", 3), cls_token=True,
            keep_cls=config.get("vision_feature_select_strategy") == "full", feature_layers=n_features,
        )


@dataclass(frozen=True)
class TextShape:
    """A Llama-style decoder: GQA attention + SwiGLU MLP (gate, up, down)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: dict) -> TextShape:
        """From a Hugging Face decoder config as a dict (the standard keys every Llama-style model
        type has: Llama, Mistral, Qwen2, Qwen2-VL's text config). num_key_value_heads defaults to
        the attention heads (MHA), head_dim to hidden_size // heads."""
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"], intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"], heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab=config["vocab_size"],
        )


@dataclass(frozen=True)
class ModelShape:
    vision: VisionShape
    text: TextShape

    @classmethod
    def from_llava_config(cls, config: dict) -> ModelShape:
        """From a LlavaConfig as a dict (`config.to_dict()` or a checkpoint's config.json)."""
        text = TextShape.from_config(config["text_config"])
        return cls(vision=VisionShape.from_llava_config(config), text=text)


def _mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def vision_flops(v: VisionShape) -> dict[str, int]:
    """One image through the tower (up to the feature layer) and the projector."""
    T, D = v.seq, v.hidden
    layer = {
        "proj": 4 * _mm(T, D, D),  # q, k, v, o
        "attention": 2 * _mm(T, D, T),  # scores (T, T) per head, summed over heads, and A @ V
        "mlp": 2 * _mm(T, D, v.intermediate),  # fc1, fc2
    }
    return {
        "patch_embed": _mm(v.patches, v.channels * v.patch_size**2, D),
        "layers": v.layers * sum(layer.values()),
        "projector": _mm(v.projector_tokens, D * v.feature_layers, v.out_hidden)
        + _mm(v.projector_tokens, v.out_hidden, v.out_hidden),
    }


def decoder_layer_flops(t: TextShape, q_len: int, kv_len: int) -> dict[str, int]:
    """One decoder layer with q_len new tokens attending to kv_len keys (prefill: kv_len = q_len)."""
    D, dq, dkv = t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim
    return {
        "proj": _mm(q_len, D, dq) + 2 * _mm(q_len, D, dkv) + _mm(q_len, dq, D),  # q, k, v, o
        "attention": 2 * t.heads * _mm(q_len, t.head_dim, kv_len),  # Q K^T and A V
        "mlp": 3 * _mm(q_len, D, t.intermediate),  # gate, up, down
    }


def dart_flops(t: TextShape, vision_tokens: int, pivots: int) -> int:
    """DART's selection: cosine similarity of `pivots` pivots with every vision token."""
    return _mm(pivots, t.hidden, vision_tokens)


def prefill_flops(shape: ModelShape, seq: int, kept: int | None = None, layer: int = 2,
                  vision_tokens: int = 0, pivots: int = 0, image: bool = True) -> dict[str, int]:
    """FLOPs of one prefill (batch 1) by part, and their "total".

    seq: prompt tokens S (vision tokens included); kept: S' after pruning at layer K = `layer`
    (None or seq: no pruning); vision_tokens/pivots: for DART's own cost (0: not pruning);
    image: include the vision tower and projector.
    """
    t = shape.text
    kept = seq if kept is None else kept
    if not 0 < kept <= seq:
        raise ValueError(f"kept tokens must be in [1, S={seq}], got {kept}")
    if not 1 <= layer < t.layers:
        raise ValueError(f"layer K={layer} must be in [1, {t.layers - 1}]")
    parts = {"vision": sum(vision_flops(shape.vision).values()) if image else 0}
    before = sum(decoder_layer_flops(t, seq, seq).values())
    after = sum(decoder_layer_flops(t, kept, kept).values())
    parts["layers_before_k"] = layer * before
    parts["layers_from_k"] = (t.layers - layer) * after
    parts["dart"] = dart_flops(t, vision_tokens, pivots) if kept < seq else 0
    parts["lm_head"] = _mm(1, t.hidden, t.vocab)
    parts["total"] = sum(parts.values())
    return parts


def speedup_limit(shape: ModelShape, seq: int, span_start: int, span_len: int, dart: DartConfig,
                  image: bool = True) -> float:
    """Theoretical prefill speed-up of `dart`'s keep ratio over no pruning, FLOPs(1.0) / FLOPs(r),
    for a prompt of `seq` tokens with the image at [span_start, span_start + span_len)."""
    counts = dart.counts(span_len, seq - span_start - span_len)
    full = prefill_flops(shape, seq, None, dart.layer, image=image)["total"]
    if not counts.prune:
        return 1.0
    pruned = prefill_flops(shape, seq, counts.kept_len(seq), dart.layer, span_len,
                           counts.pivots_image + counts.pivots_text, image=image)["total"]
    return full / pruned

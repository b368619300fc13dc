"""Analytic FLOP model of a VLM prefill, and the speed-up limit of a DART keep ratio.

Stdlib only. Conventions (state them with every number you quote):
- Only matrix products are counted; a multiply-add is 2 FLOPs, so (m, k) @ (k, n) = 2*m*k*n.
  Norms, softmax, activations, RoPE and embedding lookups are left out (O(S*D), a few per cent at
  most at these shapes).
- Attention scores and the weighted sum are counted dense: q_len x kv_len per head, no causal
  halving, because eager PyTorch and ONNX Runtime both compute the full masked product.
- LLaVA vision (VisionShape): patch embedding (a stride-p convolution = one matmul per patch), the encoder layers up
  to the feature layer (layers after it do not change the output), and the 2-layer MLP projector
  (on the patches, plus CLS with the "full" strategy; input width x the number of concatenated
  feature layers).
- Decoder: layers < K see all S prompt tokens; layers >= K see the S' kept tokens (queries and
  keys); the LM head runs on the last token only. DART's own selection (pivot-vs-token cosine
  similarities) is counted as `dart`.
- Qwen2-VL / Qwen2.5-VL vision (QwenVisionShape, one still image of gh x gw patches, N = gh*gw,
  M = N / merge^2 tokens): the patch embedding (a Conv3d whose kernel is its stride = an
  [N, C*T*p*p] x [C*T*p*p, D] matmul), every block (qkv, proj, the MLP: fc1/fc2 for Qwen2-VL,
  SwiGLU gate/up/down for Qwen2.5-VL; attention over all N patches in full-attention blocks, within
  each window in Qwen2.5-VL's window blocks: the sum over windows of w_i^2, as transformers' eager
  and SDPA paths compute it) and the merger ([M, m^2 D] x [m^2 D, m^2 D], then [m^2 D, out]).
  The exported padded-window graph computes Wn full windows of (window/patch)^2 slots instead; that
  padding is not counted. Everything is exact against torch's FlopCounterMode on transformers'
  modules (tests/test_flops_qwen.py).
- LLaVA-NeXT vision (AnyresVisionShape, one image as `crops` = 1 + gh*gw crops of the tower's size,
  3 to 5 with the default pinpoints): LLaVA-1.5's tower + projector (a VisionShape) once per crop,
  nothing else: packing the crop features into the image's L tokens (unpadding, the image_newline
  rows) is a gather, 0 FLOPs. Exact against FlopCounterMode on transformers' LlavaNext modules
  (tests/test_flops_llava_next.py).

The shapes are plain numbers: `TextShape.from_config` reads any Hugging Face decoder config
(Llama, Mistral, Qwen2, Qwen2-VL's text config: the standard keys), `VisionShape` describes a
CLIP-style tower + projector (`VisionShape.from_llava_config` reads LLaVA's), `QwenVisionShape`
a Qwen2-VL / Qwen2.5-VL tower + merger, `AnyresVisionShape` LLaVA-NeXT's per-crop tower. A family
combines them:

    shape = ModelShape.from_llava_config(hf_config.to_dict())  # = ModelShape(vision, text) for LLaVA
    limit = speedup_limit(shape, seq=633, span_start=5, span_len=576, dart=DartConfig(keep_ratio=0.111))

A Qwen tower's cost depends on the image: bind the grid (in patches) before counting,

    shape = ModelShape.from_qwen_config(config).with_grid(gh, gw)  # M = gh*gw/4 vision tokens
    limit = speedup_limit(shape, seq, span_start, span_len=shape.vision.tokens, dart=...)

LLaVA-NeXT's likewise: bind the crop count and the packed token count L = 576 + h'(w'+1) of the image
(runtime/llava_next_preprocess.py's layout), both set by the image's size,

    shape = ModelShape.from_llava_next_config(config).with_crops(crops, tokens)  # 672 x 672 px: 5, 2928
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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

    @property
    def tokens(self) -> int:
        """Vision tokens one image gives the decoder (the projector's output rows)."""
        return self.projector_tokens

    def flops(self) -> dict[str, int]:
        """One image through the tower (up to the feature layer) and the projector."""
        T, D = self.seq, self.hidden
        layer = {
            "proj": 4 * _mm(T, D, D),  # q, k, v, o
            "attention": 2 * _mm(T, D, T),  # scores (T, T) per head, summed over heads, and A @ V
            "mlp": 2 * _mm(T, D, self.intermediate),  # fc1, fc2
        }
        return {
            "patch_embed": _mm(self.patches, self.channels * self.patch_size**2, D),
            "layers": self.layers * sum(layer.values()),
            "projector": _mm(self.projector_tokens, D * self.feature_layers, self.out_hidden)
            + _mm(self.projector_tokens, self.out_hidden, self.out_hidden),
        }

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
class AnyresVisionShape:
    """LLaVA-NeXT's anyres vision: `tower` (a CLIP-style tower + projector on one crop of its image
    size) run on each of the image's `crops` crops (the base image resized whole, then the gh x gw
    tiles of the image fitted to its pinpoint); the packed features are the image's `image_tokens`
    L = base tokens + h'(w' + 1) (rows of the unpadded crop map, each with an image_newline). Both
    depend on the image: None until bound with with_crops."""

    tower: VisionShape
    crops: int | None = None
    image_tokens: int | None = None  # L, the packed vision tokens the decoder gets

    def __post_init__(self):
        if (self.crops is None) != (self.image_tokens is None):
            raise ValueError("bind the crop count and the image's vision tokens together (with_crops)")
        if self.crops is not None and (self.crops < 1 or self.image_tokens < self.tower.tokens):
            raise ValueError(f"{self.crops} crops giving {self.image_tokens} vision tokens: an image is at "
                             f"least 1 crop and at least its base image's {self.tower.tokens} tokens")

    def with_crops(self, crops: int, tokens: int) -> AnyresVisionShape:
        """This tower on an image of `crops` crops that packs into `tokens` vision tokens
        (runtime/llava_next_preprocess.py's layout: pixel_values [crops, 3, 336, 336], L tokens)."""
        return replace(self, crops=crops, image_tokens=tokens)

    def _bound(self) -> tuple[int, int]:
        if self.crops is None:
            raise ValueError("a LLaVA-NeXT tower's FLOPs depend on the image: bind its crops and vision "
                             "tokens first (ModelShape.with_crops(crops, tokens))")
        return self.crops, self.image_tokens

    @property
    def tokens(self) -> int:
        """Vision tokens the image gives the decoder (after packing)."""
        return self._bound()[1]

    def flops(self) -> dict[str, int]:
        """The tower + projector once per crop; packing (a gather) costs nothing."""
        crops, _ = self._bound()
        return {part: crops * n for part, n in self.tower.flops().items()}


def _chunks(n: int, size: int) -> list[int]:
    """n split into runs of `size`, the last one shorter: _chunks(10, 4) = [4, 4, 2]."""
    return [size] * (n // size) + ([n % size] if n % size else [])


@dataclass(frozen=True)
class QwenVisionShape:
    """A Qwen2-VL / Qwen2.5-VL vision tower + patch merger, on one still image of `grid` = (gh, gw)
    patches (None until bound with with_grid: the cost depends on the image)."""

    hidden: int  # block width D (Qwen2-VL: embed_dim; Qwen2.5-VL: hidden_size)
    intermediate: int  # MLP width (Qwen2-VL: int(embed_dim * mlp_ratio); Qwen2.5-VL: intermediate_size)
    layers: int  # blocks (depth); all of them run
    out_hidden: int  # merger output width (the decoder's hidden size)
    gated_mlp: bool  # SwiGLU gate/up/down (Qwen2.5-VL) instead of fc1/fc2 (Qwen2-VL)
    full_attention: tuple[int, ...]  # blocks attending over the whole image; the others use windows
    patch_size: int = 14
    merge: int = 2  # merge x merge patches -> one decoder token
    temporal: int = 2  # temporal patch: a still image is repeated this many times
    channels: int = 3
    window_size: int = 112  # window side in px (window blocks only)
    grid: tuple[int, int] | None = None  # (gh, gw) patches

    def __post_init__(self):
        if self.window_size % (self.merge * self.patch_size):
            raise ValueError(f"window_size {self.window_size} is not a multiple of merge * patch_size "
                             f"= {self.merge * self.patch_size}")
        if self.grid is not None:
            gh, gw = self.grid
            if gh <= 0 or gw <= 0 or gh % self.merge or gw % self.merge:
                raise ValueError(f"image grid {gh}x{gw} patches: each side must be a positive multiple of "
                                 f"the merge size {self.merge}")

    @classmethod
    def from_config(cls, config: dict) -> QwenVisionShape:
        """From a vision_config dict (`config.to_dict()["vision_config"]` or a checkpoint's
        config.json). The layout tells the kind: Qwen2-VL has embed_dim (its hidden_size is the
        merger's output), Qwen2.5-VL has fullatt_block_indexes; anything else (Qwen3-VL) is refused."""
        if "embed_dim" in config:  # Qwen2-VL: fc1/fc2, every block attends over the whole image
            width = config["embed_dim"]
            sizes = {"hidden": width, "intermediate": int(width * config["mlp_ratio"]),
                     "out_hidden": config["hidden_size"], "gated_mlp": False,
                     "full_attention": tuple(range(config["depth"]))}
        elif "fullatt_block_indexes" in config:  # Qwen2.5-VL: SwiGLU, window attention elsewhere
            sizes = {"hidden": config["hidden_size"], "intermediate": config["intermediate_size"],
                     "out_hidden": config["out_hidden_size"], "gated_mlp": True,
                     "full_attention": tuple(config["fullatt_block_indexes"])}
        else:
            raise ValueError("vision config is neither Qwen2-VL's (embed_dim) nor Qwen2.5-VL's "
                             "(fullatt_block_indexes); the FLOP model has no other Qwen tower")
        return cls(
            **sizes, layers=config["depth"], patch_size=config.get("patch_size", 14),
            merge=config.get("spatial_merge_size", 2), temporal=config.get("temporal_patch_size", 2),
            channels=config.get("in_channels", config.get("in_chans", 3)),
            window_size=config.get("window_size", 112),
        )

    def with_grid(self, gh: int, gw: int) -> QwenVisionShape:
        """This tower on an image of gh x gw patches (runtime.qwen_preprocess.preprocess's grid)."""
        return replace(self, grid=(gh, gw))

    def _grid(self) -> tuple[int, int]:
        if self.grid is None:
            raise ValueError("a Qwen vision tower's FLOPs depend on the image: bind its grid first "
                             "(ModelShape.with_grid(gh, gw), the grid in patches)")
        return self.grid

    @property
    def patches(self) -> int:
        gh, gw = self._grid()
        return gh * gw

    @property
    def tokens(self) -> int:
        """Vision tokens the image gives the decoder: N / merge^2."""
        return self.patches // self.merge**2

    def window_sizes(self) -> list[int]:
        """Patches in each attention window of a window block, in transformers' window order
        (get_vision_window_index: windows of window_size // patch_size patches a side, row-major;
        the last row / column of windows is cut short by the image edge)."""
        gh, gw = self._grid()
        units = self.window_size // self.merge // self.patch_size  # merge units along a window side
        rows, cols = _chunks(gh // self.merge, units), _chunks(gw // self.merge, units)
        return [r * c * self.merge**2 for r in rows for c in cols]

    def block_flops(self, full: bool) -> dict[str, int]:
        """One block: {"proj", "attention", "mlp"}; attention over the whole image (full) or within
        each window. Scores and A @ V summed over heads: 2 * (2 * n * D * n) per span of n patches."""
        N, D = self.patches, self.hidden
        spans = [N] if full else self.window_sizes()
        return {
            "proj": _mm(N, D, 3 * D) + _mm(N, D, D),  # qkv, proj
            "attention": sum(2 * _mm(n, D, n) for n in spans),
            "mlp": (3 if self.gated_mlp else 2) * _mm(N, D, self.intermediate),  # gate, up, down | fc1, fc2
        }

    def flops(self) -> dict[str, int]:
        """The image through the patch embedding, every block and the merger."""
        N, D, m2 = self.patches, self.hidden, self.merge**2
        n_full = sum(1 for i in range(self.layers) if i in self.full_attention)  # as transformers tests it
        full, window = sum(self.block_flops(True).values()), sum(self.block_flops(False).values())
        return {
            "patch_embed": _mm(N, self.channels * self.temporal * self.patch_size**2, D),
            "layers": n_full * full + (self.layers - n_full) * window,
            "projector": _mm(self.tokens, m2 * D, m2 * D) + _mm(self.tokens, m2 * D, self.out_hidden),
        }


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
        type has: Llama, Mistral, Qwen2, Qwen2-VL's and Qwen2.5-VL's text configs; M-RoPE changes no
        matmul). num_key_value_heads defaults to
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
    """A VLM: its vision tower + projector (LLaVA's VisionShape, a QwenVisionShape or LLaVA-NeXT's
    AnyresVisionShape) and its decoder."""

    vision: VisionShape | QwenVisionShape | AnyresVisionShape
    text: TextShape

    @classmethod
    def from_llava_config(cls, config: dict) -> ModelShape:
        """From a LlavaConfig as a dict (`config.to_dict()` or a checkpoint's config.json)."""
        text = TextShape.from_config(config["text_config"])
        return cls(vision=VisionShape.from_llava_config(config), text=text)

    @classmethod
    def from_qwen_config(cls, config: dict) -> ModelShape:
        """From a Qwen2VLConfig / Qwen2_5_VLConfig as a dict: transformers 5's `to_dict()` (text sizes
        under "text_config") or an older checkpoint's config.json (text sizes at the top level). The
        vision grid is unset: bind it with with_grid before counting."""
        text = config.get("text_config") or config
        return cls(vision=QwenVisionShape.from_config(config["vision_config"]), text=TextShape.from_config(text))

    def with_grid(self, gh: int, gw: int) -> ModelShape:
        """This model on an image of gh x gw patches (Qwen towers; LLaVA's has a fixed image size)."""
        if not isinstance(self.vision, QwenVisionShape):
            raise TypeError(f"{type(self.vision).__name__} takes no image grid (a fixed image size; LLaVA-NeXT: "
                            "with_crops); only a QwenVisionShape takes an image grid")
        return replace(self, vision=self.vision.with_grid(gh, gw))

    @classmethod
    def from_llava_next_config(cls, config: dict) -> ModelShape:
        """From a LlavaNextConfig as a dict (`config.to_dict()` or a checkpoint's config.json): each
        crop's tower + projector as LLaVA-1.5's (the same keys), and the decoder. Crops and vision
        tokens are unset: bind them with with_crops before counting."""
        if config.get("vision_feature_select_strategy") == "full":
            raise ValueError("LLaVA-NeXT with vision_feature_select_strategy 'full': the CLS feature does "
                             "not fit the crops' patch maps it packs (transformers cannot run it either)")
        vision = AnyresVisionShape(VisionShape.from_llava_config(config))
        return cls(vision=vision, text=TextShape.from_config(config["text_config"]))

    def with_crops(self, crops: int, tokens: int) -> ModelShape:
        """This model on an image of `crops` crops packed into `tokens` vision tokens (LLaVA-NeXT)."""
        if not isinstance(self.vision, AnyresVisionShape):
            raise TypeError(f"{type(self.vision).__name__} does not tile images into crops; only an "
                            "AnyresVisionShape (LLaVA-NeXT) takes a crop count")
        return replace(self, vision=self.vision.with_crops(crops, tokens))


def _mm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def vision_flops(v: VisionShape | QwenVisionShape | AnyresVisionShape) -> dict[str, int]:
    """One image through the vision tower and the projector (Qwen: the merger; LLaVA-NeXT: both on
    every crop), by part: {"patch_embed", "layers", "projector"}. A QwenVisionShape needs its grid
    (with_grid), an AnyresVisionShape its crops and tokens (with_crops)."""
    return v.flops()


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

"""dart_ops/flops.py on LLaVA-NeXT: LLaVA-1.5's tower + projector once per crop, the packed token count
bound per image, the decoder, and the speed-up limit.

Two kinds of check:
- hand arithmetic on the tiny hand shape of tests/test_flops.py (a matmul (m, k) @ (k, n) = 2*m*k*n);
- torch.utils.flop_counter.FlopCounterMode on transformers' LlavaNextForConditionalGeneration (a tiny
  random config with the real 336 px crops, patch 14 and default pinpoints; eager attention): the vision
  tower + projector on 3, 4 and 5 crops, a whole prefill, and a DART-pruned prefill through
  dart_ops.eager.EagerDart. The analytic count equals the counter exactly, with two stated differences:
  transformers runs every CLIP layer, also those after the feature layer (-2: the last one), which the
  model leaves out because they do not change the features; and DART's own selection, which the
  reference computes elementwise (uncounted) and the model counts as the (pivots x D) @ (D x L) product.
Packing the crop features into the image's L tokens (unpad, image_newline rows) is a gather: 0 FLOPs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from dart_ops.flops import (
    AnyresVisionShape,
    ModelShape,
    QwenVisionShape,
    TextShape,
    VisionShape,
    prefill_flops,
    speedup_limit,
    vision_flops,
)
from dart_ops.spec import DartConfig

# tests/test_flops.py's hand shapes: 28 px / patch 14 -> 4 patches (+ CLS = 5 tokens), width 8, MLP 16,
# 2 layers run, projector to 12; one crop costs 37632 + 11840 + 1920 = 51392 FLOPs.
CROP = VisionShape(image_size=28, patch_size=14, hidden=8, intermediate=16, layers=2, out_hidden=12)
TEXT = TextShape(hidden=12, intermediate=20, layers=4, heads=3, kv_heads=1, head_dim=4, vocab=50)

# llava-hf/llava-v1.6-mistral-7b-hf at its sizes: CLIP ViT-L/14-336 up to feature layer -2, Mistral-7B.
NEXT_7B = ModelShape(
    vision=AnyresVisionShape(VisionShape(image_size=336, patch_size=14, hidden=1024, intermediate=4096,
                                         layers=23, out_hidden=4096)),
    text=TextShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128,
                   vocab=32064),
)

# (H, W) of an image -> (crops, L) with the default pinpoints (families.md section 4): the image is its
# own pinpoint, so nothing is unpadded: L = 576 + h' (w' + 1) with h' x w' = 24 gh x 24 gw.
IMAGES = {(336, 672): (3, 576 + 24 * 49), (1008, 336): (4, 576 + 72 * 25), (672, 672): (5, 576 + 48 * 49)}


# --- hand-computed counts ---------------------------------------------------------------------------


def test_anyres_vision_flops_by_hand():
    v = AnyresVisionShape(CROP).with_crops(3, 9)  # 3 crops of 4 patches; 9 packed tokens (any count >= 4)
    assert (v.crops, v.tokens) == (3, 9)
    assert vision_flops(v) == {
        "patch_embed": 3 * (2 * 4 * (3 * 14 * 14) * 8),
        "layers": 3 * (2 * (4 * (2 * 5 * 8 * 8) + 2 * (2 * 5 * 8 * 5) + 2 * (2 * 5 * 8 * 16))),
        "projector": 3 * (2 * 4 * 8 * 12 + 2 * 4 * 12 * 12),
    }
    assert sum(vision_flops(v).values()) == 3 * 51392


def test_prefill_counts_the_packed_tokens_and_every_crop():
    shape = ModelShape(AnyresVisionShape(CROP), TEXT).with_crops(5, 14)
    S = 14 + 6  # 2 text tokens, the image, 4 text tokens
    parts = prefill_flops(shape, S)
    n = S  # a decoder layer on n tokens (tests/test_flops.py): proj 768 n, attention 48 n^2, mlp 1440 n
    layer = 768 * n + 48 * n * n + 1440 * n
    assert parts == {"vision": 5 * 51392, "layers_before_k": 2 * layer, "layers_from_k": 2 * layer, "dart": 0,
                     "lm_head": 2 * 12 * 50, "total": 5 * 51392 + 4 * layer + 2 * 12 * 50}


def test_speedup_limit_on_a_hand_shape():
    shape = ModelShape(AnyresVisionShape(CROP), TEXT).with_crops(3, 40)
    S, a, L = 50, 2, 40
    dart = DartConfig(layer=1, keep_ratio=0.25)
    c = dart.counts(L, S - a - L)  # budget 10 -> T = 1: 4 image pivots + 8
    assert (c.kept_vision, c.kept_len(S)) == (12, 22)
    pruned = prefill_flops(shape, S, 22, 1, L, 8)
    assert pruned["dart"] == 2 * 8 * 12 * 40
    assert pruned["vision"] == 3 * 51392  # the tower runs on every crop whatever is pruned later
    full = prefill_flops(shape, S)["total"]
    assert speedup_limit(shape, S, a, L, dart) == pytest.approx(full / pruned["total"], rel=1e-12)


# --- binding and configs ----------------------------------------------------------------------------


def test_crops_and_tokens_are_required_and_checked():
    shape = ModelShape(AnyresVisionShape(CROP), TEXT)
    with pytest.raises(ValueError, match=r"with_crops\(crops, tokens\)"):
        vision_flops(shape.vision)
    with pytest.raises(ValueError, match="with_crops"):
        prefill_flops(shape, seq=20)
    with pytest.raises(ValueError, match="with_crops"):
        _ = shape.vision.tokens
    for crops, tokens in [(0, 10), (3, 3)]:  # no crop; fewer tokens than the base image's 4
        want = f"{crops} crops giving {tokens} vision tokens: an image is at least 1 crop and at least "
        with pytest.raises(ValueError, match=want + "its base image's 4 tokens"):
            shape.with_crops(crops, tokens)
    with pytest.raises(ValueError, match="together"):
        replace(shape.vision, crops=3)
    with pytest.raises(TypeError, match="only an AnyresVisionShape"):
        ModelShape(CROP, TEXT).with_crops(3, 9)
    qwen = QwenVisionShape(hidden=8, intermediate=16, layers=2, out_hidden=12, gated_mlp=False,
                           full_attention=(0,))
    with pytest.raises(TypeError, match="only an AnyresVisionShape"):
        ModelShape(qwen, TEXT).with_crops(3, 9)
    with pytest.raises(TypeError, match=r"AnyresVisionShape takes no image grid \(a fixed image size; "
                                        r"LLaVA-NeXT: with_crops\); only a QwenVisionShape"):
        shape.with_grid(2, 2)


def _config(**top) -> dict:
    """A LlavaNextConfig as a dict at llava-v1.6-mistral-7b-hf's sizes (transformers fills the rest)."""
    tf = pytest.importorskip("transformers")
    text = {"model_type": "mistral", "intermediate_size": 14336, "num_key_value_heads": 8,
            "vocab_size": 32064, "rope_theta": 1e6, "sliding_window": None, "max_position_embeddings": 32768}
    return tf.LlavaNextConfig(text_config=text, image_token_index=32000, **top).to_dict()


def test_from_llava_next_config_7b():
    config = _config()
    shape = ModelShape.from_llava_next_config(config)
    assert shape == NEXT_7B
    assert shape.vision.tower == ModelShape.from_llava_config(config).vision  # LLaVA-1.5's tower, not a copy
    bound = shape.with_crops(5, 2928)
    one = sum(vision_flops(bound.vision.tower).values())
    assert sum(vision_flops(bound.vision).values()) == 5 * one


def test_full_feature_strategy_is_refused():
    with pytest.raises(ValueError, match="vision_feature_select_strategy 'full'"):
        ModelShape.from_llava_next_config(_config(vision_feature_select_strategy="full"))


def test_speedup_limit_at_2928_tokens_7b():
    """The DART paper's LLaVA-NeXT setting: a 672 px image (5 crops, 2928 tokens), keep 0.111 -> T = 40,
    324 vision tokens kept (the authors' absolute budget R = 320 gives the same)."""
    shape = NEXT_7B.with_crops(5, 2928)
    S, a, L = 2947, 4, 2928
    dart = DartConfig(keep_ratio=0.111)
    c = dart.counts(L, S - a - L)
    assert (c.quota, c.kept_vision, c.kept_len(S)) == (40, 324, 2947 - 2928 + 324)
    full = prefill_flops(shape, S)
    pruned = prefill_flops(shape, S, 343, 2, L, 8)
    assert full["vision"] == pruned["vision"] == 5 * sum(vision_flops(shape.vision.tower).values())
    limit = speedup_limit(shape, S, a, L, dart)
    assert limit == pytest.approx(full["total"] / pruned["total"], rel=1e-12)
    assert 4.9 < limit < 5.2  # the vision tower on 5 crops is 4.4 % of the unpruned prefill


def test_shape_serialises_for_the_bench_meta():
    meta = json.loads(json.dumps(asdict(NEXT_7B.with_crops(5, 2928))))
    vision = meta["vision"]
    assert (vision["crops"], vision["image_tokens"], vision["tower"]["layers"]) == (5, 2928, 23)


# --- against FlopCounterMode on transformers' modules ----------------------------------------------


def _hf_model():
    """Tiny LlavaNextForConditionalGeneration: real 336 px crops / patch 14 / default pinpoints, CLIP
    width 32 with 3 layers (feature layer -2: layers 0-1 used), a Mistral decoder of 3 layers (GQA 4/2),
    vocabulary 100 with the image token at 90; eager attention."""
    tf = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    vision = tf.CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=3, num_attention_heads=2, projection_dim=32)
    text = tf.MistralConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=100, sliding_window=None, bos_token_id=0,
                            eos_token_id=1, pad_token_id=0)
    config = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=90,
                                vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return tf.LlavaNextForConditionalGeneration._from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def hf():
    return _hf_model()


def _count(fn):
    """(FLOPs by module name, total) that FlopCounterMode sees while fn() runs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return per_module, counter.get_total_flops()


def _image(hw: tuple[int, int]):
    """Random pixel_values [crops, 3, 336, 336] and image_sizes [[H, W]] of an (H, W) image."""
    import torch

    crops, _ = IMAGES[hw]
    return torch.randn(crops, 3, 336, 336), torch.tensor([list(hw)])


def _unused_layers(per_module: dict, n_layers: int, used: int) -> int:
    """What transformers' CLIP runs past the feature layer (the FLOP model leaves it out). The counter
    names a module from the outermost one called (CLIPVisionModel..., or LlavaNext...vision_tower...)."""
    layers = [[k for k in per_module if k.endswith(f"encoder.layers.{i}")] for i in range(used, n_layers)]
    assert all(len(names) == 1 for names in layers), layers
    return sum(per_module[names[0]] for names in layers)


@pytest.mark.parametrize("hw", list(IMAGES), ids=[f"{c}crops" for c, _ in IMAGES.values()])
def test_vision_tower_and_projector_equal_flop_counter(hf, hw):
    """Patch embedding, the layers up to the feature layer and the projector on every crop: exact, part
    by part; get_image_features' packing adds nothing."""
    pixels, sizes = _image(hw)
    out = []
    per_module, total = _count(lambda: out.append(hf.model.get_image_features(pixel_values=pixels,
                                                                              image_sizes=sizes)))
    crops, L = IMAGES[hw]
    assert out[0].pooler_output[0].shape == (L, 48)  # the packed tokens the shape is bound to
    v = ModelShape.from_llava_next_config(hf.config.to_dict()).vision.with_crops(crops, L)
    parts = vision_flops(v)
    assert v.tower.layers == 2
    assert per_module["CLIPVisionModel.embeddings.patch_embedding"] == parts["patch_embed"]
    assert sum(per_module[f"CLIPVisionModel.encoder.layers.{i}"] for i in range(2)) == parts["layers"]
    assert per_module["LlavaNextMultiModalProjector"] == parts["projector"]
    unused = _unused_layers(per_module, 3, 2)
    assert unused == parts["layers"] // 2  # one more layer of the same size
    assert total == sum(parts.values()) + unused


def _prompt(tokens: int):
    """2 text tokens, `tokens` image tokens, 5 text tokens: the image span starts at 2."""
    import torch

    return torch.tensor([[5, 6] + [90] * tokens + [7, 8, 9, 10, 11]])  # (1, S)


def test_prefill_equals_flop_counter(hf):
    """One whole HF forward on a 3-crop image (logits of the last token): the vision tower on 3 crops,
    3 decoder layers on S = L + 7 tokens and the LM head, exactly (plus CLIP's unused last layer)."""
    hw = (336, 672)
    crops, L = IMAGES[hw]
    ids = _prompt(L)
    pixels, sizes = _image(hw)
    per_module, total = _count(lambda: hf(input_ids=ids, pixel_values=pixels, image_sizes=sizes,
                                          logits_to_keep=1, use_cache=False))
    shape = ModelShape.from_llava_next_config(hf.config.to_dict()).with_crops(crops, L)
    parts = prefill_flops(shape, seq=ids.shape[1])
    name = type(hf).__name__
    unused = _unused_layers(per_module, 3, 2)
    assert per_module[f"{name}.model.vision_tower"] + per_module[f"{name}.model.multi_modal_projector"] == \
        parts["vision"] + unused
    assert per_module[f"{name}.model.language_model"] == parts["layers_before_k"] + parts["layers_from_k"]
    assert per_module[f"{name}.lm_head"] == parts["lm_head"]
    assert total == parts["total"] + unused


@pytest.mark.parametrize("ratio", [1.0, 0.111])
def test_pruned_prefill_equals_flop_counter_but_the_selection(hf, ratio):
    """DART at K = 1 through the eager baseline (dart_ops.eager.EagerDart, image_sizes as its
    image_kwargs, one token: prefill only) on a 5-crop image (L = 2928): the vision tower, layer 0 on S
    tokens and layers 1-2 on the S' kept tokens match exactly; DART's selection is the only difference."""
    from dart_ops.eager import EagerDart

    hw = (672, 672)
    crops, L = IMAGES[hw]
    ids = _prompt(L)
    S = ids.shape[1]
    pixels, sizes = _image(hw)
    dart = DartConfig(layer=1, keep_ratio=ratio)
    eager = EagerDart(hf, dart)
    out = []
    per_module, total = _count(lambda: out.append(eager.generate(ids, pixels, max_new_tokens=1,
                                                                 image_kwargs={"image_sizes": sizes})))
    c = dart.counts(L, S - 2 - L)
    kept = c.kept_len(S)
    assert len(out[0].kept_positions) == kept == (S if ratio == 1.0 else S - L + 324)
    shape = ModelShape.from_llava_next_config(hf.config.to_dict()).with_crops(crops, L)
    parts = prefill_flops(shape, S, kept, dart.layer, L, c.pivots_image + c.pivots_text)
    assert parts["dart"] == (0 if ratio == 1.0 else 2 * 8 * 48 * 2928)  # 8 pivots x width 48 x 2928 tokens
    unused = _unused_layers(per_module, 3, 2)
    assert unused == vision_flops(shape.vision)["layers"] // 2  # CLIP's last layer on 5 crops
    assert total == parts["total"] - parts["dart"] + unused

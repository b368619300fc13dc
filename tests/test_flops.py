"""Unit tests of dart_ops/flops.py, the analytic FLOP model of a LLaVA-style prefill.

The expected numbers are written out as explicit arithmetic following the module's conventions
(a matmul (m, k) @ (k, n) costs 2*m*k*n; attention counted dense, q_len x kv_len per head), not
computed with the module's helpers, so that the tests check the formulas independently.

Tiny hand-made shapes used throughout:
    vision: 28 px / patch 14 -> 4 patches (+ CLS = 5 tokens), hidden 8, intermediate 16,
            2 layers run, projector to 12, 3 channels
    text:   hidden 12, intermediate 20, 4 layers, 3 heads, 1 KV head, head_dim 4, vocab 50
"""

from __future__ import annotations

import pytest

from dart_ops.flops import (
    ModelShape,
    TextShape,
    VisionShape,
    dart_flops,
    decoder_layer_flops,
    prefill_flops,
    speedup_limit,
    vision_flops,
)
from dart_ops.spec import DartConfig

VISION = VisionShape(image_size=28, patch_size=14, hidden=8, intermediate=16, layers=2, out_hidden=12)
TEXT = TextShape(hidden=12, intermediate=20, layers=4, heads=3, kv_heads=1, head_dim=4, vocab=50)
SHAPE = ModelShape(vision=VISION, text=TEXT)

# LLaVA-1.5-7B (CLIP ViT-L/14-336 up to feature layer -2, Vicuna-7B), written out by hand.
LLAVA_7B = ModelShape(
    vision=VisionShape(image_size=336, patch_size=14, hidden=1024, intermediate=4096, layers=23,
                       out_hidden=4096),
    text=TextShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128,
                   vocab=32064),
)

# A LLaVA-like prompt: S = 646 tokens, image at [7, 7 + 576).
S, A, L = 646, 7, 576


# --- hand-computed counts ---------------------------------------------------------------------------


def test_vision_shape_tokens():
    assert VISION.patches == 4  # (28 // 14) ** 2
    assert VISION.seq == 5  # + CLS
    no_cls = VisionShape(28, 14, 8, 16, 2, 12, cls_token=False)
    assert (no_cls.patches, no_cls.seq) == (4, 4)


def test_vision_flops():
    parts = vision_flops(VISION)
    assert parts == {
        # 4 patches, each a (3 * 14 * 14) -> 8 matmul
        "patch_embed": 2 * 4 * (3 * 14 * 14) * 8,
        # 2 layers x (q, k, v, o on 5 tokens + scores and A @ V summed over heads + fc1, fc2)
        "layers": 2 * (4 * (2 * 5 * 8 * 8) + 2 * (2 * 5 * 8 * 5) + 2 * (2 * 5 * 8 * 16)),
        # projector on the 4 patches (no CLS): 8 -> 12, 12 -> 12
        "projector": 2 * 4 * 8 * 12 + 2 * 4 * 12 * 12,
    }
    assert sum(parts.values()) == 37632 + 11840 + 1920 == 51392


def test_vision_flops_without_cls_and_with_other_channels():
    v = VisionShape(28, 14, 8, 16, 1, 12, channels=1, cls_token=False)
    assert vision_flops(v) == {
        "patch_embed": 2 * 4 * (1 * 14 * 14) * 8,
        "layers": 1 * (4 * (2 * 4 * 8 * 8) + 2 * (2 * 4 * 8 * 4) + 2 * (2 * 4 * 8 * 16)),
        "projector": 2 * 4 * 8 * 12 + 2 * 4 * 12 * 12,
    }


def test_decoder_layer_flops_prefill():
    # q_len = kv_len = 5; q, o: 12 x (3 * 4); k, v: 12 x (1 * 4)
    assert decoder_layer_flops(TEXT, 5, 5) == {
        "proj": 2 * 5 * 12 * 12 + 2 * (2 * 5 * 12 * 4) + 2 * 5 * 12 * 12,  # q, k + v, o
        "attention": 2 * 3 * (2 * 5 * 4 * 5),  # Q K^T and A V, 3 heads, dense 5 x 5
        "mlp": 3 * (2 * 5 * 12 * 20),  # gate, up, down
    }


def test_decoder_layer_flops_decode_like():
    # one new query against 7 keys: projections and MLP scale with q_len, attention with q_len * kv_len
    assert decoder_layer_flops(TEXT, 1, 7) == {
        "proj": 2 * 1 * 12 * 12 + 2 * (2 * 1 * 12 * 4) + 2 * 1 * 12 * 12,
        "attention": 2 * 3 * (2 * 1 * 4 * 7),
        "mlp": 3 * (2 * 1 * 12 * 20),
    }


def test_dart_flops():
    # 2 pivots against 4 vision tokens of width 12
    assert dart_flops(TEXT, 4, 2) == 2 * 2 * 12 * 4
    assert dart_flops(TEXT, 4, 0) == 0


# One decoder layer at prefill length n, by hand: proj 768 n, attention 48 n^2, mlp 1440 n.
def _layer(n: int) -> int:
    return (2 * n * 12 * 12 + 2 * (2 * n * 12 * 4) + 2 * n * 12 * 12) + 2 * 3 * (2 * n * 4 * n) + 3 * (2 * n * 12 * 20)


def test_hand_layer_formula():
    assert _layer(10) == 768 * 10 + 48 * 10 * 10 + 1440 * 10 == 26880
    assert _layer(6) == 768 * 6 + 48 * 6 * 6 + 1440 * 6 == 14976


def test_prefill_flops_no_pruning():
    vision = 51392  # test_vision_flops
    parts = prefill_flops(SHAPE, seq=10)
    assert parts == {
        "vision": vision,
        "layers_before_k": 2 * _layer(10),  # K = 2 (default)
        "layers_from_k": (4 - 2) * _layer(10),
        "dart": 0,
        "lm_head": 2 * 1 * 12 * 50,  # last token only
        "total": vision + 4 * _layer(10) + 2 * 1 * 12 * 50,
    }
    assert parts["total"] == 51392 + 4 * 26880 + 1200 == 160112
    # kept = seq is the same as no pruning, and DART's own cost is then not counted
    assert prefill_flops(SHAPE, 10, kept=10, vision_tokens=4, pivots=2) == parts


def test_prefill_flops_pruned():
    parts = prefill_flops(SHAPE, seq=10, kept=6, layer=1, vision_tokens=4, pivots=2)
    assert parts == {
        "vision": 51392,
        "layers_before_k": 1 * _layer(10),
        "layers_from_k": (4 - 1) * _layer(6),
        "dart": 2 * 2 * 12 * 4,
        "lm_head": 2 * 1 * 12 * 50,
        "total": 51392 + 26880 + 3 * 14976 + 192 + 1200,
    }
    assert parts["total"] == 124592


def test_prefill_flops_without_image():
    parts = prefill_flops(SHAPE, seq=10, kept=6, layer=3, vision_tokens=4, pivots=2, image=False)
    assert parts["vision"] == 0
    assert parts["layers_before_k"] == 3 * 26880
    assert parts["layers_from_k"] == 1 * 14976
    assert parts["total"] == 3 * 26880 + 14976 + 192 + 1200


def test_prefill_total_is_sum_of_parts():
    parts = prefill_flops(LLAVA_7B, seq=S, kept=138, layer=2, vision_tokens=L, pivots=8)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


# --- speedup_limit -----------------------------------------------------------------------------------


def test_llava_counts():
    c = DartConfig(keep_ratio=0.111).counts(L, S - A - L)
    # budget round(0.111 * 576) = 64, T = 64 // 8 = 8, kept = 4 image pivots + 8 pivots * 8
    assert (c.pivots_image, c.pivots_text, c.quota, c.kept_vision) == (4, 4, 8, 68)
    assert c.kept_len(S) == 646 - 576 + 68 == 138


def test_speedup_limit_matches_flop_ratio():
    dart = DartConfig(keep_ratio=0.111)
    full = prefill_flops(LLAVA_7B, S, None, 2)["total"]
    pruned = prefill_flops(LLAVA_7B, S, 138, 2, vision_tokens=576, pivots=8)["total"]
    assert pruned < full
    assert speedup_limit(LLAVA_7B, S, A, L, dart) == pytest.approx(full / pruned, rel=1e-12)
    # pruning at a later layer gains less
    later = speedup_limit(LLAVA_7B, S, A, L, DartConfig(layer=8, keep_ratio=0.111))
    assert 1.0 < later < speedup_limit(LLAVA_7B, S, A, L, dart)


def test_speedup_limit_matches_flop_ratio_without_image():
    dart = DartConfig(keep_ratio=0.111)
    full = prefill_flops(LLAVA_7B, S, None, 2, image=False)["total"]
    pruned = prefill_flops(LLAVA_7B, S, 138, 2, vision_tokens=576, pivots=8, image=False)["total"]
    assert speedup_limit(LLAVA_7B, S, A, L, dart, image=False) == pytest.approx(full / pruned, rel=1e-12)
    # without the (unpruned) vision tower in both, the ratio is larger
    assert speedup_limit(LLAVA_7B, S, A, L, dart, image=False) > speedup_limit(LLAVA_7B, S, A, L, dart)


def test_speedup_limit_no_pruning_is_one():
    assert speedup_limit(LLAVA_7B, S, A, L, DartConfig(keep_ratio=1.0)) == 1.0
    assert speedup_limit(LLAVA_7B, S, A, L, DartConfig(keep_ratio=None, budget=576)) == 1.0
    # no image in the prompt: L = 0
    assert speedup_limit(LLAVA_7B, 70, 5, 0, DartConfig(keep_ratio=0.111)) == 1.0
    assert speedup_limit(LLAVA_7B, 70, 5, 0, DartConfig(keep_ratio=0.111), image=False) == 1.0


def test_speedup_limit_grows_as_keep_ratio_falls():
    limits = [speedup_limit(LLAVA_7B, S, A, L, DartConfig(keep_ratio=r)) for r in (1.0, 0.333, 0.222, 0.111)]
    assert limits[0] == 1.0
    assert all(a < b for a, b in zip(limits, limits[1:])), limits


def test_speedup_limit_on_hand_shape():
    # 10-token prompt, image at [2, 6), K = 1; budget 1 -> T = 1 // 2 = 0: keep the image pivot only
    dart = DartConfig(layer=1, pivots_image=1, pivots_text=1, keep_ratio=None, budget=1)
    c = dart.counts(4, 10 - 2 - 4)
    assert (c.kept_vision, c.kept_len(10)) == (1, 7)
    full = 51392 + 4 * 26880 + 1200
    pruned = 51392 + 1 * 26880 + 3 * _layer(7) + 2 * 2 * 12 * 4 + 1200  # dart: 2 pivots x 4 tokens
    assert speedup_limit(SHAPE, 10, 2, 4, dart) == pytest.approx(full / pruned, rel=1e-12)


# --- ModelShape.from_llava_config --------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_7b_dict():
    pytest.importorskip("transformers")
    from export.families.llava import random_config

    return random_config("llava-7b-shape").to_dict()  # the config only, no model


def test_from_llava_config_7b(llava_7b_dict):
    shape = ModelShape.from_llava_config(llava_7b_dict)
    v, t = shape.vision, shape.text
    assert v.layers == 23  # feature layer -2 of 24: hidden_states[23], after layer 23
    assert (v.hidden, v.intermediate, v.out_hidden, v.channels) == (1024, 4096, 4096, 3)
    assert (v.patches, v.seq) == (576, 577)
    assert (t.hidden, t.intermediate, t.layers, t.heads, t.kv_heads, t.head_dim, t.vocab) == (
        4096, 11008, 32, 32, 32, 128, 32064)
    assert shape == LLAVA_7B


def test_llava_7b_prefill_scale(llava_7b_dict):
    # the usual estimate 2 * params * tokens, params ~ 7.06e9, within 10 %
    total = prefill_flops(ModelShape.from_llava_config(llava_7b_dict), S)["total"]
    estimate = 2 * 7.06e9 * 646
    assert abs(total - estimate) < 0.10 * estimate, total / estimate


def _small_dict(**top) -> dict:
    return {
        "vision_config": {"num_hidden_layers": 24, "image_size": 28, "patch_size": 14, "hidden_size": 8,
                          "intermediate_size": 16},
        "text_config": {"hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 4,
                        "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 50},
        **top,
    }


def test_from_llava_config_feature_layers():
    assert ModelShape.from_llava_config(_small_dict()).vision.layers == 23  # default -2
    assert ModelShape.from_llava_config(_small_dict(vision_feature_layer=5)).vision.layers == 5
    assert ModelShape.from_llava_config(_small_dict(vision_feature_layer=-1)).vision.layers == 24
    # several layers concatenated: the deepest (-2 -> 23) decides
    assert ModelShape.from_llava_config(_small_dict(vision_feature_layer=[-2, -5])).vision.layers == 23
    assert ModelShape.from_llava_config(_small_dict(vision_feature_layer=[3, -20])).vision.layers == 5


def test_from_llava_config_small_dict_fields():
    shape = ModelShape.from_llava_config(_small_dict())
    assert shape.vision == VisionShape(28, 14, 8, 16, 23, 12, channels=3, cls_token=True)
    assert shape.text == TEXT


def test_from_llava_config_text_defaults():
    d = _small_dict()
    del d["text_config"]["num_key_value_heads"], d["text_config"]["head_dim"]
    t = ModelShape.from_llava_config(d).text
    assert (t.heads, t.kv_heads, t.head_dim) == (3, 3, 12 // 3)
    # explicit None (as some config.json files have) also falls back
    d["text_config"].update(num_key_value_heads=None, head_dim=None)
    t = ModelShape.from_llava_config(d).text
    assert (t.kv_heads, t.head_dim) == (3, 4)


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(kept=0),
    dict(kept=11),  # > S
    dict(layer=0),
    dict(layer=4),  # = number of layers
    dict(layer=5),
])
def test_prefill_flops_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        prefill_flops(SHAPE, seq=10, **kwargs)


def test_projector_full_strategy_and_concatenated_layers():
    """"full" keeps CLS for the projector (577 tokens); a list of feature layers widens its input."""
    base = _small_dict()
    full = ModelShape.from_llava_config({**base, "vision_feature_select_strategy": "full"}).vision
    multi = ModelShape.from_llava_config({**base, "vision_feature_layer": [-2, -5]}).vision
    default = ModelShape.from_llava_config(base).vision
    assert (default.projector_tokens, full.projector_tokens) == (default.patches, default.patches + 1)
    assert multi.feature_layers == 2 and default.feature_layers == 1
    D, Do, N = default.hidden, default.out_hidden, default.patches
    assert vision_flops(full)["projector"] == 2 * (N + 1) * D * Do + 2 * (N + 1) * Do * Do
    assert vision_flops(multi)["projector"] == 2 * N * (2 * D) * Do + 2 * N * Do * Do
    none = ModelShape.from_llava_config({**base, "vision_feature_layer": None}).vision
    assert none.layers == default.layers  # None means the default layer -2

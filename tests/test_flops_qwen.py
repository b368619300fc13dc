"""dart_ops/flops.py on Qwen2-VL / Qwen2.5-VL: the vision tower + merger on an image grid, the
M-RoPE decoder, and the speed-up limit.

Two kinds of check:
- hand arithmetic on tiny hand-made shapes (a matmul (m, k) @ (k, n) = 2*m*k*n, as tests/test_flops.py);
- torch.utils.flop_counter.FlopCounterMode on transformers' own modules (tiny random configs,
  eager attention): the vision tower, a whole prefill, and a DART-pruned prefill through
  dart_ops.eager.EagerDart. The analytic count equals the counter exactly, except DART's own
  selection (`dart`): the reference computes its cosine similarities elementwise
  (F.cosine_similarity), which the counter does not count, while the model counts them as the
  (pivots x D) @ (D x L) product they are.
Eager attention throughout: FlopCounterMode has no formula for the CPU SDPA kernel
(aten._scaled_dot_product_flash_attention_for_cpu, torch 2.13), so under SDPA it counts no attention.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace

import pytest

from dart_ops.flops import (
    ModelShape,
    QwenVisionShape,
    TextShape,
    VisionShape,
    prefill_flops,
    speedup_limit,
    vision_flops,
)
from dart_ops.spec import DartConfig

# Hand shapes: width 8, MLP 16, merger to 12; Qwen2.5 with 28 px windows (1 merge unit = 4 patches).
QWEN2_HAND = QwenVisionShape(hidden=8, intermediate=16, layers=2, out_hidden=12, gated_mlp=False,
                             full_attention=(0, 1))
QWEN25_HAND = QwenVisionShape(hidden=8, intermediate=16, layers=3, out_hidden=12, gated_mlp=True,
                              full_attention=(1,), window_size=28)
TEXT = TextShape(hidden=12, intermediate=20, layers=4, heads=3, kv_heads=1, head_dim=4, vocab=50)

# config.json of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct (sizes; the older layout:
# text sizes at the top level, the vision tower's input width as in_chans).
QWEN2_VL_2B = {
    "model_type": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
QWEN25_VL_3B = {
    "model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}


# --- hand-computed counts ---------------------------------------------------------------------------


def test_qwen2_vision_flops_by_hand():
    v = QWEN2_HAND.with_grid(4, 6)  # N = 24 patches, M = 6 tokens
    assert (v.patches, v.tokens) == (24, 6)
    assert vision_flops(v) == {
        "patch_embed": 2 * 24 * 1176 * 8,  # Conv3d (3, 2, 14, 14) -> 8 = a 1176 -> 8 matmul per patch
        # 2 blocks x (qkv 8 -> 24, proj 8 -> 8; scores + A @ V over all 24 patches; fc1, fc2)
        "layers": 2 * ((2 * 24 * 8 * 24 + 2 * 24 * 8 * 8) + 2 * (2 * 24 * 8 * 24) + 2 * (2 * 24 * 8 * 16)),
        "projector": 2 * 6 * 32 * 32 + 2 * 6 * 32 * 12,  # merger: 4 * 8 -> 32 -> 12 on 6 tokens
    }


def test_qwen25_vision_flops_by_hand():
    v = QWEN25_HAND.with_grid(4, 6)
    assert v.window_sizes() == [4] * 6  # 2 x 3 merge units, one per window
    proj, mlp = 2 * 24 * 8 * 24 + 2 * 24 * 8 * 8, 3 * (2 * 24 * 8 * 16)  # gate, up, down
    full, window = 2 * (2 * 24 * 8 * 24), 6 * 2 * (2 * 4 * 8 * 4)
    assert v.block_flops(full=True) == {"proj": proj, "attention": full, "mlp": mlp}
    assert v.block_flops(full=False) == {"proj": proj, "attention": window, "mlp": mlp}
    assert vision_flops(v) == {
        "patch_embed": 2 * 24 * 1176 * 8,
        "layers": 1 * (proj + full + mlp) + 2 * (proj + window + mlp),  # block 1 full, blocks 0, 2 windows
        "projector": 2 * 6 * 32 * 32 + 2 * 6 * 32 * 12,
    }


def test_window_sizes_by_hand():
    v = replace(QWEN25_HAND, window_size=112)  # 4 merge units = 8 patches a side
    # 12 x 20 patches = 6 x 10 units: rows [4, 2] x columns [4, 4, 2], row-major, 4 patches a unit
    assert v.with_grid(12, 20).window_sizes() == [64, 64, 32, 32, 32, 16]
    # 16 x 16 patches: exactly 2 x 2 full windows (transformers pads an empty window row and column; dropped)
    assert v.with_grid(16, 16).window_sizes() == [64] * 4
    assert v.with_grid(2, 2).window_sizes() == [4]


@pytest.mark.parametrize("grid", [(2, 2), (6, 6), (8, 12), (12, 20), (16, 16), (16, 22), (20, 10), (2, 100),
                                  (64, 80)])
@pytest.mark.parametrize("window_size", [112, 224])
def test_window_sizes_equal_runtime_window_layout(grid, window_size):
    """The same windows, in the same order, as runtime.qwen_vision.window_layout (the numpy port of
    transformers' get_vision_window_index that feeds the exported graph)."""
    from runtime.qwen_vision import QwenVisionConfig, window_layout

    _, cu = window_layout(*grid, QwenVisionConfig("qwen2_5_vl", window_size=window_size))
    sizes = replace(QWEN25_HAND, window_size=window_size).with_grid(*grid).window_sizes()
    assert sizes == [int(b - a) for a, b in itertools.pairwise(cu)]
    assert sum(sizes) == grid[0] * grid[1]


def test_window_attention_is_cheaper_than_full_on_a_large_grid():
    v = ModelShape.from_qwen_config(QWEN25_VL_3B).vision.with_grid(64, 80)  # 5120 patches, 1280 tokens
    assert v.window_sizes() == [64] * 80
    D = 1280
    assert v.block_flops(full=True)["attention"] == 4 * 5120 * D * 5120
    assert v.block_flops(full=False)["attention"] == 80 * 4 * 64 * D * 64  # 80x less
    all_full = replace(v, full_attention=tuple(range(32)))
    saved = 28 * 4 * D * (5120**2 - 80 * 64**2)  # 28 window blocks
    assert vision_flops(all_full)["layers"] - vision_flops(v)["layers"] == saved
    assert sum(vision_flops(v).values()) < sum(vision_flops(all_full).values())


# --- configs -------------------------------------------------------------------------------------------


def test_from_qwen_config_qwen2_vl_2b():
    shape = ModelShape.from_qwen_config(QWEN2_VL_2B)
    assert shape.vision == QwenVisionShape(hidden=1280, intermediate=5120, layers=32, out_hidden=1536,
                                           gated_mlp=False, full_attention=tuple(range(32)))
    assert shape.text == TextShape(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2,
                                   head_dim=128, vocab=151936)


def test_from_qwen_config_qwen25_vl_3b():
    shape = ModelShape.from_qwen_config(QWEN25_VL_3B)
    assert shape.vision == QwenVisionShape(hidden=1280, intermediate=3420, layers=32, out_hidden=2048,
                                           gated_mlp=True, full_attention=(7, 15, 23, 31), window_size=112)
    assert shape.text == TextShape(hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2,
                                   head_dim=128, vocab=151936)


@pytest.mark.parametrize("old", [QWEN2_VL_2B, QWEN25_VL_3B], ids=["qwen2_vl", "qwen2_5_vl"])
def test_transformers5_layout_gives_the_same_shape(old):
    """transformers 5's config.to_dict() moves the text sizes under "text_config" (and writes
    in_channels): the same shape as the checkpoint's config.json."""
    tf = pytest.importorskip("transformers")
    cls = {"qwen2_vl": tf.Qwen2VLConfig, "qwen2_5_vl": tf.Qwen2_5_VLConfig}[old["model_type"]]
    new = cls(**old).to_dict()
    assert "num_hidden_layers" not in new and "text_config" in new
    assert ModelShape.from_qwen_config(new) == ModelShape.from_qwen_config(old)


def test_qwen3_vl_vision_config_is_refused():
    qwen3 = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "out_hidden_size": 2048,
             "num_heads": 16, "patch_size": 16, "deepstack_visual_indexes": [8, 16, 24]}
    with pytest.raises(ValueError, match="neither Qwen2-VL's"):
        QwenVisionShape.from_config(qwen3)


def test_grid_is_required_and_checked():
    shape = ModelShape.from_qwen_config(QWEN25_VL_3B)
    with pytest.raises(ValueError, match="with_grid"):
        vision_flops(shape.vision)
    with pytest.raises(ValueError, match="with_grid"):
        prefill_flops(shape, seq=100)
    for gh, gw in [(3, 4), (4, 0), (-2, 4)]:
        with pytest.raises(ValueError, match="multiple of the merge size 2"):
            shape.with_grid(gh, gw)
    with pytest.raises(ValueError, match="window_size 100"):
        replace(QWEN25_HAND, window_size=100)
    llava = ModelShape(vision=VisionShape(28, 14, 8, 16, 2, 12), text=TEXT)
    with pytest.raises(TypeError, match="fixed image size"):
        llava.with_grid(2, 2)


def test_speedup_limit_on_a_qwen_shape():
    shape = ModelShape(vision=QWEN25_HAND.with_grid(12, 20), text=TEXT)  # 60 vision tokens
    S, a, L = 70, 3, shape.vision.tokens
    dart = DartConfig(keep_ratio=0.25)
    c = dart.counts(L, S - a - L)  # budget 15 -> T = 1: 4 image pivots + 8 -> 12 kept
    assert (L, c.kept_vision, c.kept_len(S)) == (60, 12, 22)
    full = prefill_flops(shape, S)["total"]
    pruned = prefill_flops(shape, S, 22, 2, L, 8)
    assert pruned["dart"] == 2 * 8 * 12 * 60
    assert pruned["vision"] == sum(vision_flops(shape.vision).values())
    assert speedup_limit(shape, S, a, L, dart) == pytest.approx(full / pruned["total"], rel=1e-12)
    assert 1.0 < speedup_limit(shape, S, a, L, dart) < speedup_limit(shape, S, a, L, dart, image=False)


def test_shape_serialises_for_the_bench_meta():
    shape = ModelShape.from_qwen_config(QWEN25_VL_3B).with_grid(16, 22)
    meta = json.loads(json.dumps(asdict(shape)))
    assert meta["vision"]["grid"] == [16, 22] and meta["vision"]["full_attention"] == [7, 15, 23, 31]


# --- against FlopCounterMode on transformers' modules ----------------------------------------------


def _hf_config(model_type: str):
    """Tiny Qwen2-VL / Qwen2.5-VL config: real patch, merge and window sizes, 2-3 vision blocks, 3 text
    layers (GQA 4/2, M-RoPE), vocabulary 100 with the special tokens at 90-93."""
    tf = pytest.importorskip("transformers")
    vision = {
        "qwen2_vl": {"depth": 2, "embed_dim": 32, "hidden_size": 48, "mlp_ratio": 3, "num_heads": 2},
        "qwen2_5_vl": {"depth": 3, "hidden_size": 32, "intermediate_size": 40, "out_hidden_size": 48,
                       "num_heads": 2, "window_size": 112, "fullatt_block_indexes": [1]},
    }[model_type]
    text = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 2]}}
    cls = {"qwen2_vl": tf.Qwen2VLConfig, "qwen2_5_vl": tf.Qwen2_5_VLConfig}[model_type]
    return cls(vision_config=vision, text_config=text, image_token_id=90, video_token_id=91,
               vision_start_token_id=92, vision_end_token_id=93)


def _hf_model(model_type: str):
    tf = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    cls = {"qwen2_vl": tf.Qwen2VLForConditionalGeneration, "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration}
    torch.manual_seed(0)
    return cls[model_type]._from_config(_hf_config(model_type), attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def hf(request):
    return request.param, _hf_model(request.param)


def _count(fn):
    """(FLOPs by module name, total) that FlopCounterMode sees while fn() runs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return per_module, counter.get_total_flops()


def _image(gh: int, gw: int):
    import torch

    return torch.randn(gh * gw, 1176), torch.tensor([[1, gh, gw]])  # (N, 1176), (1, 3)


@pytest.mark.parametrize("grid", [(12, 20), (16, 16), (6, 10)])
def test_vision_tower_equals_flop_counter(hf, grid):
    """Patch embedding, blocks (full and window attention) and merger: exact, part by part."""
    model_type, model = hf
    visual = model.model.visual
    pixels, thw = _image(*grid)
    per_module, total = _count(lambda: visual(pixels, grid_thw=thw))
    v = ModelShape.from_qwen_config(model.config.to_dict()).vision.with_grid(*grid)
    parts = vision_flops(v)
    name = type(visual).__name__
    assert per_module[f"{name}.patch_embed"] == parts["patch_embed"]
    assert sum(per_module[f"{name}.blocks.{i}"] for i in range(v.layers)) == parts["layers"]
    assert per_module[f"{name}.merger"] == parts["projector"]
    assert total == sum(parts.values())
    if model_type == "qwen2_5_vl":  # block 1 full, blocks 0 and 2 windowed: they differ
        assert per_module[f"{name}.blocks.1"] == sum(v.block_flops(full=True).values())
        assert per_module[f"{name}.blocks.0"] == sum(v.block_flops(full=False).values())


def _prompt(tokens: int):
    """2 text tokens, <|vision_start|>, `tokens` x <|image_pad|>, <|vision_end|>, 5 text tokens: the
    image span starts at 3."""
    import torch

    ids = torch.tensor([[5, 6, 92] + [90] * tokens + [93, 7, 8, 9, 10, 11]])  # (1, S)
    S = ids.shape[1]
    return ids, torch.arange(S)[None, None].expand(3, 1, S)  # M-RoPE ids (values do not change FLOPs)


def test_prefill_equals_flop_counter(hf):
    """One whole HF forward (image + text, logits of the last token): vision, 3 decoder layers on S
    tokens and the LM head, exactly."""
    _, model = hf
    gh, gw = 12, 20
    ids, pos = _prompt(gh * gw // 4)
    pixels, thw = _image(gh, gw)
    per_module, total = _count(lambda: model(input_ids=ids, pixel_values=pixels, image_grid_thw=thw,
                                             position_ids=pos, logits_to_keep=1, use_cache=False))
    shape = ModelShape.from_qwen_config(model.config.to_dict()).with_grid(gh, gw)
    parts = prefill_flops(shape, seq=ids.shape[1])
    name = type(model).__name__
    assert per_module[f"{name}.model.visual"] == parts["vision"]
    assert per_module[f"{name}.model.language_model"] == parts["layers_before_k"] + parts["layers_from_k"]
    assert per_module[f"{name}.lm_head"] == parts["lm_head"]
    assert total == parts["total"]


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_pruned_prefill_equals_flop_counter_but_the_selection(hf, ratio):
    """DART at K = 1 through the eager baseline (dart_ops.eager.EagerDart, one token: prefill only):
    the vision tower, layer 0 on S tokens and layers 1-2 on the S' kept tokens match exactly; DART's
    selection is the only difference (counted here, elementwise in the reference)."""
    _, model = hf
    from dart_ops.eager import EagerDart

    gh, gw = 12, 20
    L = gh * gw // 4
    ids, pos = _prompt(L)
    S = ids.shape[1]
    pixels, thw = _image(gh, gw)
    dart = DartConfig(layer=1, keep_ratio=ratio)
    eager = EagerDart(model, dart)
    out = []
    _, total = _count(lambda: out.append(eager.generate(ids, pixels, max_new_tokens=1, position_ids=pos,
                                                        image_kwargs={"image_grid_thw": thw})))
    c = dart.counts(L, S - 3 - L)
    kept = c.kept_len(S)
    assert len(out[0].kept_positions) == kept == (S if ratio == 1.0 else S - L + 12)
    shape = ModelShape.from_qwen_config(model.config.to_dict()).with_grid(gh, gw)
    parts = prefill_flops(shape, S, kept, dart.layer, L, c.pivots_image + c.pivots_text)
    assert parts["dart"] == (0 if ratio == 1.0 else 2 * 8 * 48 * 60)  # 8 pivots x width 48 x 60 tokens
    assert total == parts["total"] - parts["dart"]

"""The random-weight presets: llava-tiny (tests), llava-bench (CPU benchmark), llava-7b-shape (GPU
benchmark at the real LLaVA-1.5-7B shapes). Configs and parameter counts, no heavy weights."""

import pytest
import torch

from export import families
from export.families.llava import RANDOM_PRESETS, build_random_model, random_config


def test_presets_are_registered():
    table = families.presets()
    for name in ("llava", *RANDOM_PRESETS):
        assert table[name].name == "llava"


def test_llava_bench_proportions():
    """576 vision tokens, >= 8 decoder layers (K = 2 leaves 6 pruned), hidden >= 512, MHA, the
    7B MLP ratio and vocabulary."""
    cfg = random_config("llava-bench")
    v, t = cfg.vision_config, cfg.text_config
    assert (v.image_size // v.patch_size) ** 2 == 576
    assert t.num_hidden_layers >= 8 and t.hidden_size >= 512
    assert t.num_key_value_heads == t.num_attention_heads
    assert t.intermediate_size / t.hidden_size == pytest.approx(11008 / 4096, rel=0.01)
    assert t.vocab_size == 32064 and cfg.image_token_id < t.vocab_size


def test_llava_7b_shape_matches_llava_1_5_7b():
    """Built on the meta device (no memory): the parameter count of llava-hf/llava-1.5-7b-hf."""
    model = build_random_model("llava-7b-shape", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072
    t = model.config.text_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (4096, 11008, 32, 32)
    v = model.config.vision_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers) == (1024, 4096, 24)


def test_random_presets_are_seeded():
    a = build_random_model("llava-tiny", seed=3)
    b = build_random_model("llava-tiny", seed=3)
    c = build_random_model("llava-tiny", seed=4)
    pa, pb, pc = (dict(m.named_parameters())["lm_head.weight"] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_build_in_dtype():
    model = build_random_model("llava-tiny", dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}

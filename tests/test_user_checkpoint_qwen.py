"""A user's own Qwen2.5-VL checkpoint, sized unlike any preset (vision depth 2, width 48, 3 heads,
full attention in block 0, 224 px windows; 3 decoder layers, hidden 96, 6 / 2 heads, M-RoPE
section [4, 2, 2], vocabulary 1100; its own min / max pixels, mean / std and chat template), saved
with save_pretrained and exported with `--model DIR`: the runtime's pixels, prompt ids and greedy
tokens (ratio 1.0) equal the checkpoint's own processor + chat template + HF generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from export.families import build_seeded
from export.families import qwen_presets as q

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}Look: <|vision_start|><|image_pad|><|vision_end|>\n{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTION = "What is in the picture?"
N_NEW = 16
MIN_PIXELS, MAX_PIXELS = 8 * 28 * 28, 160 * 28 * 28  # 8 .. 160 vision tokens


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    ids = q.TOKEN_IDS
    d = tmp_path_factory.mktemp("user") / "my-qwen"
    vision = {"depth": 2, "hidden_size": 48, "intermediate_size": 80, "num_heads": 3, "window_size": 224,
              "fullatt_block_indexes": [0], "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
              "out_hidden_size": 96}
    text = {"hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 6,
            "num_key_value_heads": 2, "vocab_size": 1100, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    model = build_seeded(lambda: Qwen2_5_VLForConditionalGeneration(config), 5, None, None, 6.0)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                               image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    tokenizer = q.tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = q.image_text_processor("qwen2_5_vl")(image_processor=image_processor, tokenizer=tokenizer,
                                                     chat_template=CHAT_TEMPLATE)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d, model, processor


def test_user_qwen_checkpoint_exports_and_matches_transformers(user_checkpoint, tmp_path):
    import runtime
    from export.build import build, parse_args
    from runtime.steps import Request

    d, model, processor = user_checkpoint
    out = tmp_path / "engine"
    build(parse_args(["--model", str(d), "--out", str(out)]))
    pipe = runtime.load(out)
    assert pipe.manifest.preprocess.image.max_pixels == MAX_PIXELS
    assert pipe.manifest.dynamic_axes["vision_tokens"].max == 160
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((400, 300), Image.BILINEAR)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False)
    assert "Look: <|vision_start|>" in prompt
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    p = pipe.prepare(Request(prompt=QUESTION, image=image))
    assert p.ids == inputs["input_ids"][0].tolist()
    assert np.array_equal(p.vision.feeds["pixel_values"], inputs["pixel_values"].numpy())
    eos = list(pipe.manifest.tokens.eos_token_ids)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos[-1])[0, inputs["input_ids"].shape[1]:].tolist()
    got = pipe.generate(QUESTION, image=image, keep_ratio=1.0, max_new_tokens=N_NEW)
    want = want[:next((i for i, t in enumerate(want) if t in eos), len(want))]
    assert got.token_ids == want and len(set(want)) > 1

"""A user's own LLaVA checkpoint, sized unlike any preset (224 px crop after a 240 px bilinear
resize with pad-to-square, patch 16 -> 196 vision tokens, 3 decoder layers, 6 heads / 3 KV heads,
vocabulary 1100, its own mean/std and its own chat template), saved with save_pretrained and
exported with `--model DIR`: the runtime's pixels, prompt ids and greedy tokens (ratio 1.0) equal
the checkpoint's own processor + chat template + HF generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.families.llava import TINY_TOKENIZER

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QUESTION = "What is in the picture?"
N_NEW = 16


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaImageProcessor, LlavaProcessor, PreTrainedTokenizerFast)

    d = tmp_path_factory.mktemp("user") / "my-llava"
    vision = CLIPVisionConfig(image_size=224, patch_size=16, hidden_size=48, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=3, projection_dim=32)
    text = LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=6,
                       num_key_value_heads=3, vocab_size=1100, max_position_embeddings=2048, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=1023, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(3)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # peaked logits, so greedy output depends on the image and the prompt
        for name, w in model.named_parameters():
            if w.dim() == 2 and "embed" not in name and "norm" not in name:
                w.mul_(6.0)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TINY_TOKENIZER), bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    image_processor = LlavaImageProcessor(do_pad=True, size={"shortest_edge": 240}, resample=2,
                                          crop_size={"height": 224, "width": 224},
                                          image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=16,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def exported(user_checkpoint, export_once):
    return export_once(str(user_checkpoint), "--max-seq", "512", "--max-context", "1024")


@pytest.fixture(scope="module")
def hf(user_checkpoint):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (LlavaForConditionalGeneration.from_pretrained(user_checkpoint).eval(),
            AutoProcessor.from_pretrained(user_checkpoint))


@pytest.fixture(scope="module")
def image():
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (150, 300, 3), dtype=np.uint8))  # landscape: pad matters


def _hf_inputs(processor, image, question):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    return processor(images=image, text=text, return_tensors="pt")


def test_manifest_records_the_checkpoints_own_settings(exported):
    from runtime.manifest import read_manifest

    m = read_manifest(exported)
    assert (m.preprocess.image_size, m.preprocess.shortest_edge, m.preprocess.pad_to_square,
            m.preprocess.resample) == (224, 240, True, "bilinear")
    assert m.preprocess.mean == (0.5, 0.4, 0.3) and m.preprocess.std == (0.2, 0.25, 0.3)
    assert m.tokens.image_seq_len == 196 and m.decoder.num_layers == 3 and m.decoder.vocab_size == 1100
    assert (m.decoder.num_kv_heads, m.decoder.head_dim, m.decoder.hidden_size) == (3, 16, 96)
    assert m.prompt.template == "<|user|> <image>\n{prompt} <|end|>\n<|assistant|>"
    assert m.prompt.template_text_only == "<|user|> {prompt} <|end|>\n<|assistant|>"


def test_pixels_ids_and_tokens_equal_transformers(exported, hf, image):
    import runtime
    from runtime.preprocess import preprocess

    model, processor = hf
    pipe = runtime.load(exported)
    inputs = _hf_inputs(processor, image, QUESTION)
    assert np.array_equal(preprocess(image, pipe.manifest.preprocess), inputs["pixel_values"].numpy())
    assert pipe.prompt.encode(QUESTION, with_image=True) == inputs["input_ids"][0].tolist()

    out = pipe.generate(QUESTION, image=image, keep_ratio=1.0, max_new_tokens=N_NEW)
    want = model.generate(**inputs, do_sample=False, max_new_tokens=N_NEW)[0, inputs["input_ids"].shape[1]:]
    want = want.tolist()
    eos = processor.tokenizer.eos_token_id
    want = want[:want.index(eos)] if eos in want else want
    assert out.token_ids == want
    assert len(set(out.token_ids)) > 1  # the test can tell models apart
    assert out.kept_positions == list(range(len(inputs["input_ids"][0])))
    pruned = pipe.generate(QUESTION, image=image, keep_ratio=0.111, max_new_tokens=2)
    assert pruned.timings["kept_vision_tokens"] == 4 + 8 * 2  # budget round(0.111 * 196) = 22 -> T = 2

"""A user's own LLaVA-NeXT checkpoint, sized unlike any preset (CLIP 224 px crops of 14 px patches:
16 x 16 = 256 tokens per crop; its own grid pinpoints, one of them a single tile; a Llama decoder of
3 layers, hidden 96, 6 / 3 heads, vocabulary 1100; its own mean / std and chat template), saved with
save_pretrained and exported with `--model DIR`: the runtime's pixels, prompt ids and greedy tokens
(ratio 1.0) equal the checkpoint's own processor + chat template + HF generate on three tile
layouts, a pruned run equals the eager DART baseline, and a checkpoint whose processor tiles with
other pinpoints than its config unpads with is refused before anything is written."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import runtime
from dart_ops.spec import DartConfig
from export.families import build_seeded
from export.families.llava import TINY_TOKENIZER
from runtime.steps import Request
from vlm_inputs import hf_chat_inputs, smooth_image

CROP, PATCH = 224, 14  # grid 16: 256 tokens per crop
PINPOINTS = [[224, 448], [448, 224], [448, 448], [224, 224]]  # (height, width); [224, 224]: one tile
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QUESTION = "What is in the picture?"
N_NEW = 16


# name: (image, pinpoint chosen (h, w), crops, vision tokens). L = 256 + h'(w' + 1) on the ch x cw map
# of the pinpoint (16 tokens per 224 px), unpadded to the image's aspect (h' = ch - 2 * pad):
IMAGES = {
    "small": (smooth_image(150, 120, 1), (224, 224), 2, 256 + 12 * 17),  # 16 x 16 map, 12.8 -> 12 rows kept
    "wide": (smooth_image(440, 200, 2), (224, 448), 3, 256 + 14 * 33),  # 16 x 32 map, 14.5 -> 14 rows
    "large": (smooth_image(500, 460, 3), (448, 448), 5, 256 + 30 * 33),  # 32 x 32 map, 29.4 -> pad 1: 30 rows
}


def _processor(pinpoints):
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor, PreTrainedTokenizerFast

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP}, image_grid_pinpoints=pinpoints,
        resample=3, image_mean=MEAN, image_std=STD, do_pad=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TINY_TOKENIZER), bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                              vision_feature_select_strategy="default", image_token="<image>",
                              num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    d = tmp_path_factory.mktemp("user") / "my-llava-next"
    vision = CLIPVisionConfig(image_size=CROP, patch_size=PATCH, hidden_size=48, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=3, projection_dim=32)
    text = LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=6,
                       num_key_value_heads=3, vocab_size=1100, max_position_embeddings=4096, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=1023, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu",
                             image_grid_pinpoints=PINPOINTS, image_seq_length=(CROP // PATCH) ** 2)
    # Decoder x8 (peaked logits: greedy output varies), vision tower and projector x2 (CLIP with large
    # weights is ill-conditioned: export validation's 1e-4 would fail; llava_next_presets.py).
    model = build_seeded(lambda: LlavaNextForConditionalGeneration(config), 7, None, None, 8.0)
    with torch.no_grad():
        for part in (model.model.vision_tower, model.model.multi_modal_projector):
            for name, w in part.named_parameters():
                if w.dim() == 2 and "embed" not in name and "norm" not in name:
                    w.mul_(2.0 / 8.0)
    model.save_pretrained(d)
    _processor(PINPOINTS).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def exported(user_checkpoint, export_once):
    return export_once(str(user_checkpoint), "--max-seq", "1536", "--max-context", "2048")


@pytest.fixture(scope="module")
def hf(user_checkpoint):
    """The checkpoint as a user loads it: model and processor from the directory (the PIL backend)."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

    processor = LlavaNextProcessor.from_pretrained(user_checkpoint)
    processor.image_processor = LlavaNextImageProcessorPil.from_pretrained(user_checkpoint)
    return LlavaNextForConditionalGeneration.from_pretrained(user_checkpoint).eval(), processor


@pytest.fixture(scope="module")
def pipe(exported):
    return runtime.load(exported)


def test_manifest_records_the_checkpoints_own_settings(pipe, hf):
    m = pipe.manifest
    spec = m.preprocess.image
    assert (spec.crop_size, spec.shortest_edge, spec.patch, spec.resample) == (CROP, CROP, PATCH, "bicubic")
    assert [list(p) for p in spec.pinpoints] == PINPOINTS
    assert list(spec.mean) == MEAN and list(spec.std) == STD
    assert hf[1].image_processor.image_grid_pinpoints == PINPOINTS  # what the processor tiles with
    grid = CROP // PATCH
    maps = [(h // CROP * grid, w // CROP * grid) for h, w in PINPOINTS]  # (ch, cw) feature map per pinpoint
    most = grid * grid + max(ch * (cw + 1) for ch, cw in maps)
    assert most == 256 + 32 * 33 == 1312
    axes = m.dynamic_axes
    assert axes["vision_tokens"].max == most and m.dart.max_span == most + 8
    assert (axes["crops"].min, axes["crops"].max) == (2, 5)  # the single tile + base .. 2 x 2 tiles + base
    assert m.tokens.image_seq_len is None and m.tokens.image_token_id == 1023
    assert (m.decoder.num_layers, m.decoder.vocab_size, m.decoder.num_kv_heads, m.decoder.head_dim,
            m.decoder.hidden_size) == (3, 1100, 3, 16, 96)
    assert m.prompt.template == "<|user|> <image>\n{prompt} <|end|>\n<|assistant|>"


@pytest.mark.parametrize("name", IMAGES)
def test_pixels_and_prompt_ids_equal_the_processors(pipe, hf, name):
    _, processor = hf
    image, best, crops, tokens = IMAGES[name]
    inputs = hf_chat_inputs(processor, image, QUESTION)
    p = pipe.prepare(Request(prompt=QUESTION, image=image))
    assert p.vision.layout.best == best
    assert inputs["pixel_values"].shape == (1, crops, 3, CROP, CROP)  # one image: no batch padding
    assert np.array_equal(p.vision.feeds["pixel_values"], inputs["pixel_values"][0].numpy())
    assert p.ids == inputs["input_ids"][0].tolist()
    assert p.span[1] == p.vision.tokens[0] == tokens


@pytest.mark.parametrize("name", IMAGES)
def test_ratio_one_equals_hf_generate(pipe, hf, name):
    model, processor = hf
    image = IMAGES[name][0]
    inputs = hf_chat_inputs(processor, image, QUESTION)
    eos = list(pipe.manifest.tokens.eos_token_ids)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos,
                              pad_token_id=pipe.manifest.tokens.pad_token_id)[0, inputs["input_ids"].shape[1]:]
    want = want.tolist()
    want = want[:next((i for i, t in enumerate(want) if t in eos), len(want))]
    got = pipe.generate(QUESTION, image=image, keep_ratio=1.0, max_new_tokens=N_NEW)
    assert got.token_ids == want
    assert len(set(want)) > 1  # the model's output varies: the test can tell models apart
    assert got.kept_positions == list(range(inputs["input_ids"].shape[1]))


def test_pruned_equals_eager_dart(pipe, hf):
    from export.families import families

    model, processor = hf
    image, _, _, L = IMAGES["large"]
    inputs = hf_chat_inputs(processor, image, QUESTION)
    d = pipe.manifest.dart
    eager = families()["llava_next"].eager(model, DartConfig(d.layer, d.pivots_image, d.pivots_text,
                                                             keep_ratio=0.111))
    want = eager.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=N_NEW,
                          image_kwargs={"image_sizes": inputs["image_sizes"]})
    got = pipe.generate(QUESTION, image=image, keep_ratio=0.111, max_new_tokens=N_NEW, ignore_eos=True)
    kept = got.timings["kept_vision_tokens"]
    assert (L, kept) == (1246, 4 + 8 * 17)  # budget round(0.111 * 1246) = 138 -> T = 17
    assert kept < L // 2
    assert got.kept_positions == want.kept_positions
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose(got.first_logits, want.first_logits[0].numpy(), atol=1e-4, rtol=0)


def test_processor_pinpoints_unlike_the_configs_are_refused(user_checkpoint, tmp_path, capsys):
    """The model unpads with config.image_grid_pinpoints, the processor tiles with its own: when they
    differ the export stops with one line naming both, and writes nothing."""
    from export.build import build, main, parse_args

    bad = tmp_path / "mismatched"
    shutil.copytree(user_checkpoint, bad)
    theirs = PINPOINTS[:3]  # the processor without the single-tile pinpoint
    _processor(theirs).save_pretrained(bad)
    engines = tmp_path / "engines"
    out = engines / "x"
    with pytest.raises(ValueError) as e:
        build(parse_args(["--model", str(bad), "--out", str(out)]))
    msg = str(e.value)
    assert "\n" not in msg and str(theirs) in msg and str(PINPOINTS) in msg
    assert main(["--model", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and str(theirs) in err and str(PINPOINTS) in err
    assert not out.exists() and list(engines.iterdir()) == []

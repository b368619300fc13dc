"""Qwen2-VL / Qwen2.5-VL inputs, against transformers 5.24 itself:
- runtime.qwen_preprocess.preprocess == Qwen2VLImageProcessorPil (np.array_equal: pixel_values and
  the grid) on sizes that round, upscale to min_pixels and shrink to max_pixels, and on alpha, palette
  transparency, grey, array and path inputs, under several processor settings (both tiny presets use
  that processor class; their processors are checked to declare the same preprocessing);
- the tiny presets' tokenizer + Qwen2-VL chat template give the prompt the runtime must build;
- mrope_positions / decode_positions == get_rope_index / compute_3d_position_ids (ids and delta);
- the tiny models' greedy output varies (weights scaled), the 3B-shape config is the real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.errors import InputError
from runtime.qwen_preprocess import (
    QwenPreprocessSpec,
    decode_positions,
    grid_of,
    image_tokens,
    mrope_positions,
    preprocess,
    smart_resize,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from tokenizers import Tokenizer
from transformers import Qwen2VLImageProcessorPil
from transformers.image_utils import load_image as hf_load_image

from export.families import qwen_presets as qp

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("qwen2-vl-tiny", "qwen2.5-vl-tiny")
QUESTION = "What is in the image?"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
TEMPLATE = SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n" \
    "<|im_start|>assistant\n"
TEMPLATE_TEXT_ONLY = SYSTEM + "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
PAD = qp.TOKEN_IDS["<|image_pad|>"]


def _noise(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def _images() -> dict:
    """name -> PIL image or array, all generated (W x H in the names)."""
    rgba = np.dstack([_noise(60, 90, seed=1), _noise(60, 90, 0, seed=2)])
    rgba[:20, :, 3] = 0  # a fully transparent band over non-black colours; the rest partly transparent
    p = Image.fromarray(np.random.default_rng(3).integers(0, 4, (70, 50), np.uint8), "P")
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    p.info["transparency"] = 1  # one transparent palette index
    return {
        "640x480": Image.fromarray(_noise(480, 640)), "1000x333": Image.fromarray(_noise(333, 1000, seed=4)),
        "333x1000": Image.fromarray(_noise(1000, 333, seed=5)), "37x51": Image.fromarray(_noise(51, 37, seed=6)),
        "1200x900": Image.fromarray(_noise(900, 1200, seed=7)), "rgba": Image.fromarray(rgba),
        "la": Image.fromarray(rgba[..., 2:], "LA"), "p_key": p, "grey": Image.fromarray(_noise(40, 300, 0, 8)),
        "array": _noise(123, 456, seed=9),
    }


IMAGES = _images()


def _variants() -> dict:
    """name -> Qwen2VLImageProcessorPil: the tiny presets' (<= 256 tokens), the class defaults (<= 1280),
    a small max (<= 64 tokens: 1200x900 shrinks to it), a large min (>= 300 tokens: most images grow),
    and bilinear without rescale / normalise."""
    return {
        "tiny": qp.tiny_processor().image_processor,
        "defaults": qp.tiny_image_processor(qp.MIN_PIXELS, qp.MAX_PIXELS),
        "max64": qp.tiny_image_processor(qp.MIN_PIXELS, 64 * 28 * 28),
        "min300": qp.tiny_image_processor(300 * 28 * 28, 1280 * 28 * 28),
        "bilinear-raw": Qwen2VLImageProcessorPil(max_pixels=64 * 28 * 28, resample=2, do_rescale=False,
                                                 do_normalize=False),
    }


@pytest.fixture(scope="module")
def variants():
    return {name: (ip, qp.preprocess_spec(ip)) for name, ip in _variants().items()}


def hf_pixels(ip, image):
    out = ip(images=image, return_tensors="np")
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


@pytest.mark.parametrize("variant", ["tiny", "defaults", "max64", "min300", "bilinear-raw"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_pixels_equal_the_processor(name, variant, variants):
    ip, spec = variants[variant]
    image = IMAGES[name]
    want, grid_thw = hf_pixels(ip, image)
    got, grid = preprocess(image, spec)
    assert grid_thw.tolist() == [[1, *grid]]
    assert got.dtype == np.float32 and got.shape == (grid[0] * grid[1], 1176)
    assert np.array_equal(got, want)
    size = image.shape[:2] if isinstance(image, np.ndarray) else image.size[::-1]
    assert grid_of(*size, QwenPreprocessSpec.from_json(spec)) == grid


def test_size_limits_are_reached(variants):
    """The images above do hit each branch of smart_resize (else the equality tests prove less)."""
    def tokens(name, variant):
        return image_tokens(preprocess(IMAGES[name], variants[variant][1])[1])

    # shrunk to the max: rounding alone gives 896 x 1204 px (32 x 43 patches, 16 * 21 = 336 tokens)
    assert tokens("1200x900", "max64") == 6 * 9 <= 64 and tokens("1200x900", "tiny") == 13 * 18 <= 256
    # grown to the min: rounding alone gives 56 x 28 px (1 token)
    assert tokens("37x51", "tiny") == 3 * 2 >= 4 and tokens("37x51", "min300") == 21 * 15 >= 300
    assert tokens("640x480", "defaults") == 17 * 23  # only rounded: 476 x 644 px


def test_path_input_equals_hf_load_image(tmp_path, variants):
    ip, spec = variants["tiny"]
    path = tmp_path / "rgba.png"
    IMAGES["rgba"].save(path)
    want, _ = hf_pixels(ip, hf_load_image(str(path)))
    assert np.array_equal(preprocess(path, spec)[0], want)
    assert np.array_equal(preprocess(str(path), spec)[0], want)


def test_alpha_is_composited_on_white(variants):
    """A fully transparent pixel becomes white (1.0 after rescale), not its hidden colour."""
    spec = dict(variants["bilinear-raw"][1], rescale=1 / 255, min_pixels=56 * 56, max_pixels=56 * 56)
    rgba = np.zeros((56, 56, 4), np.uint8)  # transparent black
    x, grid = preprocess(Image.fromarray(rgba), spec)
    assert grid == (4, 4) and np.all(x == np.float32(1.0))


def test_smart_resize_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    sizes = [(h, w) for h in (1, 2, 13, 14, 27, 28, 41, 42, 55, 56, 100, 333, 480, 1000, 4000) for w in
             (1, 3, 14, 28, 42, 70, 98, 200, 640, 1001, 3000, 7000) if max(h, w) / min(h, w) <= 200]
    for lo, hi in ((56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 16384 * 28 * 28), (28 * 28, 28 * 28 * 4)):
        for h, w in sizes:
            assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_extreme_aspect_is_an_input_error(variants):
    with pytest.raises(InputError, match=r"^image is 402x2: aspect ratio 201.0 is over 200") as e:
        preprocess(_noise(2, 402), variants["tiny"][1])
    assert "\n" not in str(e.value)
    assert preprocess(_noise(2, 400), variants["tiny"][1])[1] == (2, 58)  # 200 is allowed: 28 x 812 px


# --- the spec --------------------------------------------------------------------------------------


def test_spec_json_round_trip(variants):
    for _, spec in variants.values():
        s = QwenPreprocessSpec.from_json(json.loads(json.dumps(spec)))
        assert s.to_json() == spec
    assert QwenPreprocessSpec.from_json(QwenPreprocessSpec().to_json()) == QwenPreprocessSpec()
    assert QwenPreprocessSpec().factor == 28 and QwenPreprocessSpec().patch_dim == 1176
    tiny = QwenPreprocessSpec.from_json(variants["tiny"][1])
    assert tiny == QwenPreprocessSpec(max_pixels=qp.TINY_MAX_PIXELS)  # the defaults, a smaller max


def test_both_presets_declare_the_same_preprocessing():
    a, b = (qp.tiny_processor(p).image_processor for p in PRESETS)
    assert type(a) is type(b) is Qwen2VLImageProcessorPil
    assert qp.preprocess_spec(a) == qp.preprocess_spec(b)


@pytest.mark.parametrize("change, message", [
    ({"patch": 0}, "patch must be a positive integer, got 0"),
    ({"merge": True}, "merge must be a positive integer, got True"),
    ({"temporal": 2.0}, "temporal must be a positive integer, got 2.0"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "need min_pixels <= max_pixels"),
    ({"max_pixels": 1 << 30}, "need min_pixels <= max_pixels <= 67108864"),
    ({"mean": [0.5, 0.5]}, "mean must be 3 finite numbers"),
    ({"mean": 0.5}, "mean must be a list of 3 numbers"),
    ({"std": [0.5, 0.0, 0.5]}, "std must be positive"),
    ({"std": [0.5, float("nan"), 0.5]}, "std must be 3 finite numbers"),
    ({"rescale": "1/255"}, "rescale must be a positive finite number"),
    ({"resample": "lanczos"}, "resample 'lanczos' is not one the runtime reproduces"),
    ({"size": 3}, r"missing \[\], unknown \['size'\]"),
])
def test_bad_spec_is_one_line_value_error(change, message):
    d = {**QwenPreprocessSpec().to_json(), **change}
    with pytest.raises(ValueError, match=message) as e:
        QwenPreprocessSpec.from_json(d)
    assert "\n" not in str(e.value)


def test_spec_missing_field():
    d = QwenPreprocessSpec().to_json()
    del d["merge"]
    with pytest.raises(ValueError, match=r"missing \['merge'\], unknown \[\]"):
        QwenPreprocessSpec.from_json(d)
    with pytest.raises(ValueError, match="expected an object, got list"):
        QwenPreprocessSpec.from_json([])


def test_exporter_refuses_what_the_runtime_cannot_do():
    with pytest.raises(ValueError, match="resample"):
        qp.preprocess_spec(Qwen2VLImageProcessorPil(resample=1))  # lanczos
    with pytest.raises(ValueError, match="do_resize"):
        qp.preprocess_spec(Qwen2VLImageProcessorPil(do_resize=False))


# --- tokenizer, chat template, processor -----------------------------------------------------------


def test_tokenizer_file_is_regenerated_exactly():
    assert qp.make_tiny_tokenizer().to_str(pretty=True) + "\n" == qp.TINY_TOKENIZER.read_text()


@pytest.mark.parametrize("preset", PRESETS)
def test_config_token_ids_are_the_tokenizer_s(preset):
    cfg = qp.random_config(preset)
    tok = Tokenizer.from_file(str(qp.TINY_TOKENIZER))
    assert tok.get_vocab_size() == qp.TINY_VOCAB == cfg.text_config.vocab_size == 1024
    assert cfg.image_token_id == tok.token_to_id("<|image_pad|>") == 1022
    assert cfg.video_token_id == tok.token_to_id("<|video_pad|>") == 1023
    assert cfg.vision_start_token_id == tok.token_to_id("<|vision_start|>") == 1020
    assert cfg.vision_end_token_id == tok.token_to_id("<|vision_end|>") == 1021
    assert cfg.text_config.eos_token_id == tok.token_to_id("<|im_end|>") == 1019
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert 2 * sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim


def _messages(with_image: bool) -> list:
    content = [{"type": "image"}] if with_image else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}]


@pytest.mark.parametrize("preset", PRESETS)
def test_prompt_is_what_the_runtime_builds(preset):
    """HF: apply_chat_template, then the processor expands <|image_pad|> to L tokens. The runtime:
    the same string with <|image_pad|> repeated L times, encoded by the tokenizers library (no BOS)."""
    proc = qp.tiny_processor(preset)
    tok = Tokenizer.from_file(str(qp.TINY_TOKENIZER))
    text = proc.apply_chat_template(_messages(True), add_generation_prompt=True)
    assert text == TEMPLATE.format(prompt=QUESTION)
    enc = proc(text=text, images=IMAGES["1000x333"], return_tensors="np")
    ids = enc["input_ids"][0].tolist()
    L = image_tokens(tuple(enc["image_grid_thw"][0, 1:]))
    assert L == 9 * 27 and ids.count(PAD) == L  # 252 x 756 px
    assert ids == tok.encode(text.replace("<|image_pad|>", "<|image_pad|>" * L)).ids
    head = tok.encode(SYSTEM + "<|im_start|>user\n<|vision_start|>").ids
    tail = tok.encode(QUESTION + "<|im_end|>\n<|im_start|>assistant\n").ids
    assert ids == head + [PAD] * L + [qp.TOKEN_IDS["<|vision_end|>"]] + tail
    assert enc["mm_token_type_ids"][0].tolist() == [int(i == PAD) for i in ids]

    text = proc.apply_chat_template(_messages(False), add_generation_prompt=True)
    assert text == TEMPLATE_TEXT_ONLY.format(prompt=QUESTION)
    assert proc(text=text)["input_ids"][0] == tok.encode(text).ids


@pytest.mark.parametrize("preset", PRESETS)
def test_processor_save_and_load(preset, tmp_path):
    proc = qp.tiny_processor(preset)
    proc.save_pretrained(tmp_path)
    back = qp.image_text_processor(qp.RANDOM_PRESETS[preset].model_type).from_pretrained(tmp_path)
    assert type(back) is type(proc) and type(back.image_processor) is Qwen2VLImageProcessorPil
    assert back.chat_template == proc.chat_template == qp.CHAT_TEMPLATE
    assert qp.preprocess_spec(back.image_processor) == qp.preprocess_spec(proc.image_processor)
    assert (back.tokenizer.eos_token, back.tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = proc.apply_chat_template(_messages(True), add_generation_prompt=True)
    assert back.apply_chat_template(_messages(True), add_generation_prompt=True) == text
    a, b = (p(text=text, images=IMAGES["rgba"], return_tensors="np") for p in (proc, back))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_processor_loads_a_hub_style_checkpoint(tmp_path):
    """The files of a Qwen2-VL checkpoint on the Hub (tokenizer_class Qwen2Tokenizer, chat_template.json,
    image_processor_type Qwen2VLImageProcessor), no video processor: the PIL image processor comes back."""
    qp.tiny_tokenizer().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "Qwen2Tokenizer"}))
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": qp.CHAT_TEMPLATE}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": qp.CLIP_MEAN, "image_std": qp.CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor"}))
    proc = qp.image_text_processor("qwen2_vl").from_pretrained(tmp_path)
    assert type(proc.image_processor) is Qwen2VLImageProcessorPil and proc.chat_template == qp.CHAT_TEMPLATE
    assert QwenPreprocessSpec.from_json(qp.preprocess_spec(proc.image_processor)) == QwenPreprocessSpec(
        max_pixels=12845056)
    text = proc.apply_chat_template(_messages(True), add_generation_prompt=True)
    enc = proc(text=text, images=IMAGES["rgba"], return_tensors="np")
    assert enc["input_ids"][0].tolist().count(PAD) == image_tokens(tuple(enc["image_grid_thw"][0, 1:]))


# --- M-RoPE positions ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    return {p: qp.build_random_model(p, seed=0) for p in PRESETS}


def _inputs(preset, image_name):
    proc = qp.tiny_processor(preset)
    if image_name is None:
        return proc(text=proc.apply_chat_template(_messages(False), add_generation_prompt=True),
                    return_tensors="pt")
    text = proc.apply_chat_template(_messages(True), add_generation_prompt=True)
    return proc(text=text, images=IMAGES[image_name], return_tensors="pt")


@pytest.mark.parametrize("image_name", ["1000x333", "333x1000", "37x51", None])
@pytest.mark.parametrize("preset", PRESETS)
def test_positions_equal_get_rope_index(preset, image_name, models):
    model = models[preset].model
    enc = _inputs(preset, image_name)
    ids = enc["input_ids"]
    grid_thw = enc.get("image_grid_thw")
    grid = None if grid_thw is None else tuple(int(x) for x in grid_thw[0, 1:])
    pos, delta = mrope_positions(ids.numpy(), PAD, grid, merge=2)
    want, want_delta = model.get_rope_index(ids, enc["mm_token_type_ids"], grid_thw)
    assert pos.dtype == np.int32 and np.array_equal(pos, want.numpy())  # int32: the decoder's position_ids
    assert delta == int(want_delta) and (delta == 0 if grid is None else delta < 0)


def test_positions_by_hand():
    """A 4x6-patch image (2x3 tokens) after 2 text tokens, 2 text tokens after it."""
    ids = [5, 6] + [PAD] * 6 + [7, 8]
    pos, delta = mrope_positions(ids, PAD, (4, 6))
    assert pos[:, 0].tolist() == [[0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
                                  [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
                                  [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]]
    assert delta == 7 - 10
    step = decode_positions(10, 2, delta)
    assert step.dtype == np.int32 and step.ravel().tolist() == [9, 9, 9]
    text, d0 = mrope_positions(np.array([[1, 2, 3]]), PAD, None)
    assert text.shape == (3, 1, 3) and text[:, 0].tolist() == [[0, 1, 2]] * 3 and d0 == 0


@pytest.mark.parametrize("ids, grid, message", [
    ([PAD, 1, PAD], (2, 2), "more than one run of image tokens"),
    ([1, PAD, PAD], (2, 2), "holds 2 image tokens, the image grid 2x2 .merge 2. needs 1"),
    ([1, PAD], None, "holds 1 image tokens but no image grid"),
])
def test_positions_refuse_inconsistent_prompts(ids, grid, message):
    with pytest.raises(InputError, match=message):
        mrope_positions(ids, PAD, grid)


# --- the models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_output_varies_and_positions_equal_generate(preset, models):
    """20 greedy tokens, not all equal (weights scaled). The M-RoPE ids generate feeds the text model
    (position_ids (4, 1, n) in transformers 5.24: row 0 the plain text positions, rows 1-3 M-RoPE) are
    mrope_positions in prefill and decode_positions at each decode step."""
    model = models[preset]
    enc = _inputs(preset, "640x480")
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].numpy()), with_kwargs=True)
    try:
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    finally:
        hook.remove()
    S = enc["input_ids"].shape[1]
    new = out[0, S:].tolist()
    assert len(new) == 20 and len(set(new)) >= 2, new
    pos, delta = mrope_positions(enc["input_ids"].numpy(), PAD, tuple(int(x) for x in enc["image_grid_thw"][0, 1:]))
    assert len(seen) == 20 and seen[0].shape == (4, 1, S) and np.array_equal(seen[0][1:], pos)
    for t, step in enumerate(seen[1:]):
        assert np.array_equal(step[1:], decode_positions(S, t, delta)), t


def test_3b_shape_is_the_real_config():
    model = qp.build_random_model("qwen2.5-vl-3b-shape", device="meta")
    cfg = model.config
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976  # Qwen2.5-VL-3B-Instruct
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, t.vocab_size) == (2048, 11008, 36, 16, 2, 151936)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24] and cfg.tie_word_embeddings
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size, v.window_size,
            list(v.fullatt_block_indexes)) == (32, 1280, 3420, 16, 2048, 112, [7, 15, 23, 31])


def test_runtime_module_is_torch_free():
    code = """
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
import numpy as np
from runtime.qwen_preprocess import QwenPreprocessSpec, mrope_positions, preprocess
x, grid = preprocess(np.zeros((60, 90, 3), np.uint8), QwenPreprocessSpec().to_json())
pos, delta = mrope_positions([1] + [9] * (grid[0] * grid[1] // 4) + [2], 9, grid)
bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m]]
assert not bad, bad
print(x.shape, grid, delta)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(24, 1176) (4, 6) -3"

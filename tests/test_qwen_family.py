"""Qwen2-VL and Qwen2.5-VL end to end: export.build on the tiny presets, the torch-free runtime
against transformers (processor, chat template, generate) and the eager DART baseline.

One engine directory per family (exported once per module, about 45 s each) serves every ratio
and keep_tokens value. The eager baseline is EagerDart on the same HF model, fed the HF
processor's pixels and ids and HF's own get_rope_index positions (not the runtime's ports)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine_runs import assert_checkpoint_round_trip, generate_without_torch  # noqa: E402
from vlm_inputs import hf_chat_inputs, smooth_image  # noqa: E402

import runtime  # noqa: E402
from dart_ops.spec import DartConfig  # noqa: E402
from export.families import qwen_presets  # noqa: E402
from runtime.errors import EngineError, InputError  # noqa: E402
from runtime.steps import Request  # noqa: E402

PRESETS = ("qwen2-vl-tiny", "qwen2.5-vl-tiny")
QUESTION = "What is in the picture?"
NEW_TOKENS = 20


# (name, image): 640x480 is shrunk to the engine's max pixels, 37x51 grown to min pixels, the
# others are only rounded to multiples of 28 (one of them tall).
IMAGES = {
    "max-pixels": smooth_image(640, 480, 1),
    "min-pixels": smooth_image(37, 51, 2),
    "plain": smooth_image(200, 120, 3),
    "tall": smooth_image(90, 300, 4),
}


QWEN_RATIO = "0.333"  # the engines' default ratio (tests pass their own per request)


@pytest.fixture(scope="module", params=PRESETS)
def qwen(request, export_once):
    """(preset, engine dir, pipeline, HF model, HF processor) for one tiny preset (the engine shared
    with other test files through conftest's export_once)."""
    preset = request.param
    out = export_once(preset, "--ratio", QWEN_RATIO)
    hf = qwen_presets.build_random_model(preset, seed=0)
    processor = qwen_presets.tiny_processor(preset)
    return preset, out, runtime.load(out), hf, processor


def _positions(hf, inputs):
    """HF's own M-RoPE ids (3, 1, S) and rope delta for the prompt."""
    pos, delta = hf.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs.get("mm_token_type_ids"),
        image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"])
    return pos, int(delta.reshape(-1)[0])


def test_manifest_describes_the_family(qwen):
    preset, out, pipe, hf, _ = qwen
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "qwen2_vl" and m["tokens"]["image_token"] == "<|image_pad|>"
    assert m["tokens"]["image_seq_len"] is None
    pre = m["preprocess"]
    assert pre["kind"] == "qwen2_vl" and pre["max_pixels"] == qwen_presets.TINY_MAX_PIXELS
    assert pre["vision"]["kind"] == hf.config.model_type
    axes = m["dynamic_axes"]
    assert (axes["vision_tokens"]["min"], axes["vision_tokens"]["max"]) == (4, 256)
    assert axes["patches"]["max"] == 4 * 256
    assert m["dart"]["max_span"] == 256 + 8
    assert m["stages"]["decoder"]["inputs"][1]["shape"] == [3, "batch", "seq"]
    names = [t["name"] for t in m["stages"]["vision_encoder"]["inputs"]]
    windows = ["window_index", "reverse_index", "win_gather", "win_valid", "win_unpad"]
    assert names == ["pixel_values", "vision_position_ids"] + (windows if "2.5" in preset else [])
    if "2.5" in preset:
        assert axes["windows"]["max"] >= 16  # 256 tokens in 112 px windows: at least 16 windows


@pytest.mark.parametrize("name", IMAGES)
def test_pixels_prompt_ids_and_positions_equal_the_processors(qwen, name):
    _, _, pipe, hf, processor = qwen
    image = IMAGES[name]
    inputs = hf_chat_inputs(processor, image, QUESTION)
    p = pipe.prepare(Request(prompt=QUESTION, image=image))
    assert p.ids == inputs["input_ids"][0].tolist()
    assert np.array_equal(p.vision.feeds["pixel_values"], inputs["pixel_values"].numpy())
    grid = inputs["image_grid_thw"][0].tolist()
    assert [1, *p.vision.grids[0]] == grid
    pos, delta = _positions(hf, inputs)
    assert np.array_equal(p.positions.prefill, pos.numpy())
    assert p.positions.decode_start == len(p.ids) + delta


def test_bounds_are_hit():
    """The images above really exercise the min and max pixel bounds of the tiny processor."""
    from runtime.qwen_preprocess import QwenPreprocessSpec, grid_of

    spec = QwenPreprocessSpec(max_pixels=qwen_presets.TINY_MAX_PIXELS)
    tokens = {n: np.prod(grid_of(im.height, im.width, spec)) // 4 for n, im in IMAGES.items()}
    # 37 x 51 is below min_pixels (3136): smart_resize grows it by sqrt(min / area) and rounds up to
    # 84 x 56 px = 6 x 4 patches = 6 tokens; 640 x 480 is above max_pixels: floor(sides / sqrt(ratio))
    assert 37 * 51 < spec.min_pixels and tokens["min-pixels"] == 6
    assert 640 * 480 > spec.max_pixels and 200 < tokens["max-pixels"] <= 256  # 18 x 26 patches: 234
    assert len(set(tokens.values())) == len(tokens)


@pytest.mark.parametrize("name", ["max-pixels", "min-pixels", "tall"])
def test_ratio_one_equals_hf_generate(qwen, name):
    _, _, pipe, hf, processor = qwen
    image = IMAGES[name]
    inputs = hf_chat_inputs(processor, image, QUESTION)
    eos = pipe.manifest.tokens.eos_token_ids
    with torch.no_grad():
        want = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=list(eos),
                           pad_token_id=eos[-1])[0, inputs["input_ids"].shape[1]:].tolist()
    got = pipe.generate(QUESTION, image=image, keep_ratio=1.0, max_new_tokens=NEW_TOKENS)
    assert got.token_ids == [t for t in want if t not in eos][:len(got.token_ids)]
    assert len(got.token_ids) == len(want) - (want[-1] in eos)
    assert len(set(got.token_ids)) > 1  # the tiny model's output varies
    assert got.kept_positions == list(range(len(inputs["input_ids"][0])))


@pytest.mark.parametrize("keep", [{"keep_ratio": 0.333}, {"keep_ratio": 0.111}, {"keep_tokens": 40}],
                         ids=["0.333", "0.111", "keep_tokens=40"])
def test_pruned_equals_eager_dart(qwen, keep):
    preset, _, pipe, hf, processor = qwen
    image = IMAGES["max-pixels"]
    inputs = hf_chat_inputs(processor, image, QUESTION)
    pos, delta = _positions(hf, inputs)
    m = pipe.manifest.dart
    config = DartConfig(m.layer, m.pivots_image, m.pivots_text, keep_ratio=keep.get("keep_ratio"),
                        budget=keep.get("keep_tokens"))
    eager = qwen_presets_family().eager(hf, config)
    want = eager.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=NEW_TOKENS,
                          position_ids=pos, rope_delta=delta,
                          image_kwargs={"image_grid_thw": inputs["image_grid_thw"]})
    got = pipe.generate(QUESTION, image=image, max_new_tokens=NEW_TOKENS, ignore_eos=True, **keep)
    L = int((inputs["input_ids"][0] == hf.config.image_token_id).sum())
    assert len(got.kept_positions) < len(inputs["input_ids"][0]) - L // 2  # it pruned
    assert got.kept_positions == want.kept_positions
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose(got.first_logits, want.first_logits[0].numpy(), atol=1e-4, rtol=0)


def qwen_presets_family():
    from export.families import families

    return families()["qwen2_vl"]


def test_kept_picture_and_pivots(qwen):
    """A pruned request's image pivots are 4 kept tokens of the span, and its picture has one panel
    of 28 x 28 px blocks whose token count is the image's (runtime/kept_image.py checks the pixels)."""
    _, _, pipe, _, _ = qwen
    image = IMAGES["plain"]
    out = pipe.generate(QUESTION, image=image, keep_ratio=0.111, max_new_tokens=2)
    p = pipe.prepare(Request(prompt=QUESTION, image=image))
    a, L = p.span
    assert len(out.image_pivots) == 4 and set(out.image_pivots) <= set(out.kept_positions)
    assert all(a <= i < a + L for i in out.image_pivots)
    (panel,) = pipe.rules.regions(p.vision)
    assert sorted(panel.tokens.tolist()) == list(range(L))
    pic = out.kept_image()
    assert pic.mode == "RGB" and pic.width >= image.width


def test_text_only_runs_unpruned(qwen):
    _, _, pipe, hf, processor = qwen
    inputs = hf_chat_inputs(processor, None, QUESTION)
    p = pipe.prepare(Request(prompt=QUESTION))
    assert p.ids == inputs["input_ids"][0].tolist() and p.vision is None and not p.counts.prune
    assert np.array_equal(p.positions.prefill, np.broadcast_to(np.arange(len(p.ids)), (3, 1, len(p.ids))))
    out = pipe.generate(QUESTION, keep_ratio=0.111, max_new_tokens=5)
    assert out.kept_positions == list(range(len(p.ids)))


def test_bad_inputs_get_one_line(qwen):
    _, _, pipe, _, _ = qwen
    with pytest.raises(InputError, match=r"prompt has \d+ tokens; this engine was exported for at most 2048") as e:
        pipe.generate("word " * 3000, image=IMAGES["plain"], max_new_tokens=2)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="a Qwen engine takes image="):
        pipe.generate(QUESTION, pixel_values=np.zeros((4, 1176), np.float32))
    with pytest.raises(InputError, match="keep_ratio or keep_tokens, not both"):
        pipe.generate(QUESTION, image=IMAGES["plain"], keep_ratio=0.5, keep_tokens=10)
    with pytest.raises(InputError, match="aspect ratio"):
        pipe.generate(QUESTION, image=Image.new("RGB", (4020, 20)), max_new_tokens=1)


def test_an_image_over_the_runtime_pixel_cap_is_one_line(qwen, tmp_path):
    """A file over MAX_IMAGE_PIXELS is refused from its header (never decoded), as for LLaVA."""
    from test_preprocess import _png_header

    _, _, pipe, _, _ = qwen
    path = _png_header(tmp_path / "huge.png", 9000, 8000)
    with pytest.raises(InputError, match="9000x8000 = 72000000 pixels, over the runtime's limit") as e:
        pipe.generate(QUESTION, image=path, max_new_tokens=1)
    assert "\n" not in str(e.value)


def test_a_huge_image_is_resized_within_the_cap(qwen):
    """Any valid size runs: a 3000x2000 image is resized within max_pixels like the processor does."""
    _, _, pipe, _, processor = qwen
    image = Image.new("RGB", (3000, 2000), (200, 30, 40))
    p = pipe.prepare(Request(prompt=QUESTION, image=image))
    assert p.vision.tokens[0] <= 256
    want = hf_chat_inputs(processor, image, QUESTION)["pixel_values"].numpy()
    assert np.array_equal(p.vision.feeds["pixel_values"], want)


def test_checkpoint_round_trip(qwen, tmp_path):
    """The engine's checkpoint/ loads as a local checkpoint directory with the same family and sizes."""
    _, out, _, hf, _ = qwen
    assert_checkpoint_round_trip(out, hf, "qwen2_vl")



def test_runtime_without_torch(qwen, tmp_path):
    _, out, pipe, _, _ = qwen
    path = tmp_path / "img.png"
    IMAGES["tall"].save(path)
    got = generate_without_torch(out, path, max_new_tokens=8, keep_ratio=0.111)
    want = pipe.generate(prompt="What is this?", image=path, max_new_tokens=8, keep_ratio=0.111)
    assert got == {"token_ids": want.token_ids, "kept": want.kept_positions}


def test_max_pixels_flag(tmp_path):
    """--max-pixels caps the engine's images (dry run of the cap; a full export is above)."""
    from export.build import BuildError, build, parse_args
    from export.families.qwen2_vl import cap_max_pixels

    spec = {"patch": 14, "merge": 2, "min_pixels": 3136, "max_pixels": 12845056}
    assert cap_max_pixels(spec, 2048, 8, None)["max_pixels"] == (2048 - 64) * 784  # --max-seq bound
    assert cap_max_pixels(spec, 8192, 8, None)["max_pixels"] == (3840 - 8) * 784  # DartPrune's TopK bound
    assert cap_max_pixels(spec, 2048, 8, 100352)["max_pixels"] == 100352
    with pytest.raises(ValueError, match="fewer than 64 vision tokens"):
        cap_max_pixels(spec, 2048, 8, 10000)
    with pytest.raises((ValueError, BuildError), match="--max-pixels applies to dynamic-resolution"):
        build(parse_args(["--model", "llava-tiny", "--max-pixels", "100000", "--out", str(tmp_path / "x")]))
    assert not (tmp_path / "x").exists()


def test_engine_refuses_a_wrong_preprocess(qwen, tmp_path):
    import shutil

    _, out, _, _, _ = qwen
    d = tmp_path / "e"
    shutil.copytree(out, d)
    m = json.loads((d / "manifest.json").read_text())
    m["preprocess"]["vision"]["temporal"] = 3
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="'preprocess.vision.temporal' 3 differs from 'preprocess.temporal' 2"):
        runtime.load(d)


def test_fp16_export_validates_and_passes_the_tensorrt_check(tmp_path):
    """--dtype fp16: the export's own validation (fp32 reference, export/validate.py) passes on other
    grids than traced, and TensorRT 10.3's static check finds nothing in any graph (no shape-tensor
    input, no int64 I/O, no warning)."""
    import onnx

    from export.build import build, parse_args
    from export.check_trt import check_model

    out = tmp_path / "q25-fp16"
    build(parse_args(["--model", "qwen2.5-vl-tiny", "--dtype", "fp16", "--out", str(out)]))
    for name in ("vision_encoder", "embed_tokens", "decoder"):
        findings = check_model(onnx.load(str(out / f"{name}.onnx")), name)
        assert findings == [], [f.line() for f in findings]  # no shape-input, no int64-io, nothing else
    vision = onnx.load(str(out / "vision_encoder.onnx"), load_external_data=False)
    assert vision.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    out16 = runtime.load(out).generate(QUESTION, image=IMAGES["tall"], keep_ratio=0.111, max_new_tokens=4,
                                               ignore_eos=True)
    assert len(out16.token_ids) == 4 and np.isfinite(out16.first_logits).all()

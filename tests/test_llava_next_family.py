"""LLaVA-NeXT end to end: export.build on the tiny presets (Mistral and Vicuna decoders), the
torch-free runtime against transformers (LlavaNext processor, chat template, generate) and the eager
DART baseline.

One engine directory per preset (exported once per module) serves every ratio and keep_tokens
value. The eager baseline is EagerDart on the same HF model, fed the HF processor's pixels, ids and
image_sizes (not the runtime's ports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine_runs import assert_checkpoint_round_trip, generate_without_torch  # noqa: E402
from vlm_inputs import hf_chat_inputs, smooth_image  # noqa: E402

import runtime  # noqa: E402
from dart_ops.spec import DartConfig  # noqa: E402
from export.families import llava_next_presets as presets  # noqa: E402
from runtime.errors import InputError  # noqa: E402
from runtime.steps import Request  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("llava-next-tiny", "llava-next-vicuna-tiny")
QUESTION = "What is in the picture?"
NEW_TOKENS = 20


# Tile layouts at the default pinpoints: (crops, vision tokens)
IMAGES = {
    "landscape": (smooth_image(640, 480, 1), (5, 2340)),  # 672 x 672 canvas, rows unpadded to 36
    "portrait": (smooth_image(333, 1000, 2), (4, 2376)),  # 336 x 1008 (h x w: 1008 x 336) canvas
    "square": (smooth_image(700, 700, 3), (5, 2928)),  # the maximum
    "wide": (smooth_image(1000, 333, 4), (4, 2328)),
    "tiny": (smooth_image(37, 51, 5), (3, 1032)),  # the least-area pinpoint (672 x 336 px, h x w)
    "huge": (smooth_image(3000, 2000, 6), (5, None)),
}


@pytest.fixture(scope="module", params=PRESETS)
def nxt(request, export_once):
    """(preset, engine dir, pipeline, HF model, HF processor) for one tiny preset (the engine shared
    with other test files through conftest's export_once)."""
    preset = request.param
    out = export_once(preset, "--ratio", "0.111")
    hf = presets.build_random_model(preset, seed=0)
    processor = presets.tiny_processor(preset)
    return preset, out, runtime.load(out), hf, processor


def _hf_pixels(inputs, crops: int) -> np.ndarray:
    """The processor's pixel_values of one image without its batch padding (it pads to 5 crops)."""
    return inputs["pixel_values"][0, :crops].numpy()


def test_manifest_describes_the_family(nxt):
    preset, out, pipe, hf, _ = nxt
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "llava_next" and m["tokens"]["image_token"] == "<image>"
    assert m["tokens"]["image_seq_len"] is None
    pre = m["preprocess"]
    assert pre["kind"] == "llava_next"
    assert [list(p) for p in pre["pinpoints"]] == presets.PINPOINTS
    axes = m["dynamic_axes"]
    assert axes["vision_tokens"]["max"] == 2928 and axes["crops"]["max"] == 5 and axes["crops"]["min"] == 3
    assert m["dart"]["max_span"] == 2928 + 8
    assert m["dynamic_axes"]["seq"]["max"] == 3584  # the family's default --max-seq
    names = [t["name"] for t in m["stages"]["vision_encoder"]["inputs"]]
    assert names == ["pixel_values", "pack_index"]
    assert m["stages"]["decoder"]["outputs"][-1]["name"] == "image_pivots"
    assert hf.config.text_config.model_type == ("mistral" if preset == "llava-next-tiny" else "llama")


@pytest.mark.parametrize("name", IMAGES)
def test_pixels_and_prompt_ids_equal_the_processors(nxt, name):
    _, _, pipe, _, processor = nxt
    image, (crops, tokens) = IMAGES[name]
    inputs = hf_chat_inputs(processor, image, QUESTION)
    p = pipe.prepare(Request(prompt=QUESTION, image=image))
    assert p.ids == inputs["input_ids"][0].tolist()
    pixels = p.vision.feeds["pixel_values"]
    assert pixels.shape[0] == crops
    assert np.array_equal(pixels, _hf_pixels(inputs, crops))
    assert p.span[1] == p.vision.tokens[0] == (tokens or p.span[1])
    assert inputs["image_sizes"][0].tolist() == [image.height, image.width]


@pytest.mark.parametrize("name", ["landscape", "portrait", "square", "tiny", "huge"])
def test_ratio_one_equals_hf_generate(nxt, name):
    _, _, pipe, hf, processor = nxt
    image = IMAGES[name][0]
    inputs = hf_chat_inputs(processor, image, QUESTION)
    eos = pipe.manifest.tokens.eos_token_ids
    with torch.no_grad():
        want = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=list(eos),
                           pad_token_id=pipe.manifest.tokens.pad_token_id)[0, inputs["input_ids"].shape[1]:].tolist()
    got = pipe.generate(QUESTION, image=image, keep_ratio=1.0, max_new_tokens=NEW_TOKENS)
    assert got.token_ids == [t for t in want if t not in eos][:len(got.token_ids)]
    assert len(got.token_ids) == len(want) - (want[-1] in eos)
    assert len(set(got.token_ids)) > 1  # the tiny model's output varies
    assert got.kept_positions == list(range(len(inputs["input_ids"][0])))
    assert got.image_pivots == []  # nothing pruned: no pivots chosen


@pytest.mark.parametrize("keep", [{"keep_ratio": 0.111}, {"keep_ratio": 0.333}, {"keep_tokens": 320}],
                         ids=["0.111", "0.333", "keep_tokens=320"])
@pytest.mark.parametrize("name", ["square", "wide"])
def test_pruned_equals_eager_dart(nxt, keep, name):
    _, _, pipe, hf, processor = nxt
    image = IMAGES[name][0]
    inputs = hf_chat_inputs(processor, image, QUESTION)
    m = pipe.manifest.dart
    config = DartConfig(m.layer, m.pivots_image, m.pivots_text, keep_ratio=keep.get("keep_ratio"),
                        budget=keep.get("keep_tokens"))
    eager = _family().eager(hf, config)
    want = eager.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=NEW_TOKENS,
                          image_kwargs={"image_sizes": inputs["image_sizes"]})
    got = pipe.generate(QUESTION, image=image, max_new_tokens=NEW_TOKENS, ignore_eos=True, **keep)
    L = int((inputs["input_ids"][0] == hf.config.image_token_id).sum())
    kept_vision = got.timings["kept_vision_tokens"]
    if keep.get("keep_tokens") == 320 and name == "square":  # the authors' default: T = 320 // 8 = 40
        assert (L, kept_vision) == (2928, 4 + 8 * 40)
    assert kept_vision < L // 2  # it pruned
    assert got.kept_positions == want.kept_positions
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose(got.first_logits, want.first_logits[0].numpy(), atol=1e-4, rtol=0)
    a = pipe.prepare(Request(prompt=QUESTION, image=image)).span[0]
    assert len(got.image_pivots) == 4 and set(got.image_pivots) <= set(got.kept_positions)
    assert all(a <= i < a + L for i in got.image_pivots)


def _family():
    from export.families import families

    return families()["llava_next"]


def test_text_only_runs_unpruned(nxt):
    _, _, pipe, _, processor = nxt
    inputs = hf_chat_inputs(processor, None, QUESTION)
    p = pipe.prepare(Request(prompt=QUESTION))
    assert p.ids == inputs["input_ids"][0].tolist() and p.vision is None and not p.counts.prune
    out = pipe.generate(QUESTION, keep_ratio=0.111, max_new_tokens=5)
    assert out.kept_positions == list(range(len(p.ids)))


def test_bad_inputs_get_one_line(nxt):
    _, _, pipe, _, _ = nxt
    with pytest.raises(InputError, match=r"prompt has \d+ tokens; this engine was exported for at most 3584") as e:
        pipe.generate("word " * 1000, image=IMAGES["square"][0], max_new_tokens=2)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="a LLaVA-NeXT engine takes image="):
        pipe.generate(QUESTION, pixel_values=np.zeros((5, 3, 336, 336), np.float32))
    with pytest.raises(InputError, match="keep_ratio or keep_tokens, not both"):
        pipe.generate(QUESTION, image=IMAGES["tiny"][0], keep_ratio=0.5, keep_tokens=10)


def test_kept_picture(nxt, tmp_path):
    """The picture of a pruned request: two panels (base grid, tile grid), written by --show-kept."""
    _, out, pipe, _, _ = nxt
    image = IMAGES["wide"][0]
    res = pipe.generate(QUESTION, image=image, keep_ratio=0.111, max_new_tokens=2)
    pic = res.kept_image()
    assert pic.mode == "RGB" and pic.width > 2 * 300  # two panels side by side
    path = tmp_path / "img.png"
    image.save(path)
    r = subprocess.run([sys.executable, "-m", "runtime.run", "--engine-dir", str(out), "--image", str(path),
                        "--prompt", QUESTION, "--max-new-tokens", "2", "--show-kept", str(tmp_path / "k.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "k.png")), np.asarray(pic))


def test_checkpoint_round_trip(nxt):
    """The engine's checkpoint/ loads as a local checkpoint directory with the same family and sizes."""
    _, out, _, hf, _ = nxt
    loaded = assert_checkpoint_round_trip(out, hf, "llava_next")
    assert loaded.preprocess == {k: v for k, v in json.loads((out / "manifest.json").read_text())["preprocess"]
                                 .items()}



def test_runtime_without_torch(nxt, tmp_path):
    _, out, pipe, _, _ = nxt
    path = tmp_path / "img.png"
    IMAGES["portrait"][0].save(path)
    got = generate_without_torch(out, path, max_new_tokens=8, keep_ratio=0.111)
    want = pipe.generate(prompt="What is this?", image=path, max_new_tokens=8, keep_ratio=0.111)
    assert got == {"token_ids": want.token_ids, "kept": want.kept_positions}


def test_fp16_export_validates_and_passes_the_tensorrt_check(tmp_path):
    """--dtype fp16: the export's own validation (fp32 reference) passes on other crop and token counts
    than traced, and TensorRT 10.3's static check finds no errors in any graph."""
    import onnx

    from export.build import build, parse_args
    from export.check_trt import check_model

    out = tmp_path / "next-fp16"
    build(parse_args(["--model", "llava-next-tiny", "--dtype", "fp16", "--out", str(out)]))
    for name in ("vision_encoder", "embed_tokens", "decoder"):
        findings = check_model(onnx.load(str(out / f"{name}.onnx")), name)
        assert findings == [], [f.line() for f in findings]  # no shape-input, no int64-io, nothing else
    out16 = runtime.load(out).generate(QUESTION, image=IMAGES["wide"][0], keep_ratio=0.111, max_new_tokens=4,
                                       ignore_eos=True)
    assert len(out16.token_ids) == 4 and np.isfinite(out16.first_logits).all()


def test_max_seq_defaults_to_the_familys(tmp_path, capsys):
    """--max-seq left out: 2048 for LLaVA-1.5, 3584 for LLaVA-NeXT (2928 vision tokens + text); a
    --max-context below the family's default is one line, before any work."""
    from export.build import BuildError, main, parse_args, with_family_defaults
    from export.families import resolve

    for model, want in (("llava-tiny", 2048), ("llava-next-tiny", 3584)):
        cfg = parse_args(["--model", model, "--out", str(tmp_path / model)])
        assert cfg.max_seq is None and with_family_defaults(cfg, resolve(model)).max_seq == want
    assert with_family_defaults(parse_args(["--model", "llava-next-tiny", "--max-seq", "3000"]),
                                resolve("llava-next-tiny")).max_seq == 3000
    with pytest.raises(BuildError, match="default --max-seq 3584 exceeds --max-context 2048"):
        with_family_defaults(parse_args(["--model", "llava-next-tiny", "--max-context", "2048"]),
                             resolve("llava-next-tiny"))
    assert main(["--model", "llava-next-tiny", "--max-seq", "2048", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--max-seq 2048 is too short for this model" in err and "--max-seq >= " in err
    assert not (tmp_path / "x").exists()


def test_tensorrt_profiles_from_the_manifest(nxt):
    """The vision engine's TensorRT profile spans every crop count and token count the pinpoints
    admit (export/trt.py reads only the manifest); the decoder's pruned length (kept_slots) reaches
    max_seq and the span / quota scalars are 0-d data with no value range (no shape-tensor input)."""
    from export import trt

    _, out, _, _, _ = nxt
    m = json.loads((out / "manifest.json").read_text())
    (vis,) = trt.profile_specs(m, "vision_encoder")
    px, idx = vis["inputs"]["pixel_values"], vis["inputs"]["pack_index"]
    assert (px["min"], px["max"]) == ([3, 3, 336, 336], [5, 3, 336, 336])
    assert (idx["min"], idx["max"]) == ([576], [2928]) and set(idx) == {"min", "opt", "max"}
    prefill, _ = trt.profile_specs(m, "decoder")
    assert prefill["inputs"]["span_len"] == {"min": [], "opt": [], "max": []}
    assert prefill["inputs"]["kept_slots"]["max"][1] == prefill["inputs"]["inputs_embeds"]["max"][1] == 3584

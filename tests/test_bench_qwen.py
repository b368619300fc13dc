"""scripts/bench.py on a Qwen2.5-VL engine (qwen2.5-vl-tiny, exported by the benchmark itself): every
row kind gets the same prompt ids and image, the engine and the eager rows see the same vision-token
count as the HF processor, greedy tokens agree across runtimes, the FLOP limit uses the image's grid;
and (no export) bench.families' Qwen inputs equal the HF processor's and HF's own positions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bench_rows import assert_rows_see_the_same_tokens, rows_by

from bench.config import DEFAULT_IMAGE, DEFAULT_PROMPT, BenchConfig
from bench.families import NATIVE, QWEN2_VL, QWEN_IMAGE_SIZE, Inputs, for_family, load_image
from bench.probes import BenchError
from dart_ops import flops
from dart_ops.spec import DartConfig

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
PRESET = "qwen2.5-vl-tiny"
LOW = 0.111
ROWS = [("eager-hf", 1.0), ("eager-dart", 1.0), ("eager-dart", LOW), ("ort", 1.0), ("ort", LOW)]
# The bench's default image for qwen2_vl (sample.png at 1092 x 728 px, 1014 tokens uncapped) under the
# tiny processor's cap of 256 tokens: smart_resize scales by sqrt(1092 * 728 / (256 * 784)) and floors
# each side to 28 px: 532 x 364 px = 26 x 38 patches (rows x columns) = 13 x 19 = 247 tokens.
GRID, L = (26, 38), 247


def _bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/bench.py", *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _processor_inputs(image):
    """The HF processor's ids, pixels, grid and mm_token_type_ids for the bench's prompt and `image`."""
    from export.families import qwen_presets

    processor = qwen_presets.tiny_processor(PRESET)
    content = [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The CLI run once: the engine exported into a fresh directory, two ratios, 4 new tokens."""
    tmp = tmp_path_factory.mktemp("bench-qwen")
    engine, out = tmp / "engine", tmp / "b.json"
    proc = _bench("--model", PRESET, "--engine-dir", str(engine), "--repeats", "1", "--warmup", "0",
                  "--new-tokens", "4", "--threads", "2", "--ratios", f"1.0,{LOW}", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), engine


def test_rows_and_the_image_the_processor_sees(run):
    proc, doc, _ = run
    meta = doc["meta"]
    assert [(r["runtime"], r["keep_ratio"]) for r in doc["rows"]] == ROWS
    hf = _processor_inputs(load_image(DEFAULT_IMAGE, None, QWEN2_VL))
    assert hf["image_grid_thw"][0].tolist() == [1, *GRID]
    assert (meta["grid"], meta["image_size"], meta["vision_tokens"]) == (list(GRID), list(QWEN_IMAGE_SIZE), L)
    assert meta["prompt_tokens"] == hf["input_ids"].shape[1]
    assert int((hf["input_ids"][0] == 1022).sum()) == L  # <|image_pad|>
    assert f"({L} vision; image 1092x728 px = 26x38 patches)" in proc.stdout
    assert "ort vs eager-dart, same keep ratio" in proc.stdout
    assert (f"bench: the 1092x728 image gives {L} vision tokens, not 1014: the engine's max_pixels 200704 caps an "
            "image at 256 tokens") in proc.stderr


def test_every_row_sees_the_same_tokens(run):
    assert_rows_see_the_same_tokens(run[1], L, LOW)


def test_kept_counts_and_flop_limit(run):
    _, doc, engine = run
    rows, meta = rows_by(doc), doc["meta"]
    S, a = meta["prompt_tokens"], meta["span_start"]
    # budget round(0.111 * 247) = 27, T = 27 // 8 = 3: 4 image pivots + 8 * 3 = 28 vision tokens kept
    assert DartConfig(keep_ratio=LOW).counts(L, S - a - L).kept_vision == 28
    for rt in ("eager-dart", "ort"):
        assert (rows[(rt, LOW)]["kept_vision_tokens"], rows[(rt, LOW)]["kept_tokens"]) == (28, S - L + 28)
        assert (rows[(rt, 1.0)]["kept_tokens"], rows[(rt, 1.0)]["flop_limit_speedup"]) == (S, 1.0)
    config = json.loads((engine / "checkpoint" / "config.json").read_text())
    shape = flops.ModelShape.from_qwen_config(config).with_grid(*GRID)
    want = flops.speedup_limit(shape, S, a, L, DartConfig(keep_ratio=LOW))
    assert rows[("ort", LOW)]["flop_limit_speedup"] == pytest.approx(want, rel=1e-12)
    assert meta["shape"]["vision"]["grid"] == list(GRID)
    assert meta["flops_full"] == flops.prefill_flops(shape, S, None, 2)["total"]
    pair = {p["keep_ratio"]: p for p in doc["ort_vs_eager_dart"]}[LOW]
    assert pair["ratio"] == pytest.approx(rows[("eager-dart", LOW)]["prefill_ms"] / rows[("ort", LOW)]["prefill_ms"])


# --- bench.families without an export ---------------------------------------------------------------


@pytest.fixture(scope="module")
def eager():
    """(HF model, bench Source) of the preset, without an engine."""
    from bench.source import load_eager, make_source

    model, loaded = load_eager(PRESET, None, "cpu", "fp32")
    return model, make_source(BenchConfig(model=PRESET), None, model, loaded)


@pytest.mark.parametrize("size", [None, (200, 120)], ids=["default", "small"])
def test_qwen_inputs_equal_the_processors(eager, size):
    from bench.source import make_inputs
    from runtime.qwen_preprocess import mrope_positions

    model, src = eager
    inputs = make_inputs(src, BenchConfig(model=PRESET, image_size=size))
    hf = _processor_inputs(inputs.image)
    assert inputs.image.size == (size or QWEN_IMAGE_SIZE)
    assert inputs.ids == hf["input_ids"][0].tolist()
    assert np.array_equal(inputs.pixels, hf["pixel_values"].numpy())
    assert [1, *inputs.grid] == hf["image_grid_thw"][0].tolist()
    ids = torch.tensor([inputs.ids])
    kw = QWEN2_VL.hf_kwargs(model, inputs, ids)
    assert torch.equal(kw["mm_token_type_ids"], hf["mm_token_type_ids"])
    assert torch.equal(kw["image_grid_thw"], hf["image_grid_thw"])
    dart = QWEN2_VL.dart_kwargs(model, inputs, ids)  # HF's get_rope_index == the runtime's port
    pos, delta = mrope_positions(inputs.ids, src.tokens.image_token_id, inputs.grid)
    assert np.array_equal(dart["position_ids"].numpy(), pos) and dart["rope_delta"] == delta < 0


def test_native_size_keeps_the_image():
    image = load_image(DEFAULT_IMAGE, NATIVE, QWEN2_VL)
    assert image.size == (480, 320) and load_image(DEFAULT_IMAGE, None, for_family("llava")).size == (480, 320)


def test_engine_inputs_must_match():
    from types import SimpleNamespace

    from bench.runners import check_same_inputs

    pixels = np.zeros((16, 1176), np.float32)
    inputs = Inputs([1, 5, 5, 5, 5, 2], (1, 4), pixels, None, (4, 4))
    manifest = SimpleNamespace(stages={"vision_encoder": SimpleNamespace(inputs=[SimpleNamespace(name="pv")])})
    prompt = lambda ids, span, px: SimpleNamespace(ids=ids, span=span, vision=SimpleNamespace(feeds={"pv": px}))
    check_same_inputs(prompt([1, 5, 5, 5, 5, 2], (1, 4), pixels.copy()), inputs, manifest)  # equal: no error
    with pytest.raises(BenchError, match=r"\(prompt ids, image span \(1, 3\) vs \(1, 4\)\)"):
        check_same_inputs(prompt([1, 5, 5, 5, 2, 2], (1, 3), pixels), inputs, manifest)
    with pytest.raises(BenchError, match=r"\(pixel values\)"):
        check_same_inputs(prompt(inputs.ids, (1, 4), pixels + 1), inputs, manifest)


def test_unknown_family():
    with pytest.raises(BenchError, match="no inputs for model family 'toy'"):
        for_family("toy")


@pytest.mark.parametrize("value", ["728", "0x10", "axb"])
def test_bad_image_size(value, tmp_path):
    proc = _bench("--engine-dir", str(tmp_path / "absent"), "--image-size", value, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    want = "positive" if value == "0x10" else "WxH in pixels or 'native'"
    line = f"error: argument --image-size: image size must be {want}, got {value!r} (see: python scripts/bench.py --help)"
    assert proc.stderr.strip().splitlines() == [line]

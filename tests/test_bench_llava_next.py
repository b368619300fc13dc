"""scripts/bench.py on a LLaVA-NeXT engine (llava-next-tiny, exported by the benchmark itself) at the bench's
default image, 672 x 672 px = 5 crops = 2928 vision tokens (LLaVA-NeXT's maximum): every row kind gets the
same prompt ids and crops, greedy tokens agree across runtimes, the FLOP limit counts the tower on every crop;
and (no export) bench.families' LLaVA-NeXT inputs equal the HF processor's, HF generate and the eager DART
baseline take them as the runners pass them (crops as a 4-D pixel_values, image_sizes), and the FLOP shape
is bound to the image's crops and tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from bench_rows import assert_rows_see_the_same_tokens, rows_by

from bench.config import DEFAULT_IMAGE, DEFAULT_PROMPT, BenchConfig
from bench.families import LLAVA_NEXT, NATIVE, NEXT_IMAGE_SIZE, Inputs, for_family, load_image
from bench.probes import BenchError
from dart_ops import flops
from dart_ops.spec import DartConfig

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
PRESET = "llava-next-tiny"
LOW = 0.111
ROWS = [("eager-hf", 1.0), ("eager-dart", 1.0), ("eager-dart", LOW), ("ort", 1.0), ("ort", LOW)]
IMAGE_TOKEN_ID = 1023  # the tiny tokenizer's <image>
# image size (W, H) -> (crops, L): the bench's default (2 x 2 tiles, nothing unpadded: 576 + 48 * 49),
# sample.png as it is (480 x 320: pinpoint 336 x 672, 1 x 2 tiles, 24 x 37 after unpadding: 576 + 24 * 37),
# a wide image (1000 x 333: pinpoint 336 x 1008, 1 x 3 tiles: 576 + 24 * 73)
SIZES = {None: (5, 2928), NATIVE: (3, 1464), (1000, 333): (4, 2328)}
CROPS, L = SIZES[None]


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/bench.py", *args], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def processor():
    from export.families.llava_next_presets import tiny_processor

    return tiny_processor(PRESET)


def _processor_inputs(processor, image):
    """The HF processor's input_ids, pixel_values (1, crops, 3, 336, 336) and image_sizes for the bench's
    prompt and `image`."""
    content = [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return processor(text=[text], images=[image], return_tensors="pt")


def _source(processor):
    """What bench.source.make_source gives the inputs for llava-next-tiny without an engine: the runtime's
    PromptBuilder over the processor's tokenizer and chat template, the manifest's preprocess object."""
    from tokenizers import Tokenizer

    from export.families.llava import prompt_spec
    from runtime.families.llava_next import NextSpec
    from runtime.llava_next_preprocess import NextPreprocessSpec
    from runtime.manifest import PromptSpec, TokenSpec
    from runtime.prompt import PromptBuilder

    tokens = TokenSpec("<image>", IMAGE_TOKEN_ID, None, (2,), 1, 0)  # image_seq_len None: varies per image
    builder = PromptBuilder(Tokenizer.from_str(processor.tokenizer.backend_tokenizer.to_str()),
                            PromptSpec(**prompt_spec(processor)), tokens)
    return builder, NextSpec(NextPreprocessSpec())  # the defaults: llava-v1.6's 336 px crops and pinpoints


def _inputs(processor, size) -> Inputs:
    builder, spec = _source(processor)
    return LLAVA_NEXT.inputs(builder, spec, load_image(DEFAULT_IMAGE, size, LLAVA_NEXT), DEFAULT_PROMPT)


def _config() -> dict:
    from export.families.llava_next_presets import random_config

    return random_config(PRESET).to_dict()


# --- bench.families without an export ---------------------------------------------------------------


@pytest.mark.parametrize("size", list(SIZES), ids=["default", "native", "wide"])
def test_next_inputs_equal_the_processors(processor, size):
    inputs = _inputs(processor, size)
    crops, tokens = SIZES[size]
    hf = _processor_inputs(processor, inputs.image)
    assert inputs.image.size == {None: NEXT_IMAGE_SIZE, NATIVE: (480, 320)}.get(size, size)
    assert inputs.ids == hf["input_ids"][0].tolist()
    a = inputs.ids.index(IMAGE_TOKEN_ID)
    assert inputs.span == (a, tokens) and int((hf["input_ids"][0] == IMAGE_TOKEN_ID).sum()) == tokens
    assert inputs.pixels.shape == (crops, 3, 336, 336) == hf["pixel_values"].shape[1:]
    assert np.array_equal(inputs.pixels, hf["pixel_values"][0].numpy())
    assert (inputs.layout.crops, inputs.layout.tokens) == (crops, tokens)
    ids = torch.tensor([inputs.ids])
    kw = LLAVA_NEXT.hf_kwargs(None, inputs, ids)
    assert torch.equal(kw["image_sizes"], hf["image_sizes"])  # [[H, W]]
    assert kw["image_sizes"].tolist() == [[inputs.image.height, inputs.image.width]]
    dart = LLAVA_NEXT.dart_kwargs(None, inputs, ids)
    assert list(dart) == ["image_kwargs"] and torch.equal(dart["image_kwargs"]["image_sizes"], hf["image_sizes"])
    assert LLAVA_NEXT.engine_request(inputs) == {"input_ids": inputs.ids, "image": inputs.image}


def test_flop_shape_is_bound_to_the_image(processor):
    """The FLOP shape the bench uses: the preset's tower on the image's 5 crops, the 2928 packed tokens;
    the vision tower counts 5 times one crop whatever is pruned."""
    inputs = _inputs(processor, None)
    shape = LLAVA_NEXT.flop_shape(flops.ModelShape.from_llava_next_config(_config()), inputs)
    assert (shape.vision.crops, shape.vision.tokens) == (CROPS, L)
    S, (a, _) = len(inputs.ids), inputs.span
    dart = DartConfig(keep_ratio=LOW)
    c = dart.counts(L, S - a - L)
    assert (c.quota, c.kept_vision) == (40, 324)  # budget round(0.111 * 2928) = 325, T = 325 // 8 = 40
    full = flops.prefill_flops(shape, S, None, 2)
    pruned = flops.prefill_flops(shape, S, c.kept_len(S), 2, L, 8)
    assert full["vision"] == pruned["vision"] == 5 * sum(flops.vision_flops(shape.vision.tower).values())
    assert flops.speedup_limit(shape, S, a, L, dart) == pytest.approx(full["total"] / pruned["total"], rel=1e-12)


@pytest.fixture(scope="module")
def tiny_model():
    from export.families.llava_next_presets import build_random_model

    return build_random_model(PRESET)


def test_hf_generate_takes_the_runners_pixel_values(processor, tiny_model):
    """The eager-hf row's call (bench.runners.EagerHF: the crops as pixel_values (crops, 3, 336, 336) plus
    hf_kwargs' image_sizes) generates what HF generate fed by the processor does; the eager DART baseline
    at keep ratio 1.0 with dart_kwargs too."""
    from bench.runners import Context, EagerHF
    from dart_ops.eager import EagerDart

    inputs = _inputs(processor, None)
    hf = _processor_inputs(processor, inputs.image)
    n = 4
    with torch.inference_mode():
        want = tiny_model.generate(**hf, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, hf["input_ids"].shape[1]:].tolist()
        ctx = Context(BenchConfig(model=PRESET), None, DartConfig(), tiny_model, bench_family=LLAVA_NEXT)
        run = EagerHF(ctx).run(inputs, 1.0, n)
        ids, pixels = torch.tensor([inputs.ids]), torch.from_numpy(inputs.pixels)
        dart = EagerDart(tiny_model, DartConfig()).generate(ids, pixels, keep_ratio=1.0, max_new_tokens=n,
                                                            **LLAVA_NEXT.dart_kwargs(tiny_model, inputs, ids))
    assert run.token_ids == want == dart.token_ids
    assert (run.kept_tokens, len(dart.kept_positions)) == (len(inputs.ids),) * 2


def test_family_table_and_image_size():
    assert for_family("llava_next") is LLAVA_NEXT
    assert load_image(DEFAULT_IMAGE, None, LLAVA_NEXT).size == NEXT_IMAGE_SIZE == (672, 672)
    assert load_image(DEFAULT_IMAGE, NATIVE, LLAVA_NEXT).size == (480, 320)


def test_engine_crops_must_match():
    """check_same_inputs on crops: the engine's pixel_values of another crop count is refused."""
    from bench.runners import check_same_inputs

    pixels = np.zeros((5, 3, 4, 4), np.float32)
    inputs = Inputs([1, 9, 9, 9, 2], (1, 3), pixels, None)
    manifest = SimpleNamespace(stages={"vision_encoder": SimpleNamespace(inputs=[SimpleNamespace(name="pv")])})
    prompt = lambda px: SimpleNamespace(ids=inputs.ids, span=(1, 3), vision=SimpleNamespace(feeds={"pv": px}))
    check_same_inputs(prompt(pixels.copy()), inputs, manifest)  # equal: no error
    with pytest.raises(BenchError, match=r"\(pixel values\)"):
        check_same_inputs(prompt(pixels[:3]), inputs, manifest)


# --- the CLI on an exported engine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The CLI run once: the engine exported into a fresh directory, two ratios, 4 new tokens."""
    tmp = tmp_path_factory.mktemp("bench-next")
    engine, out = tmp / "engine", tmp / "b.json"
    proc = _bench("--model", PRESET, "--engine-dir", str(engine), "--repeats", "1", "--warmup", "0",
                  "--new-tokens", "4", "--threads", "2", "--ratios", f"1.0,{LOW}", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), engine


def test_rows_and_the_image_the_processor_sees(run, processor):
    proc, doc, _ = run
    meta = doc["meta"]
    assert [(r["runtime"], r["keep_ratio"]) for r in doc["rows"]] == ROWS
    hf = _processor_inputs(processor, load_image(DEFAULT_IMAGE, None, LLAVA_NEXT))
    assert hf["pixel_values"].shape[1] == CROPS
    assert (meta["image_size"], meta["vision_tokens"], meta["grid"]) == (list(NEXT_IMAGE_SIZE), L, None)
    assert meta["prompt_tokens"] == hf["input_ids"].shape[1]
    assert int((hf["input_ids"][0] == IMAGE_TOKEN_ID).sum()) == L
    assert f"prompt {meta['prompt_tokens']} tokens ({L} vision; image 672x672 px = 5 crops), 4 new tokens" in proc.stdout
    assert meta["crops"] == 5
    assert "ort vs eager-dart, same keep ratio" in proc.stdout


def test_every_row_sees_the_same_tokens(run):
    assert_rows_see_the_same_tokens(run[1], L, LOW)


def test_kept_counts_and_flop_limit(run):
    _, doc, engine = run
    rows, meta = rows_by(doc), doc["meta"]
    S, a = meta["prompt_tokens"], meta["span_start"]
    for rt in ("eager-dart", "ort"):  # T = 40: 4 image pivots + 8 * 40 = 324 vision tokens kept
        assert (rows[(rt, LOW)]["kept_vision_tokens"], rows[(rt, LOW)]["kept_tokens"]) == (324, S - L + 324)
        assert (rows[(rt, 1.0)]["kept_tokens"], rows[(rt, 1.0)]["flop_limit_speedup"]) == (S, 1.0)
    config = json.loads((engine / "checkpoint" / "config.json").read_text())
    shape = flops.ModelShape.from_llava_next_config(config).with_crops(CROPS, L)
    want = flops.speedup_limit(shape, S, a, L, DartConfig(keep_ratio=LOW))
    assert rows[("ort", LOW)]["flop_limit_speedup"] == pytest.approx(want, rel=1e-12)
    assert (meta["shape"]["vision"]["crops"], meta["shape"]["vision"]["image_tokens"]) == (CROPS, L)
    assert meta["flops_full"] == flops.prefill_flops(shape, S, None, 2)["total"]

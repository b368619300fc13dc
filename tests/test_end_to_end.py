"""End to end on every registered fixed-resolution family's tiny preset (llava-tiny today; the
dynamic-resolution Qwen2-VL family has the same checks in tests/test_qwen_family.py): `export.build` -> engine
directory -> torch-free runtime (ONNX Runtime, CPU, fp32), against Hugging Face generate and the eager
DART path on the same checkpoint. The parity tests are parametrized over the family registry, so a new
family gets them without editing this file (tests/test_export.py checks each family has a tiny preset)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_runs import generate_without_torch

import runtime
from dart_ops.eager import EagerDart
from dart_ops.spec import DartConfig
from export import families

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.png"
QUESTION = "What is shown in this picture, and why?"
N_NEW = 24
# each fixed-resolution family's tiny presets (Qwen2-VL's dynamic resolution: tests/test_qwen_family.py)
TINY_PRESETS = [p for _, f in sorted(families.families().items()) if f.fixed_resolution for p in f.tiny()]


@pytest.fixture(scope="module", params=TINY_PRESETS)
def tiny_engine(request, tiny_engine, tmp_path_factory):
    """(engine_dir, manifest) of one family's tiny preset: llava-tiny is the session's export
    (conftest), another family's is exported here, once per module."""
    if request.param == tiny_engine[1]["model"]:
        return tiny_engine
    from export.build import build, parse_args

    out = tmp_path_factory.mktemp("engines") / request.param
    build(parse_args(["--model", request.param, "--out", str(out)]))
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return runtime.load(tiny_engine[0])


@pytest.fixture(scope="module")
def checkpoint_model(tiny_engine):
    """The exported checkpoint, loaded back by its own family (eval mode, fp32)."""
    checkpoint = str(tiny_engine[0] / "checkpoint")
    return families.resolve(checkpoint).load(checkpoint, torch.float32).model


@pytest.fixture(scope="module")
def inputs(tiny_engine):
    """input_ids from the checkpoint's own HF processor; pixels from the runtime's preprocessing."""
    from transformers import AutoProcessor

    from runtime.preprocess import preprocess

    _, manifest = tiny_engine
    processor = AutoProcessor.from_pretrained(tiny_engine[0] / "checkpoint")
    text = manifest["prompt"]["template"].format(prompt=QUESTION)
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    image_id, n_vision = manifest["tokens"]["image_token_id"], manifest["tokens"]["image_seq_len"]
    at = int((ids[0] == image_id).nonzero()[0])
    ids = torch.cat([ids[:, :at], torch.full((1, n_vision), image_id), ids[:, at + 1:]], 1)
    pixels = preprocess(str(SAMPLE), manifest["preprocess"])
    return ids, pixels


def test_runtime_prompt_matches_hf_processor(pipe, inputs):
    """The runtime's own template + tokenizer + image-token expansion give the HF ids, id for id, and
    answering from the text is answering from those ids."""
    ids, pixels = inputs
    assert pipe.prompt.encode(QUESTION, with_image=True) == ids[0].tolist()
    from_text = pipe.generate(prompt=QUESTION, image=SAMPLE, max_new_tokens=4)
    from_ids = pipe.generate(input_ids=ids.numpy(), pixel_values=pixels, max_new_tokens=4)
    assert from_text.timings["prompt_tokens"] == ids.shape[1]
    assert from_text.token_ids == from_ids.token_ids and from_text.kept_positions == from_ids.kept_positions
    np.testing.assert_array_equal(from_text.first_logits, from_ids.first_logits)


def test_unpruned_equals_hf_generate(pipe, checkpoint_model, inputs):
    ids, pixels = inputs
    out = pipe.generate(input_ids=ids.numpy(), pixel_values=pixels, keep_ratio=1.0, max_new_tokens=N_NEW)
    hf = checkpoint_model.generate(input_ids=ids, pixel_values=torch.from_numpy(pixels), do_sample=False,
                                   max_new_tokens=N_NEW)
    want = hf[0, ids.shape[1]:].tolist()
    eos = checkpoint_model.config.text_config.eos_token_id
    want = want[: want.index(eos)] if eos in want else want
    assert len(want) >= 20, "the tiny model should produce 20+ tokens before EOS"
    assert out.token_ids == want
    assert out.kept_positions == list(range(ids.shape[1]))


@pytest.mark.parametrize("ratio", [0.333, 0.222, 0.111])
def test_pruned_equals_eager_dart(pipe, checkpoint_model, inputs, ratio, tiny_engine):
    ids, pixels = inputs
    eager = EagerDart(checkpoint_model, DartConfig(keep_ratio=ratio))
    want = eager.generate(ids, torch.from_numpy(pixels), max_new_tokens=N_NEW,
                          eos_token_id=checkpoint_model.config.text_config.eos_token_id)
    out = pipe.generate(input_ids=ids.numpy(), pixel_values=pixels, keep_ratio=ratio, max_new_tokens=N_NEW)
    if want.token_ids and want.token_ids[-1] == checkpoint_model.config.text_config.eos_token_id:
        want.token_ids.pop()  # the runtime does not return EOS
    assert out.kept_positions == want.kept_positions
    assert out.token_ids == want.token_ids
    np.testing.assert_allclose(out.first_logits, want.first_logits[0].numpy(), atol=1e-4, rtol=1e-4)
    L, a = _vision_span(ids, tiny_engine[1])
    counts = DartConfig(keep_ratio=ratio).counts(L, ids.shape[1] - L - a)
    assert len(out.kept_positions) == counts.kept_len(ids.shape[1])


def _vision_span(ids, manifest) -> tuple[int, int]:
    """(length, start) of the image tokens in `ids`."""
    at = (ids[0] == manifest["tokens"]["image_token_id"]).nonzero()
    return len(at), int(at[0])


@pytest.mark.parametrize("cut", ["image_last", "image_only"])
@pytest.mark.parametrize("budget", [{"keep_ratio": 0.111}, {"keep_tokens": 0}, {"keep_tokens": 10**6}])
def test_pruned_length_edges_equal_eager_dart(pipe, checkpoint_model, inputs, tiny_engine, cut, budget):
    """The decoder's kept_slots length (the runtime's S', dart_ops.spec.kept_len of the span as the decoder
    clamps it) at its edges: a prompt ending with the image (the last token is never pruned, so the
    span is one shorter) or holding only the image; no budget, and one above the span. Kept positions,
    first logits and tokens equal eager DART's (which sizes the op from its own counts)."""
    ids, pixels = inputs
    L, a = _vision_span(ids, tiny_engine[1])
    ids = ids[:, :a + L] if cut == "image_last" else ids[:, a:a + L]
    d = tiny_engine[1]["dart"]
    ratio, tokens = budget.get("keep_ratio"), budget.get("keep_tokens")
    config = DartConfig(d["layer"], d["pivots_image"], d["pivots_text"], keep_ratio=ratio, budget=tokens)
    want = EagerDart(checkpoint_model, config).generate(ids, torch.from_numpy(pixels), max_new_tokens=4)
    out = pipe.generate(input_ids=ids.numpy(), pixel_values=pixels, max_new_tokens=4, ignore_eos=True, **budget)
    assert out.kept_positions == want.kept_positions
    assert out.token_ids == want.token_ids[:len(out.token_ids)] and len(out.token_ids) == 4
    np.testing.assert_allclose(out.first_logits, want.first_logits[0].numpy(), atol=1e-4, rtol=1e-4)
    assert out.kept_positions[-1] == ids.shape[1] - 1  # the last prompt token is kept
    if tokens == 10**6:
        assert out.kept_positions == list(range(ids.shape[1]))


def test_one_directory_serves_every_ratio(pipe, inputs, tiny_engine):
    ids, pixels = inputs
    kept = {r: len(pipe.generate(input_ids=ids.numpy(), pixel_values=pixels, keep_ratio=r, max_new_tokens=1)
                   .kept_positions) for r in (1.0, 0.333, 0.111)}
    S, (L, _) = ids.shape[1], _vision_span(ids, tiny_engine[1])
    d = tiny_engine[1]["dart"]
    pi, P = d["pivots_image"], d["pivots_image"] + d["pivots_text"]
    # kept vision tokens: the image pivots + P pivots x round(r * L) // P tokens each
    want = {1.0: S, **{r: S - L + pi + P * (round(r * L) // P) for r in (0.333, 0.111)}}
    assert kept == want
    if tiny_engine[1]["family"] == "llava":  # LLaVA-1.5: 196 and 68 of the 576 vision tokens
        assert want == {1.0: S, 0.333: S - 576 + 196, 0.111: S - 576 + 68}


def test_text_only_prompt_is_not_pruned(pipe):
    out = pipe.generate(prompt="Tell me a story about the sea.", max_new_tokens=4)
    assert out.kept_positions == list(range(out.timings["prompt_tokens"]))


def _run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "runtime.run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_cli_json_matches_api(pipe, tiny_engine):
    r = _run_cli("--engine-dir", str(tiny_engine[0]), "--image", str(SAMPLE), "--prompt", "What is this?",
                 "--max-new-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = pipe.generate(prompt="What is this?", image=SAMPLE, max_new_tokens=12)
    assert got["token_ids"] == want.token_ids and got["kept_positions"] == want.kept_positions
    assert got["text"] == want.text


def test_keep_tokens_equals_eager_dart_with_that_budget(pipe, checkpoint_model, inputs, tiny_engine):
    """keep_tokens=N is DART with an absolute budget (T = N // P), from the same engine directory, and
    the CLI's --keep-tokens gives the API's answer."""
    ids, pixels = inputs
    d = tiny_engine[1]["dart"]
    config = DartConfig(d["layer"], d["pivots_image"], d["pivots_text"], keep_ratio=None, budget=100)
    want = EagerDart(checkpoint_model, config).generate(ids, torch.from_numpy(pixels), max_new_tokens=8)
    out = pipe.generate(input_ids=ids.numpy(), pixel_values=pixels, keep_tokens=100, max_new_tokens=8,
                        ignore_eos=True)
    assert out.kept_positions == want.kept_positions and out.token_ids == want.token_ids
    L, a = _vision_span(ids, tiny_engine[1])
    P = d["pivots_image"] + d["pivots_text"]
    assert len(out.kept_positions) == ids.shape[1] - L + d["pivots_image"] + P * (100 // P)
    assert out.keep_ratio is None
    r = _run_cli("--engine-dir", str(tiny_engine[0]), "--image", str(SAMPLE), "--prompt", "What is this?",
                 "--max-new-tokens", "4", "--keep-tokens", "100", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    api = pipe.generate(prompt="What is this?", image=SAMPLE, max_new_tokens=4, keep_tokens=100)
    assert (got["token_ids"], got["kept_positions"], got["keep_tokens"]) == (api.token_ids, api.kept_positions, 100)
    r = _run_cli("--engine-dir", str(tiny_engine[0]), "--prompt", "x", "--keep-tokens", "10", "--ratio", "0.5")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr



def test_runtime_without_torch(pipe, tiny_engine):
    got = generate_without_torch(tiny_engine[0], SAMPLE, max_new_tokens=12)
    want = pipe.generate(prompt="What is this?", image=SAMPLE, max_new_tokens=12)
    assert got == {"token_ids": want.token_ids, "kept": want.kept_positions}


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    dst = tmp_path / "eng"
    shutil.copytree(tiny_engine[0], dst)
    return dst


def _one_line_error(r, code=1):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and "Traceback" not in r.stderr
    return lines[-1]


def test_bad_engine_directories(engine_copy, tmp_path):
    args = ("--image", str(SAMPLE), "--prompt", "hi")
    assert "manifest" in _one_line_error(_run_cli("--engine-dir", str(tmp_path / "missing"), *args))
    with open(engine_copy / "decoder.onnx", "r+b") as f:  # edit the graph after export
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    assert "decoder.onnx" in _one_line_error(_run_cli("--engine-dir", str(engine_copy), *args))
    m = json.loads((engine_copy / "manifest.json").read_text())
    m["format_version"] = 99
    (engine_copy / "manifest.json").write_text(json.dumps(m))
    assert "99" in _one_line_error(_run_cli("--engine-dir", str(engine_copy), *args))
    (engine_copy / "manifest.json").write_text("{not json")
    _one_line_error(_run_cli("--engine-dir", str(engine_copy), *args))


def test_bad_user_input(tiny_engine, tmp_path):
    eng = str(tiny_engine[0])
    bad_image = tmp_path / "not-an-image.png"
    bad_image.write_text("hello")
    assert "not-an-image.png" in _one_line_error(_run_cli("--engine-dir", eng, "--image", str(bad_image),
                                                          "--prompt", "hi"))
    r = _run_cli("--engine-dir", eng, "--image", str(SAMPLE), "--prompt", "hi", "--ratio", "1.5")
    assert r.returncode in (1, 2) and "ratio" in r.stderr and "Traceback" not in r.stderr
    long_prompt = "the sea " * 2000
    assert "tokens" in _one_line_error(_run_cli("--engine-dir", eng, "--image", str(SAMPLE),
                                                "--prompt", long_prompt))

"""End to end on llava-tiny: `export.build` -> engine directory -> torch-free runtime (ONNX
Runtime, CPU, fp32), against Hugging Face generate and the eager DART path on the same checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import runtime
from dart_ops.eager import EagerDart
from dart_ops.spec import DartConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.png"
MODEL = "llava-tiny"
N_NEW = 24


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return runtime.load(tiny_engine[0])


@pytest.fixture(scope="module")
def checkpoint_model(tiny_engine):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_engine[0] / "checkpoint").eval()


@pytest.fixture(scope="module")
def inputs(tiny_engine):
    """input_ids from the checkpoint's own HF processor; pixels from the runtime's preprocessing."""
    from transformers import AutoProcessor

    from runtime.preprocess import preprocess

    _, manifest = tiny_engine
    processor = AutoProcessor.from_pretrained(tiny_engine[0] / "checkpoint")
    text = manifest["prompt"]["template"].format(prompt="What is shown in this picture, and why?")
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    image_id = manifest["tokens"]["image_token_id"]
    at = int((ids[0] == image_id).nonzero()[0])
    ids = torch.cat([ids[:, :at], torch.full((1, 576), image_id), ids[:, at + 1:]], 1)
    pixels = preprocess(str(SAMPLE), manifest["preprocess"])
    return ids, pixels


def test_runtime_prompt_matches_hf_processor(pipe, inputs, tiny_engine):
    """The runtime's own template + tokenizer + image-token expansion give the HF ids."""
    ids, _ = inputs
    out = pipe.generate(prompt="What is shown in this picture, and why?", image=SAMPLE, max_new_tokens=1)
    assert out.timings["prompt_tokens"] == ids.shape[1]


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
def test_pruned_equals_eager_dart(pipe, checkpoint_model, inputs, ratio):
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
    counts = DartConfig(keep_ratio=ratio).counts(576, ids.shape[1] - 576 - int((ids[0] == 1023).nonzero()[0]))
    assert len(out.kept_positions) == counts.kept_len(ids.shape[1])


def test_one_directory_serves_every_ratio(pipe, inputs):
    ids, pixels = inputs
    kept = {r: len(pipe.generate(input_ids=ids.numpy(), pixel_values=pixels, keep_ratio=r, max_new_tokens=1)
                   .kept_positions) for r in (1.0, 0.333, 0.111)}
    S = ids.shape[1]
    assert kept == {1.0: S, 0.333: S - 576 + 196, 0.111: S - 576 + 68}


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


BLOCKED = """
import sys, json
sys.modules["torch"] = None
sys.modules["transformers"] = None
import runtime
out = runtime.load(sys.argv[1]).generate(prompt="What is this?", image=sys.argv[2], max_new_tokens=12)
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print(json.dumps({"token_ids": out.token_ids, "kept": out.kept_positions}))
"""


def test_runtime_without_torch(pipe, tiny_engine):
    r = subprocess.run([sys.executable, "-c", BLOCKED, str(tiny_engine[0]), str(SAMPLE)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
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

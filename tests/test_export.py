"""python -m export.build: registry, CLI, bad input, the engine directory it writes, validation."""

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from export import families
from export.manifest import sha256

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "export.build", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_registry_rejects_duplicates():
    fam = families.families()["llava"]
    with pytest.raises(ValueError, match="already registered"):
        families.register(fam)


@pytest.mark.parametrize("name", sorted(families.families()))
def test_every_family_has_a_tiny_preset(name):
    """tests/test_end_to_end.py runs its parity tests (HF generate, eager DART) on the tiny preset of
    every registered fixed-resolution family, parametrized over the registry (a dynamic-resolution
    family, Qwen2-VL, has its own: tests/test_qwen_family.py): the presets must exist and be the family's."""
    fam = families.families()[name]
    assert fam.tiny()
    for tiny in fam.tiny():
        assert tiny in fam.presets, f"family {name} has no {tiny} preset"
        assert families.resolve(tiny) is fam


def test_help_and_dry_run():
    r = _cli("--help")
    assert r.returncode == 0 and "--pivots-image" in r.stdout and "examples:" in r.stdout
    r = _cli("--model", "llava-tiny", "--ratio", "0.111", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "keep 68 of 576 vision tokens (T=8)" in r.stderr
    r = _cli("--model", "llava-tiny", "--ratio", "1.0", "--dry-run")
    assert "keep all 576 vision tokens (no pruning)" in r.stderr


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["--model", "no-such-model"], 2, "unknown model 'no-such-model'"),
        (["--model", "llava-tiny", "--ratio", "1.5"], 2, "keep_ratio must be in (0, 1]"),
        (["--model", "llava-tiny", "--ratio", "0"], 2, "keep_ratio must be in (0, 1]"),
        (["--model", "llava-tiny", "--layer", "0"], 2, "layer (K) must be an integer >= 1"),
        (["--model", "llava-tiny", "--opset", "13"], 2, "--opset must be in [17, 20]"),
    ],
)
def test_bad_arguments(args, code, needle, tmp_path):
    r = _cli(*args, "--out", str(tmp_path / "eng"))
    assert r.returncode == code
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "eng").exists()


def test_missing_weights_one_line_and_nothing_written(tmp_path):
    r = _cli("--model", "llava", "--out", str(tmp_path / "eng"), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "llava-tiny" in last and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_non_engine_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = _cli("--model", "llava-tiny", "--out", str(tmp_path))
    assert r.returncode == 1 and "is not empty and is not a DART-VLM engine directory" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_engine_directory(tiny_engine):
    out, manifest = tiny_engine
    assert manifest["format"] == "dart-vlm-engine" and manifest["format_version"] == 3
    assert manifest["dart"] == {"layer": 2, "pivots_image": 4, "pivots_text": 4, "keep_ratio": 0.111,
                                "max_span": 584}
    assert manifest["tokens"]["image_token_id"] == 1023 and manifest["tokens"]["image_seq_len"] == 576
    for name, info in manifest["files"].items():
        assert sha256(out / name) == info["sha256"], name
    assert {"vision_encoder.onnx", "embed_tokens.onnx", "decoder.onnx", "decoder.onnx.data",
            "tokenizer.json"} <= set(manifest["files"])
    assert not list(out.parent.glob(".*partial*"))
    decoder = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    assert [n.op_type for n in decoder.graph.node if n.domain == "dart"] == ["DartPruneSlots"]
    assert [i.name for i in decoder.graph.input] == [t["name"] for t in manifest["stages"]["decoder"]["inputs"]]
    assert [o.name for o in decoder.graph.output] == [t["name"] for t in manifest["stages"]["decoder"]["outputs"]]
    assert decoder.ir_version == 10


def test_checkpoint_round_trip(tiny_engine, tiny_llava):
    """The tiny weights written to <out>/checkpoint load back as the same model."""
    import torch

    out, _ = tiny_engine
    fam = families.resolve(str(out / "checkpoint"))
    loaded = fam.load(str(out / "checkpoint"), torch.float32)
    want = tiny_llava.state_dict()
    got = loaded.model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.tokens["image_token_id"] == 1023 and loaded.image_seq_len == 576


def test_validation_names_stage_and_tensor(tiny_engine):
    """Validation fails with the stage and tensor when eager and the graph disagree."""
    import torch

    from dart_ops.spec import DartConfig
    from export import stages
    from export.validate import ValidationError, validate

    out, _ = tiny_engine
    loaded = families.resolve("llava-tiny").load("llava-tiny", torch.float32)
    modules = loaded.family.stage_modules(loaded, DartConfig())
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(1.01)  # the eager model now differs from the graph
    dims = stages.decoder_dims(modules["decoder"])
    decls = loaded.family.stage_decls(loaded, modules["decoder"], dims, "float32")
    examples = loaded.family.vision_examples(loaded, decls["vision_encoder"])
    with pytest.raises(ValidationError, match=r"decoder: logits differs from eager"):
        validate(out, modules, decls, examples, dims, DartConfig().counts, torch.float32, tol=1e-4)
    with torch.no_grad():
        modules["vision_encoder"].projector.linear_2.bias.add_(0.1)  # and now the vision stage too
    with pytest.raises(ValidationError, match=r"vision_encoder: image_features differs from eager PyTorch by "
                                              r".*\(pixel_values \[1, 3, 336, 336\]\)"):
        validate(out, modules, decls, examples, dims, DartConfig().counts, torch.float32, tol=1e-4)

"""TensorRT build (export/trt.py) and run wiring (runtime.load(providers=["tensorrt"])), as far as it
can be checked without TensorRT: the optimization profiles against the manifest's dynamic axes, the
polygraphy Profile objects, CLI errors, the manifest's "tensorrt" section and the version check.
Tests that need TensorRT are marked and skip with a reason where `import tensorrt` fails."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from export import trt
from runtime.errors import EngineError
from runtime.pipeline import check_trt_version

ROOT = Path(__file__).resolve().parents[1]

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (import tensorrt fails)")


def _ranges(profile: dict) -> dict:
    return {n: (tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for n, r in profile["inputs"].items()}


# --- profiles ------------------------------------------------------------------------------------

def test_decoder_profiles_follow_the_manifest_axes(tiny_engine):
    _, m = tiny_engine
    ax = {n: (a["min"], a["opt"], a["max"]) for n, a in m["dynamic_axes"].items()}
    dec = m["decoder"]
    H, dh, D, K = dec["num_kv_heads"], dec["head_dim"], dec["hidden_size"], m["dart"]["layer"]
    B, S = ax["batch"], ax["seq"]
    prefill, decode = trt.profile_specs(m, "decoder")
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    p, d = _ranges(prefill), _ranges(decode)
    assert p["inputs_embeds"] == ((B[0], S[0], D), (B[1], S[1], D), (B[2], S[2], D))
    assert p["position_ids"] == ((B[0], S[0]), (B[1], S[1]), (B[2], S[2]))
    for i in range(dec["num_layers"]):
        for kind in ("key", "value"):
            assert p[f"past_{kind}_{i}"] == ((B[0], H, 0, dh), (B[1], H, 0, dh), (B[2], H, 0, dh))
            axis = ax["past_full"] if i < K else ax["past_kept"]
            assert d[f"past_{kind}_{i}"] == ((B[0], H, 1, dh), (B[1], H, axis[1], dh), (B[2], H, axis[2], dh))
    assert d["inputs_embeds"] == ((B[0], 1, D), (B[1], 1, D), (B[2], 1, D))
    # int64 scalars that set shapes inside DartPrune: value ranges (shape tensors)
    assert p["span_len"] == ((0,), (576,), (m["dart"]["max_span"],))
    assert p["quota"] == ((0,), (8,), (m["dart"]["max_span"],))  # ratio 0.111 of 576 -> T = 8
    assert p["span_start"] == ((0,), (5,), (S[2] - 1,))
    assert all(d[n] == ((0,), (0,), (0,)) for n in ("span_start", "span_len", "quota"))
    assert {r["kind"] for r in prefill["inputs"].values()} == {"shape", "values"}


def test_vision_and_embed_profiles(tiny_engine):
    _, m = tiny_engine
    ax = {n: (a["min"], a["opt"], a["max"]) for n, a in m["dynamic_axes"].items()}
    (vis,) = trt.profile_specs(m, "vision_encoder")
    (emb,) = trt.profile_specs(m, "embed_tokens")
    size = m["preprocess"]["image_size"]
    assert _ranges(vis) == {"pixel_values": tuple((b, 3, size, size) for b in ax["images"])}
    assert _ranges(emb) == {"input_ids": tuple(zip(ax["batch"], ax["seq"]))}


def test_tighter_limits_and_wider_limits(tiny_engine):
    _, m = tiny_engine
    cfg = trt.TrtConfig(Path("."), max_batch=1, max_seq=700, max_context=1024)
    prefill, decode = trt.profile_specs(m, "decoder", cfg)
    assert _ranges(prefill)["inputs_embeds"][2] == (1, 700, 64)
    assert _ranges(decode)["past_key_0"][2] == (1, 2, 1024, 16)
    assert _ranges(prefill)["span_start"] == ((0,), (5,), (699,))  # a span starts inside the prompt
    with pytest.raises(trt.TrtBuildError, match="--max-seq 99999 exceeds"):
        trt.profile_specs(m, "decoder", trt.TrtConfig(Path("."), max_seq=99999))
    prefill, _ = trt.profile_specs(m, "decoder", trt.TrtConfig(Path("."), max_vision_tokens=576))
    assert _ranges(prefill)["span_len"] == ((0,), (576,), (576,)) and _ranges(prefill)["quota"][2] == (576,)
    with pytest.raises(trt.TrtBuildError, match="--max-vision-tokens 9999 exceeds"):
        trt.profile_specs(m, "decoder", trt.TrtConfig(Path("."), max_vision_tokens=9999))


def test_polygraphy_profiles(tiny_engine):
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    _, m = tiny_engine
    specs = trt.profile_specs(m, "decoder")
    prefill, decode = trt.to_polygraphy(specs)
    assert prefill["past_key_0"].min == (1, 2, 0, 16) and prefill["past_key_0"].max == (4, 2, 0, 16)
    assert decode["past_key_3"].opt == (1, 2, 128, 16)
    assert prefill["quota"].opt == (8,)
    # a scalar TensorRT did not parse as a shape tensor gets the 0-d shape instead of values
    (p, _) = trt.to_polygraphy(specs, shape_tensors={"span_start", "span_len"})
    assert p["quota"].min == () and p["span_len"].max == (m["dart"]["max_span"],)


def test_value_ranges_come_from_the_manifest_only(tiny_engine):
    """A 0-d input's value range is its "values" axis: change the axis, the profile follows; an
    engine directory whose scalars name no axis (exported before) is refused where TensorRT makes
    them shape tensors."""
    _, m = tiny_engine
    m = json.loads(json.dumps(m))
    m["dynamic_axes"]["quota"] = {"min": 0, "opt": 31, "max": 77}
    prefill, decode = trt.profile_specs(m, "decoder")
    assert _ranges(prefill)["quota"] == ((0,), (31,), (77,)) and _ranges(decode)["quota"] == ((0,), (0,), (0,))
    for t in m["stages"]["decoder"]["inputs"]:
        t.pop("values", None)
    specs = trt.profile_specs(m, "decoder")
    assert _ranges(specs[0])["quota"] == ((), (), ())  # a plain 0-d shape
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    with pytest.raises(trt.TrtBuildError, match="TensorRT parses input span_start as a shape tensor, but the "
                                                r"manifest gives it no value range \('values'\); re-export"):
        trt.to_polygraphy(specs, shape_tensors={"span_start"})


# --- CLI -----------------------------------------------------------------------------------------

def _cli(*args, module="export.trt"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_cli_dry_run_prints_profiles(tiny_engine):
    r = _cli("--engine-dir", str(tiny_engine[0]), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "decoder profile 0 (prefill):" in r.stdout and "decoder profile 1 (decode):" in r.stdout
    assert "span_len         values min [0]" in r.stdout


def test_cli_bad_input(tmp_path):
    r = _cli("--engine-dir", str(tmp_path / "missing"))
    assert r.returncode == 2 and "has no manifest.json" in r.stderr


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown when TensorRT is missing")
def test_cli_without_tensorrt(tiny_engine, tmp_path):
    out = tmp_path / "e"
    shutil.copytree(tiny_engine[0], out)
    before = (out / "manifest.json").read_text()
    r = _cli("--engine-dir", str(out))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "TensorRT is not installed" in r.stderr and "JetPack" in r.stderr
    assert (out / "manifest.json").read_text() == before and not list(out.glob("*.engine"))


def test_fp16_needs_weak_typing(tiny_engine):
    with pytest.raises(trt.TrtBuildError, match="weakly typed"):
        trt.build_engines(trt.TrtConfig(tiny_engine[0], strongly_typed=True, fp16=True))


@pytest.mark.skipif(HAVE_TRT, reason="checks the message shown when TensorRT is missing")
def test_export_build_target_trt_fails_before_exporting(tmp_path):
    out = tmp_path / "never"
    r = _cli("--model", "llava-tiny", "--target", "trt", "--out", str(out), module="export.build")
    assert r.returncode == 1 and "TensorRT is not installed" in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


# --- runtime -------------------------------------------------------------------------------------

def _with_trt_section(src: Path, dst: Path, version: str) -> Path:
    """A copy of an engine directory with a "tensorrt" section (placeholder engine files)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    from export.manifest import file_entry

    for stage in trt.STAGES:
        (dst / f"{stage}.engine").write_bytes(b"placeholder plan for " + stage.encode())
        m["files"][f"{stage}.engine"] = file_entry(dst / f"{stage}.engine").to_json()
    m["tensorrt"] = {"version": version, "engines": {s: f"{s}.engine" for s in trt.STAGES},
                     "strongly_typed": True, "fp16": False, "profiles": {}}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_manifest_tensorrt_section(tiny_engine, tmp_path):
    d = _with_trt_section(tiny_engine[0], tmp_path / "e", "10.3.0")
    from runtime.manifest import read_manifest

    m = read_manifest(d)
    assert m.tensorrt.version == "10.3.0" and m.tensorrt.engines["decoder"] == "decoder.engine"
    assert read_manifest(tiny_engine[0]).tensorrt is None
    # ONNX Runtime still runs the ONNX graphs of the same directory
    out = runtime.load(d).generate("hi", max_new_tokens=2)
    assert len(out.token_ids) <= 2


def test_runtime_tensorrt_errors(tiny_engine, tmp_path):
    with pytest.raises(EngineError, match="no TensorRT engines; build them on this device with: python -m export.trt"):
        runtime.load(tiny_engine[0], providers=["tensorrt"])
    with pytest.raises(EngineError, match="cannot be combined"):
        runtime.load(tiny_engine[0], providers=["tensorrt", "cpu"])
    d = _with_trt_section(tiny_engine[0], tmp_path / "e", "0.0.1")
    with pytest.raises(EngineError, match="TensorRT 0.0.1" if HAVE_TRT else "TensorRT is not installed"):
        runtime.load(d, providers=["tensorrt"])


def test_version_check_message():
    with pytest.raises(EngineError, match="built with TensorRT 10.3.0, this is 10.7.0; rebuild them here with: "
                                          "python -m export.trt --engine-dir engines/x"):
        check_trt_version("10.3.0", "10.7.0", "engines/x")
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        check_trt_version("10.3.0", None, "engines/x")
    check_trt_version("10.3.0", "10.3.0", "engines/x")


# --- with TensorRT (a GPU machine) ---------------------------------------------------------------

@pytest.mark.tensorrt
@needs_trt
def test_build_and_run_tiny_engines_against_onnxruntime(tiny_engine, tmp_path):
    """Build the llava-tiny engines, then compare every stage with ONNX Runtime (polygraphy's
    comparator tolerances) and the whole generate() (tokens and kept positions exact)."""
    d = tmp_path / "e"
    shutil.copytree(tiny_engine[0], d)
    section = trt.build_engines(trt.TrtConfig(d))
    assert set(section["engines"]) == set(trt.STAGES)
    ort_pipe, trt_pipe = runtime.load(d), runtime.load(d, providers=["tensorrt"])
    for ratio in (1.0, 0.111):
        a = ort_pipe.generate("What is in the picture?", image=ROOT / "examples" / "sample.png",
                              keep_ratio=ratio, max_new_tokens=8)
        b = trt_pipe.generate("What is in the picture?", image=ROOT / "examples" / "sample.png",
                              keep_ratio=ratio, max_new_tokens=8)
        assert b.kept_positions == a.kept_positions
        assert b.token_ids == a.token_ids
        np.testing.assert_allclose(b.first_logits, a.first_logits, atol=1e-3, rtol=1e-3)


def test_building_needs_no_torch(tiny_engine):
    """The device-side build step imports neither torch nor transformers (Jetson has neither)."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from export import trt\n"
            f"sys.exit(trt.main(['--engine-dir', {str(tiny_engine[0])!r}, '--dry-run']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "decoder profile 1 (decode):" in r.stdout


@pytest.mark.tensorrt
@needs_trt
def test_stages_match_onnxruntime_through_polygraphy_comparator(tiny_engine, tmp_path):
    """Each built engine against ONNX Runtime on the same ONNX graph with polygraphy's Comparator:
    the vision encoder and the embedding on one profile, the decoder's prefill (profile 0, DART
    pruning at ratio 0.111) and a decode step (profile 1). kept_positions must match exactly."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    d = tmp_path / "e"
    shutil.copytree(tiny_engine[0], d)
    trt.build_engines(trt.TrtConfig(d))
    m = json.loads((d / "manifest.json").read_text())
    dec = m["decoder"]
    rng = np.random.default_rng(0)
    S, L, a = 600, 576, 5
    kv = lambda n: np.zeros((1, dec["num_kv_heads"], n, dec["head_dim"]), np.float32)  # noqa: E731
    past_names = [t["name"] for t in m["stages"]["decoder"]["inputs"] if t["name"].startswith("past_")]
    prefill = {"inputs_embeds": rng.standard_normal((1, S, dec["hidden_size"]), dtype=np.float32),
               "position_ids": np.arange(S, dtype=np.int64)[None], "span_start": np.array(a),
               "span_len": np.array(L), "quota": np.array(8), **{n: kv(0) for n in past_names}}
    # a decode step after that prefill: low layers hold S entries, high layers S' = S - L + 68
    K, kept = m["dart"]["layer"], S - L + 68
    step = {"inputs_embeds": rng.standard_normal((1, 1, dec["hidden_size"]), dtype=np.float32),
            "position_ids": np.array([[S]]), "span_start": np.array(0), "span_len": np.array(0),
            "quota": np.array(0), **{n: kv(S if int(n.rsplit("_", 1)[1]) < K else kept) for n in past_names}}
    size = m["preprocess"]["image_size"]
    cases = [
        ("vision_encoder", 0, [{"pixel_values": rng.standard_normal((1, 3, size, size), dtype=np.float32)}]),
        ("embed_tokens", 0, [{"input_ids": rng.integers(0, 1000, (1, 17))}]),
        ("decoder", 0, [prefill]),
        ("decoder", 1, [step]),
    ]
    for stage, profile, feeds in cases:
        runners = [OnnxrtRunner(SessionFromOnnx(str(d / f"{stage}.onnx"))),
                   TrtRunner(EngineFromBytes(BytesFromPath(str(d / f"{stage}.engine"))),
                             optimization_profile=profile)]
        results = Comparator.run(runners, data_loader=feeds)
        assert bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=1e-3, rtol=1e-3))), stage
        if stage == "decoder" and profile == 0:
            (_, ort_out), (_, trt_out) = results.items()
            assert np.array_equal(ort_out[0]["kept_positions"], trt_out[0]["kept_positions"])

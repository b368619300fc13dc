"""TensorRT build (export/trt.py) and run wiring (runtime.load(providers=["tensorrt"])), as far as it
can be checked without TensorRT: the optimization profiles against the manifest's dynamic axes (a
hand-made format-3 manifest and a real llava-tiny export: shapes only, no shape-tensor values), the
polygraphy Profile objects, the build with polygraphy's TensorRT loaders faked (a network with a
shape-tensor input is refused), CLI errors, the manifest's "tensorrt" section and the version check.
Tests that need TensorRT are marked and skip with a reason where `import tensorrt` fails."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


# --- profiles from a hand-made manifest (the format_version 3 interface) -------------------------

AXES = {"images": (1, 1, 4), "vision_tokens": (576, 576, 576), "batch": (1, 1, 4), "seq": (1, 640, 2048),
        "past_full": (0, 640, 4096), "past_kept": (0, 128, 4096), "kept": (1, 132, 2048)}


def _t(name: str, dtype: str, *shape) -> dict:
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def hand_manifest(positions=("batch", "seq"), axes=AXES) -> dict:
    """The parts of a manifest profile_specs reads: llava-tiny's decoder interface (K = 2, 4 layers,
    2 KV heads of 16), int32 0-d span/quota scalars (data, no value range), kept_slots [batch, kept]."""
    past = [_t(f"past_{kv}_{i}", "float32", "batch", 2, "past_full" if i < 2 else "past_kept", 16)
            for i in range(4) for kv in ("key", "value")]
    decoder = [_t("inputs_embeds", "float32", "batch", "seq", 64), _t("position_ids", "int32", *positions),
               _t("span_start", "int32"), _t("span_len", "int32"), _t("quota", "int32"),
               _t("kept_slots", "int32", "batch", "kept"), *past]
    return {"dynamic_axes": {n: {"min": a, "opt": b, "max": c} for n, (a, b, c) in axes.items()},
            "stages": {"vision_encoder": {"inputs": [_t("pixel_values", "float32", "images", 3, 336, 336)]},
                       "embed_tokens": {"inputs": [_t("input_ids", "int32", "batch", "seq")]},
                       "decoder": {"inputs": decoder}}}


SCALAR = ((), (), ())


def test_decoder_profiles_from_the_declared_axes():
    prefill, decode = trt.profile_specs(hand_manifest(), "decoder")
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    assert all(set(r) == {"min", "opt", "max"} for s in (prefill, decode) for r in s["inputs"].values())
    p, d = _ranges(prefill), _ranges(decode)
    assert p["inputs_embeds"] == ((1, 1, 64), (1, 640, 64), (4, 2048, 64))
    assert p["position_ids"] == ((1, 1), (1, 640), (4, 2048))
    assert p["kept_slots"] == ((1, 1), (1, 132), (4, 2048))  # S' over the kept axis
    assert p["span_start"] == p["span_len"] == p["quota"] == SCALAR  # data: a 0-d shape, no values
    for name in ("past_key_0", "past_value_1", "past_key_2", "past_value_3"):
        assert p[name] == ((1, 2, 0, 16), (1, 2, 0, 16), (4, 2, 0, 16))  # prefill: empty KV
    assert d["inputs_embeds"] == ((1, 1, 64), (1, 1, 64), (4, 1, 64))
    assert d["position_ids"] == ((1, 1), (1, 1), (4, 1))
    assert d["kept_slots"] == ((1, 1), (1, 1), (4, 1))  # a decode step prunes nothing: S' = S = 1
    assert d["span_start"] == d["span_len"] == d["quota"] == SCALAR
    assert d["past_key_0"] == d["past_value_1"] == ((1, 2, 1, 16), (1, 2, 640, 16), (4, 2, 4096, 16))
    assert d["past_key_2"] == d["past_value_3"] == ((1, 2, 1, 16), (1, 2, 128, 16), (4, 2, 4096, 16))
    assert list(p) == list(d) == [t["name"] for t in hand_manifest()["stages"]["decoder"]["inputs"]]


def test_qwen_position_rows_and_the_other_stages():
    prefill, decode = trt.profile_specs(hand_manifest(positions=(3, "batch", "seq")), "decoder")
    assert _ranges(prefill)["position_ids"] == ((3, 1, 1), (3, 1, 640), (3, 4, 2048))
    assert _ranges(decode)["position_ids"] == ((3, 1, 1), (3, 1, 1), (3, 4, 1))
    (vis,) = trt.profile_specs(hand_manifest(), "vision_encoder")
    (emb,) = trt.profile_specs(hand_manifest(), "embed_tokens")
    assert vis["name"] == emb["name"] == "default"
    assert _ranges(vis) == {"pixel_values": ((1, 3, 336, 336), (1, 3, 336, 336), (4, 3, 336, 336))}
    assert _ranges(emb) == {"input_ids": ((1, 1), (1, 640), (4, 2048))}


def test_build_flags_tighten_the_axes():
    cfg = trt.TrtConfig(Path("."), max_batch=1, max_seq=700, max_context=1024)
    prefill, decode = map(_ranges, trt.profile_specs(hand_manifest(), "decoder", cfg))
    assert prefill["inputs_embeds"] == ((1, 1, 64), (1, 640, 64), (1, 700, 64))
    assert prefill["kept_slots"] == ((1, 1), (1, 132), (1, 700))  # the pruned prompt is no longer than the prompt
    assert decode["past_key_0"] == ((1, 2, 1, 16), (1, 2, 640, 16), (1, 2, 1024, 16))
    assert decode["past_key_3"] == ((1, 2, 1, 16), (1, 2, 128, 16), (1, 2, 1024, 16))
    prefill, _ = map(_ranges, trt.profile_specs(hand_manifest(), "decoder", trt.TrtConfig(Path("."), max_seq=100)))
    assert prefill["position_ids"] == ((1, 1), (1, 100), (4, 100)) and prefill["kept_slots"] == ((1, 1), (1, 100), (4, 100))
    narrow = hand_manifest(axes={**AXES, "kept": (1, 132, 1000)})  # kept narrower than seq: never widened
    prefill, _ = map(_ranges, trt.profile_specs(narrow, "decoder", trt.TrtConfig(Path("."), max_seq=1500)))
    assert prefill["kept_slots"] == ((1, 1), (1, 132), (4, 1000))
    with pytest.raises(trt.TrtBuildError, match=r"^--max-seq 99999 exceeds the exported axis 'seq' \(max 2048\); "
                                                "re-export with a larger limit$"):
        trt.profile_specs(hand_manifest(), "decoder", trt.TrtConfig(Path("."), max_seq=99999))
    with pytest.raises(trt.TrtBuildError, match=r"^the longest prompt \(2048 tokens\) exceeds the longest context "
                                                r"\(500\); lower --max-seq or raise --max-context$"):
        trt.profile_specs(hand_manifest(), "decoder", trt.TrtConfig(Path("."), max_context=500))


def test_an_undeclared_axis_is_an_error():
    m = hand_manifest()
    del m["dynamic_axes"]["kept"]  # an export before the kept axis
    with pytest.raises(trt.TrtBuildError, match="^input kept_slots has the dim 'kept', which manifest.json's "
                                                "dynamic_axes does not declare; re-export with this version"):
        trt.profile_specs(m, "decoder")


def test_polygraphy_profiles_have_shapes_only():
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    prefill, decode = trt.to_polygraphy(trt.profile_specs(hand_manifest(), "decoder"))
    assert (prefill["quota"].min, prefill["quota"].opt, prefill["quota"].max) == ((), (), ())
    assert (prefill["kept_slots"].min, prefill["kept_slots"].max) == ((1, 1), (4, 2048))
    assert prefill["past_key_0"].min == (1, 2, 0, 16) and prefill["past_key_0"].max == (4, 2, 0, 16)
    assert decode["past_key_3"].opt == (1, 2, 128, 16) and decode["kept_slots"].max == (4, 1)
    assert set(prefill) == set(decode) == {t["name"] for t in hand_manifest()["stages"]["decoder"]["inputs"]}


def test_the_runtime_picks_the_built_profiles_by_shape():
    """What the build declares is what TrtStage.pick_profile chooses from: a prefill (pruned or
    not) takes profile 0, a decode step profile 1, by the input shapes alone."""
    from runtime.trt_stage import pick_profile

    specs = trt.profile_specs(hand_manifest(), "decoder")
    ranges = [{n: (tuple(r["min"]), tuple(r["max"])) for n, r in s["inputs"].items()} for s in specs]

    def shapes(seq, kept, past_full, past_kept):
        kv = {f"past_{k}_{i}": (1, 2, past_full if i < 2 else past_kept, 16) for i in range(4) for k in ("key", "value")}
        return {"inputs_embeds": (1, seq, 64), "position_ids": (1, seq), "span_start": (), "span_len": (),
                "quota": (), "kept_slots": (1, kept), **kv}

    assert pick_profile(ranges, shapes(600, 92, 0, 0)) == 0  # 576 vision tokens pruned to 68
    assert pick_profile(ranges, shapes(20, 20, 0, 0)) == 0  # text only: nothing pruned
    assert pick_profile(ranges, shapes(1, 1, 600, 92)) == 1
    with pytest.raises(EngineError, match=r"profile 0: past_key_0 shape \(1, 2, 600, 16\) is outside .*"
                                          r"profile 1: kept_slots shape \(1, 2\) is outside \(1, 1\)\.\.\(4, 1\)"):
        pick_profile(ranges, shapes(1, 2, 600, 92), where="decoder")


# --- the build, with polygraphy's TensorRT loaders faked -------------------------------------------


class FakeNetwork:
    def __init__(self, inputs):
        self.inputs = inputs
        self.num_inputs = len(inputs)

    def get_input(self, i):
        return self.inputs[i]


@pytest.fixture
def fake_build(monkeypatch):
    """export.trt with TensorRT and polygraphy's loaders faked: the parsed 'network' lists the ONNX
    graph's inputs and marks those in `log.shape_tensors` as shape tensors (ITensor.is_shape_tensor);
    the 'plan' names its stage. `log` records the CreateConfig arguments and the networks built."""
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    import onnx
    import polygraphy.backend.trt as pg

    log = SimpleNamespace(shape_tensors=set(), configs=[], built=[])

    def network_from_onnx_path(path, strongly_typed=None):
        graph = onnx.load(path, load_external_data=False).graph
        inputs = [SimpleNamespace(name=i.name, is_shape_tensor=i.name in log.shape_tensors) for i in graph.input]
        return "builder", FakeNetwork(inputs), Path(path).stem

    def create_config(**kwargs):
        log.configs.append(kwargs)
        return kwargs

    def engine_from_network(network, config, save_timing_cache=None):
        log.built.append(network[2])
        return f"plan of {network[2]}".encode()

    def save_engine(engine, path):
        Path(path).write_bytes(engine)

    for name, fn in [("network_from_onnx_path", network_from_onnx_path), ("CreateConfig", create_config),
                     ("engine_from_network", engine_from_network), ("save_engine", save_engine)]:
        monkeypatch.setattr(pg, name, fn)
    fake_trt = SimpleNamespace(__version__="10.3.0-fake", NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
                               MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"))
    monkeypatch.setattr(trt, "_import_trt", lambda: fake_trt)
    return log


def _toy_decoder_onnx(path: Path) -> Path:
    """A graph with the decoder's scalar and kept_slots inputs (what the fake network lists)."""
    from onnx import TensorProto, helper, save

    i32 = TensorProto.INT32
    inputs = [helper.make_tensor_value_info("span_start", i32, []),
              helper.make_tensor_value_info("kept_slots", i32, ["batch", "kept"])]
    graph = helper.make_graph([helper.make_node("Identity", ["kept_slots"], ["out"])], "toy", inputs,
                              [helper.make_tensor_value_info("out", i32, ["batch", "kept"])])
    save(helper.make_model(graph), str(path))
    return path


def test_build_refuses_a_network_with_a_shape_tensor_input(fake_build, tmp_path):
    onnx_path = _toy_decoder_onnx(tmp_path / "decoder.onnx")
    specs = trt.profile_specs(hand_manifest(), "decoder")
    cfg = trt.TrtConfig(tmp_path)
    fake_build.shape_tensors = {"span_start"}
    with pytest.raises(trt.TrtBuildError) as e:
        trt.build_stage("decoder", onnx_path, tmp_path / "decoder.engine", specs, cfg, True, None)
    assert str(e.value) == ("decoder: TensorRT parses input span_start as a shape tensor, which this project's graphs "
                            "never have; re-export with this version of export.build (python -m export.check_trt "
                            "names it)")
    assert fake_build.built == [] and not (tmp_path / "decoder.engine").exists()
    fake_build.shape_tensors = set()
    trt.build_stage("decoder", onnx_path, tmp_path / "decoder.engine", specs, cfg, True, None)
    assert (tmp_path / "decoder.engine").read_bytes() == b"plan of decoder"
    (config,) = fake_build.configs
    built = {name: [(r.min, r.opt, r.max) for r in (p[name] for p in config["profiles"])] for name in specs[0]["inputs"]}
    assert built == {name: [_ranges(s)[name] for s in specs] for name in specs[0]["inputs"]}
    assert built["quota"] == [SCALAR, SCALAR]


# --- profiles of a real export (llava-tiny) -------------------------------------------------------

def test_decoder_profiles_follow_the_manifest_axes(tiny_engine):
    _, m = tiny_engine
    ax = {n: (a["min"], a["opt"], a["max"]) for n, a in m["dynamic_axes"].items()}
    dec = m["decoder"]
    H, dh, D, K = dec["num_kv_heads"], dec["head_dim"], dec["hidden_size"], m["dart"]["layer"]
    B, S, kept = ax["batch"], ax["seq"], ax["kept"]
    assert kept == (1, 640 - 576 + 68, S[2])  # opt: a 640-token prompt with its 576 vision tokens pruned to 68
    assert not {"span_start", "span_len", "quota"} & set(ax)  # no value axes any more
    prefill, decode = trt.profile_specs(m, "decoder")
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    p, d = _ranges(prefill), _ranges(decode)
    assert p["inputs_embeds"] == ((B[0], S[0], D), (B[1], S[1], D), (B[2], S[2], D))
    assert p["position_ids"] == ((B[0], S[0]), (B[1], S[1]), (B[2], S[2]))
    assert p["kept_slots"] == ((B[0], kept[0]), (B[1], kept[1]), (B[2], kept[2]))
    assert d["kept_slots"] == ((B[0], 1), (B[1], 1), (B[2], 1))
    for i in range(dec["num_layers"]):
        for kind in ("key", "value"):
            assert p[f"past_{kind}_{i}"] == ((B[0], H, 0, dh), (B[1], H, 0, dh), (B[2], H, 0, dh))
            axis = ax["past_full"] if i < K else ax["past_kept"]
            assert d[f"past_{kind}_{i}"] == ((B[0], H, 1, dh), (B[1], H, axis[1], dh), (B[2], H, axis[2], dh))
    assert d["inputs_embeds"] == ((B[0], 1, D), (B[1], 1, D), (B[2], 1, D))
    inputs = {t["name"]: t for t in m["stages"]["decoder"]["inputs"]}
    for name in ("span_start", "span_len", "quota"):  # int32 data scalars: the 0-d shape in both profiles
        assert inputs[name] == {"name": name, "dtype": "int32", "shape": []}
        assert p[name] == d[name] == SCALAR
    assert inputs["kept_slots"] == {"name": "kept_slots", "dtype": "int32", "shape": ["batch", "kept"]}
    assert set(p) == set(d) == set(inputs)


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
    assert _ranges(prefill)["kept_slots"][2] == (1, 700)
    assert _ranges(decode)["past_key_0"][2] == (1, 2, 1024, 16)
    with pytest.raises(trt.TrtBuildError, match="--max-seq 99999 exceeds"):
        trt.profile_specs(m, "decoder", trt.TrtConfig(Path("."), max_seq=99999))


# --- CLI -----------------------------------------------------------------------------------------

def _cli(*args, module="export.trt"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)


def test_cli_dry_run_prints_profiles(tiny_engine):
    r = _cli("--engine-dir", str(tiny_engine[0]), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "decoder profile 0 (prefill):" in r.stdout and "decoder profile 1 (decode):" in r.stdout
    assert "  span_len         shape () (0-d)\n" in r.stdout
    assert "  kept_slots       min [1, 1]  opt [1, 132]  max [4, 2048]\n" in r.stdout


def test_cli_bad_input(tmp_path):
    r = _cli("--engine-dir", str(tmp_path / "missing"))
    assert r.returncode == 2 and "has no manifest.json" in r.stderr
    r = _cli("--engine-dir", str(tmp_path), "--max-vision-tokens", "576")  # bounded the old value ranges only
    assert r.returncode == 2 and "unrecognized arguments: --max-vision-tokens 576" in r.stderr


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


def test_build_engines_with_fake_tensorrt(fake_build, tiny_engine, tmp_path):
    """The whole build of an export, TensorRT faked: three plans, the "tensorrt" section (the
    runtime verifies it), the profiles given to the builder; then the same export with a decoder
    input TensorRT would parse as a shape tensor: refused, and the directory is left as it was."""
    from runtime.manifest import read_manifest

    d = tmp_path / "e"
    shutil.copytree(tiny_engine[0], d)
    section = trt.build_engines(trt.TrtConfig(d, workspace_mib=512))
    assert fake_build.built == list(trt.STAGES)
    assert section["engines"] == {s: f"{s}.engine" for s in trt.STAGES} and section["version"] == "10.3.0-fake"
    for stage in trt.STAGES:
        assert (d / f"{stage}.engine").read_bytes() == f"plan of {stage}".encode()
    m = read_manifest(d)  # sha256 of every file, the engines included
    assert m.tensorrt.profiles == {s: trt.profile_specs(tiny_engine[1], s) for s in trt.STAGES}
    assert [c["memory_pool_limits"] for c in fake_build.configs] == [{"workspace": 512 << 20}] * 3
    assert [len(c["profiles"]) for c in fake_build.configs] == [1, 1, 2]
    assert not list(d.glob(".*partial*"))

    d2 = tmp_path / "e2"
    shutil.copytree(tiny_engine[0], d2)
    before = sorted(p.name for p in d2.iterdir()), (d2 / "manifest.json").read_text()
    fake_build.shape_tensors = {"span_len"}
    with pytest.raises(trt.TrtBuildError, match="^decoder: TensorRT parses input span_len as a shape tensor"):
        trt.build_engines(trt.TrtConfig(d2))
    assert (sorted(p.name for p in d2.iterdir()), (d2 / "manifest.json").read_text()) == before


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
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       check=False)
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
    kv = lambda n: np.zeros((1, dec["num_kv_heads"], n, dec["head_dim"]), np.float32)
    past_names = [t["name"] for t in m["stages"]["decoder"]["inputs"] if t["name"].startswith("past_")]
    i32 = lambda v: np.array(v, np.int32)  # every integer input is int32 (manifest format 3)
    K, kept = m["dart"]["layer"], S - L + 68  # quota 8: 4 image pivots + 8 pivots x 8 kept
    prefill = {"inputs_embeds": rng.standard_normal((1, S, dec["hidden_size"]), dtype=np.float32),
               "position_ids": np.arange(S, dtype=np.int32)[None], "span_start": i32(a), "span_len": i32(L),
               "quota": i32(8), "kept_slots": np.zeros((1, kept), np.int32), **{n: kv(0) for n in past_names}}
    # a decode step after that prefill: low layers hold S entries, high layers S' = S - L + 68
    step = {"inputs_embeds": rng.standard_normal((1, 1, dec["hidden_size"]), dtype=np.float32),
            "position_ids": i32([[S]]), "span_start": i32(0), "span_len": i32(0), "quota": i32(0),
            "kept_slots": np.zeros((1, 1), np.int32),
            **{n: kv(S if int(n.rsplit("_", 1)[1]) < K else kept) for n in past_names}}
    size = m["preprocess"]["image_size"]
    cases = [
        ("vision_encoder", 0, [{"pixel_values": rng.standard_normal((1, 3, size, size), dtype=np.float32)}]),
        ("embed_tokens", 0, [{"input_ids": rng.integers(0, 1000, (1, 17), dtype=np.int32)}]),
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

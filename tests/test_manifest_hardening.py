"""The manifest reader refuses out-of-range values, checks the manifest against the opened graphs,
and never opens a file outside the engine directory (verify=True or False); runtime/onnx_refs.py
lists the external-data files of ONNX models made by onnx itself.

Range and reading tests need only manifest.json (parsing fails before any file is looked at); the
containment and graph tests use copies of the llava-tiny engine (`tiny_engine`, exported once)."""

from __future__ import annotations

import copy
import json
import os
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import runtime
from runtime import EngineError
from runtime.engine_checks import check_graphs
from runtime.manifest import STAGE_NAMES, read_manifest, sha256_file
from runtime.onnx_refs import MAX_DEPTH, external_data_locations
from runtime.stage import OrtStage

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.png"
BIG = ("decoder.onnx", "decoder.onnx.data", "vision_encoder.onnx", "embed_tokens.onnx", "tokenizer.json")


def copy_engine(src: Path, dst: Path) -> Path:
    """A copy of an engine directory: manifest.json copied, the graphs and tokenizer hard-linked
    (tests never write into them; they replace them instead)."""
    dst.mkdir(parents=True)
    for name in BIG:
        os.link(src / name, dst / name)
    (dst / "manifest.json").write_bytes((src / "manifest.json").read_bytes())
    return dst


def write(d: Path, manifest: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def edit(manifest: dict, path: tuple, value) -> dict:
    """A deep copy of `manifest` with manifest[path[0]][path[1]]... = value."""
    m = copy.deepcopy(manifest)
    node = m
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return m


def one_line_error(exc_info, *fragments: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


# --- ranges ----------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
# (key path, bad value, expected text); the tiny engine has 4 layers, vocab 1024, max_span 584.
RANGES = [
    (("dart", "layer"), -5, "'dart.layer' must be in [1, 3], got -5"),
    (("dart", "layer"), 0, "'dart.layer' must be in [1, 3], got 0"),
    (("dart", "layer"), 4, "'dart.layer' must be in [1, 3], got 4"),
    (("dart", "layer"), "2", "'dart.layer' must be int, got str"),
    (("dart", "layer"), True, "'dart.layer' must be int, got True"),
    (("dart", "layer"), 2.0, "'dart.layer' must be int, got float"),
    (("dart", "pivots_image"), 17, "'dart.pivots_image' must be in [0, 16], got 17"),
    (("dart", "pivots_text"), -1, "'dart.pivots_text' must be in [0, 16], got -1"),
    (("dart", "pivots_image"), 13, "'dart.pivots_image' + 'dart.pivots_text' must be in [1, 16], got 13 + 4"),
    (("dart", "keep_ratio"), 0, "'dart.keep_ratio' must be a finite number in (0, 1], got 0"),
    (("dart", "keep_ratio"), 1.5, "'dart.keep_ratio' must be a finite number in (0, 1], got 1.5"),
    (("dart", "keep_ratio"), NAN, "'dart.keep_ratio' must be a finite number in (0, 1], got nan"),
    (("dart", "keep_ratio"), INF, "'dart.keep_ratio' must be a finite number in (0, 1], got inf"),
    (("dart", "keep_ratio"), 10 ** 400, "'dart.keep_ratio' must be a finite number in (0, 1], got 1000000"),
    (("dart", "max_span"), 0, "'dart.max_span' must be in [1, 3840], got 0"),
    (("dart", "max_span"), 3841, "'dart.max_span' must be in [1, 3840], got 3841"),
    (("decoder", "num_layers"), 1, "'decoder.num_layers' must be in [2, 1024], got 1"),
    (("decoder", "num_layers"), 10 ** 30, "'decoder.num_layers' must be in [2, 1024], got 10000000000"),
    (("decoder", "num_kv_heads"), 0, "'decoder.num_kv_heads' must be in [1, 1024], got 0"),
    (("decoder", "head_dim"), 4097, "'decoder.head_dim' must be in [1, 4096], got 4097"),
    (("decoder", "hidden_size"), -64, "'decoder.hidden_size' must be in [1, 65536], got -64"),
    (("decoder", "vocab_size"), 2 ** 24 + 1, "'decoder.vocab_size' must be in [2, 16777216], got 16777217"),
    (("dynamic_axes", "seq", "min"), -1, "'dynamic_axes.seq.min' must be in [0, 1048576], got -1"),
    (("dynamic_axes", "seq", "max"), 2 ** 20 + 1,
     "'dynamic_axes.seq.max' must be in [0, 1048576], got 1048577"),
    (("dynamic_axes", "seq", "opt"), 4096,
     "'dynamic_axes.seq' must have min <= opt <= max, got 1, 4096, 2048"),
    (("max_context",), 0, "'max_context' must be in [1, 1048576], got 0"),
    (("max_context",), 2 ** 20 + 1, "'max_context' must be in [1, 1048576], got 1048577"),
    (("tokens", "image_token_id"), 1024, "'tokens.image_token_id' must be in [0, 1023], got 1024"),
    (("tokens", "image_token_id"), -1, "'tokens.image_token_id' must be in [0, 1023], got -1"),
    (("tokens", "bos_token_id"), 5000, "'tokens.bos_token_id' must be in [0, 1023], got 5000"),
    (("tokens", "pad_token_id"), -3, "'tokens.pad_token_id' must be in [0, 1023], got -3"),
    (("tokens", "eos_token_id"), 1024, "'tokens.eos_token_id' must be in [0, 1023], got 1024"),
    (("tokens", "eos_token_id"), [2, 5000], "'tokens.eos_token_id[1]' must be in [0, 1023], got 5000"),
    (("tokens", "eos_token_id"), list(range(65)),
     "'tokens.eos_token_id' must be an int, a list of at most 64"),
    (("tokens", "image_seq_len"), 0, "'tokens.image_seq_len' must be in [1, 3840], got 0"),
    (("tokens", "image_seq_len"), 585,
     "'tokens.image_seq_len' must be in [1, 584] ('dart.max_span'), got 585"),
    (("preprocess", "image_size"), 100000, "'preprocess.image_size' must be in [1, 4096], got 100000"),
    (("preprocess", "image_size"), 0, "'preprocess.image_size' must be in [1, 4096], got 0"),
    (("preprocess", "shortest_edge"), 5000, "'preprocess.shortest_edge' must be in [1, 4096], got 5000"),
    (("preprocess", "rescale"), 0, "'preprocess.rescale' must be a finite number in (0, 1], got 0"),
    (("preprocess", "rescale"), NAN, "'preprocess.rescale' must be a finite number in (0, 1], got nan"),
    (("preprocess", "mean"), [0.5, NAN, 0.5],
     "'preprocess.mean[1]' must be a finite number in [0, 1], got nan"),
    (("preprocess", "mean"), [0.5, 0.5], "'preprocess.mean' must be 3 numbers (R, G, B), got [0.5, 0.5]"),
    (("preprocess", "std"), [0.0, 1, 1], "'preprocess.std[0]' must be a finite number in [1e-06, 1000000.0]"),
    (("preprocess", "std"), [1, 1, -INF],
     "'preprocess.std[2]' must be a finite number in [1e-06, 1000000.0], got -inf"),
    (("preprocess", "resample"), "cubic", "'preprocess.resample' must be one of bicubic, bilinear, got 'cubic'"),
    (("preprocess", "resample"), "lanczos", "'preprocess.resample' must be one of bicubic, bilinear, got"),
    (("preprocess", "shortest_edge"), 300, "'preprocess.shortest_edge' 300 is smaller than 'preprocess.image_size' 336"),
    (("preprocess", "center_crop"), False, "'preprocess.center_crop' is false, but without pad_to_square"),
    (("opset",), 3, "'opset' must be in [7, 64], got 3"),
    (("opset",), 1000, "'opset' must be in [7, 64], got 1000"),
    (("dtype",), "float8", "'dtype' must be one of float32, float16"),
    (("stages", "vision_encoder", "inputs", 0, "dtype"), "complex64",
     "'stages.vision_encoder.inputs[0].dtype' must be one of float32"),
    (("stages", "decoder", "inputs", 0, "shape"), ["batch", "seq", -64],
     "'stages.decoder.inputs[0].shape[2]' must be in [0, 16777216], got -64"),
    (("stages", "decoder", "inputs", 0, "shape"), [1] * 9,
     "'stages.decoder.inputs[0].shape' has 9 dims, more than 8"),
    (("files", "decoder.onnx", "sha256"), "xyz",
     "'files.decoder.onnx.sha256' must be 64 hex digits, got 'xyz'"),
    (("files", "decoder.onnx", "bytes"), -1,
     "'files.decoder.onnx.bytes' must be in [0, 1125899906842624], got -1"),
    (("prompt", "template"), "USER: <image> {question} ASSISTANT:",
     "prompt.template has field(s) '{question}'; it must hold exactly one {prompt} field"),
    (("prompt", "template"), "USER: <image> {prompt!r}", "prompt.template has field(s) '{prompt!r}'"),
    (("prompt", "template_text_only"), "USER: {prompt} {",
     "prompt.template_text_only is not a valid template"),
    (("prompt", "template_text_only"), "USER: no field", "prompt.template_text_only has 0 {prompt} fields"),
    (("prompt", "template_text_only"), "{prompt} and {prompt}", "prompt.template_text_only has 2 {prompt} fields"),
    (("stages", "decoder", "file"), "../other/decoder.onnx",
     ("'stages.decoder.file' must be a relative path inside the engine directory (no '..', not absolute), "
     "got '../other/decoder.onnx'")),
    (("stages", "decoder", "file"), "/etc/decoder.onnx", "'stages.decoder.file' must be a relative path"),
    (("stages", "decoder", "file"), "sub/./decoder.onnx", "'stages.decoder.file' must be a relative path"),
    (("stages", "decoder", "file"), "decoder\x00.onnx", "'stages.decoder.file' must be a relative path"),
    (("stages", "extra"), {"file": "x.onnx", "inputs": [], "outputs": []},
     "'stages.extra' is not a stage this runtime runs"),
    (("tools", "onnx"), 1.23, "'tools.onnx' must be a version string, got float"),
]


@pytest.mark.parametrize("path, value, expected", RANGES, ids=[f"{'.'.join(map(str, p))}={v!r}"[:60]
                                                               for p, v, _ in RANGES])
def test_out_of_range_value_is_refused_naming_the_key(tiny_engine, tmp_path, path, value, expected):
    d = write(tmp_path / "e", edit(tiny_engine[1], path, value))
    for verify in (True, False):
        with pytest.raises(EngineError) as e:
            read_manifest(d, verify=verify)
        msg = one_line_error(e, expected, "re-export")
        assert msg.startswith("manifest.json: "), msg


def test_the_real_manifest_is_in_range(tiny_engine):
    m = read_manifest(tiny_engine[0])
    got = (m.dart.layer, m.decoder.num_layers, m.preprocess.image_size, m.tokens.image_seq_len)
    assert got == (2, 4, 336, 576)


def test_pivots_need_at_least_one(tiny_engine, tmp_path):
    m = edit(edit(tiny_engine[1], ("dart", "pivots_image"), 0), ("dart", "pivots_text"), 0)
    with pytest.raises(EngineError) as e:
        read_manifest(write(tmp_path / "e", m))
    one_line_error(e, "'dart.pivots_image' + 'dart.pivots_text' must be in [1, 16], got 0 + 0")


def test_files_key_outside_is_refused(tiny_engine, tmp_path):
    m = copy.deepcopy(tiny_engine[1])
    m["files"]["../secret"] = m["files"]["tokenizer.json"]
    with pytest.raises(EngineError) as e:
        read_manifest(write(tmp_path / "e", m), verify=False)
    one_line_error(e, "a 'files' key must be a relative path inside the engine directory", "'../secret'")


def test_control_characters_in_keys_stay_on_one_line(tiny_engine, tmp_path):
    m = copy.deepcopy(tiny_engine[1])
    m["dynamic_axes"]["bad\naxis"] = {"min": 3, "opt": 2, "max": 1}
    with pytest.raises(EngineError) as e:
        read_manifest(write(tmp_path / "e", m))
    one_line_error(e, "'dynamic_axes.bad\\naxis' must have min <= opt <= max")


# --- reading bounds --------------------------------------------------------------------------------


def _raw(tmp_path: Path, text: str | bytes) -> Path:
    d = tmp_path / "e"
    d.mkdir()
    (d / "manifest.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return d


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deep_nesting_is_refused(tmp_path, depth):
    text = '{"format": "dart-vlm-engine", "format_version": 2, "tools": ' + "[" * depth + "]" * depth + "}"
    with pytest.raises(EngineError) as e:
        read_manifest(_raw(tmp_path, text), verify=False)
    one_line_error(e, "manifest.json: objects and arrays are nested more than 32 deep")


def test_huge_manifest_is_refused_before_reading(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    with open(d / "manifest.json", "wb") as f:
        f.truncate((16 << 20) + 1)  # sparse: nothing is written, and nothing must be read
    tracemalloc.start()
    with pytest.raises(EngineError) as e:
        read_manifest(d, verify=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    one_line_error(e, "manifest.json is larger than 16 MiB")
    assert peak < 1 << 20


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1, "a": 2}', "manifest.json: key 'a' appears twice in one object"),
    ('{"format": "dart-vlm-engine", "format_version": 2, "x": ' + "9" * 5000 + "}",
     ("is not valid JSON (Exceeds the limit (4300 digits) for integer string conversion: value has 5000 "
     "digits)")),
    (b'{"format": "\xff"}', "is not valid JSON ("),
    ("[1, 2]", "manifest.json: the top level must be a JSON object"),
    ('{"format": "dart-vlm-engine", "format_version": true}', "has format 'dart-vlm-engine' version True"),
    ('{"format": "dart-vlm-engine", "format_version": 1.0}', "has format 'dart-vlm-engine' version 1.0"),
    ('{"format": "' + "x" * 1000 + '", "format_version": 1}', "has format 'xxxxxxxxxxxx"),
])
def test_bad_json_is_one_line(tmp_path, text, expected):
    with pytest.raises(EngineError) as e:
        read_manifest(_raw(tmp_path, text), verify=False)
    msg = one_line_error(e, expected)
    assert len(msg) < 400


def test_infinity_literals_are_refused(tiny_engine, tmp_path):
    text = json.dumps(tiny_engine[1]).replace('"keep_ratio": 0.111', '"keep_ratio": 1e999')
    assert "1e999" in text
    with pytest.raises(EngineError) as e:
        read_manifest(_raw(tmp_path, text), verify=False)
    one_line_error(e, "'dart.keep_ratio' must be a finite number in (0, 1], got inf")


# --- containment -----------------------------------------------------------------------------------


@pytest.fixture
def outside(tiny_engine, tmp_path) -> Path:
    """A directory next to the engine copy holding valid copies of the engine's files."""
    return copy_engine(tiny_engine[0], tmp_path / "other")


@pytest.fixture
def eng(tiny_engine, tmp_path) -> Path:
    return copy_engine(tiny_engine[0], tmp_path / "engine")


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _rewrite(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m))


def _relist(d: Path, m: dict, *names: str) -> dict:
    """Record the current size and sha256 of `names` in m["files"]."""
    for name in names:
        m["files"][name] = {"sha256": sha256_file(d / name), "bytes": (d / name).stat().st_size}
    return m


@pytest.mark.parametrize("verify", [True, False])
def test_stage_path_outside_is_refused(eng, outside, verify):
    for path in ("../other/decoder.onnx", str(outside / "decoder.onnx")):
        m = _manifest(eng)
        m["stages"]["decoder"]["file"] = path
        _rewrite(eng, m)
        with pytest.raises(EngineError) as e:
            runtime.load(eng, verify=verify)
        one_line_error(e, "'stages.decoder.file' must be a relative path inside the engine directory", path)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("name", ["decoder.onnx", "decoder.onnx.data", "tokenizer.json", "manifest.json"])
def test_symlink_pointing_outside_is_refused(eng, outside, verify, name):
    (eng / name).unlink()
    (eng / name).symlink_to(outside / name)  # same bytes, so the sha256 would pass
    with pytest.raises(EngineError) as e:
        runtime.load(eng, verify=verify)
    one_line_error(e, f"'{name}' resolves outside the engine directory")


def test_symlink_inside_the_directory_is_fine(eng):
    (eng / "weights").mkdir()
    (eng / "decoder.onnx.data").rename(eng / "weights" / "decoder.onnx.data")
    (eng / "decoder.onnx.data").symlink_to(Path("weights") / "decoder.onnx.data")
    out = runtime.load(eng).generate("What is this?", image=SAMPLE, max_new_tokens=2)
    assert len(out.token_ids) == 2


@pytest.mark.parametrize("verify", [True, False])
def test_unlisted_external_data_is_refused(eng, verify):
    m = _manifest(eng)
    del m["files"]["decoder.onnx.data"]
    _rewrite(eng, m)
    with pytest.raises(EngineError) as e:
        runtime.load(eng, verify=verify)
    one_line_error(e, "decoder.onnx references external data 'decoder.onnx.data' that manifest.json 'files' "
                      "does not list (it would be loaded unchecked)")


def _relocate_external(eng: Path, location: str) -> None:
    """decoder.onnx rewritten so that its initializers point at `location`, and re-listed."""
    model = onnx.load(str(eng / "decoder.onnx"), load_external_data=False)
    n = 0
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value, n = location, n + 1
    assert n > 0
    (eng / "decoder.onnx").unlink()  # hard link: replace, never write through
    onnx.save(model, str(eng / "decoder.onnx"))
    _rewrite(eng, _relist(eng, _manifest(eng), "decoder.onnx"))


@pytest.mark.parametrize("verify", [True, False])
def test_external_data_location_outside_is_refused(eng, outside, verify):
    for location in ("../other/decoder.onnx.data", str(outside / "decoder.onnx.data"),
                     "x/../../other/decoder.onnx.data"):
        _relocate_external(eng, location)
        with pytest.raises(EngineError) as e:
            runtime.load(eng, verify=verify)
        one_line_error(e, f"decoder.onnx references external data {location!r} outside the engine directory")


def test_external_data_through_a_symlink_outside_is_refused(eng, outside):
    (eng / "weights.bin").symlink_to(outside / "decoder.onnx.data")
    _relocate_external(eng, "weights.bin")
    m = _manifest(eng)
    m["files"]["weights.bin"] = m["files"].pop("decoder.onnx.data")
    _rewrite(eng, m)
    with pytest.raises(EngineError) as e:
        read_manifest(eng, verify=False)
    one_line_error(e, "'weights.bin' resolves outside the engine directory")


def test_verify_false_skips_only_the_hash(eng):
    data = bytearray((eng / "tokenizer.json").read_bytes())
    (eng / "tokenizer.json").unlink()
    (eng / "tokenizer.json").write_bytes(bytes(data).replace(b'"', b"'", 1))  # same size, other bytes
    with pytest.raises(EngineError, match=r"tokenizer.json was modified after export \(sha256 mismatch\)"):
        read_manifest(eng)
    read_manifest(eng, verify=False)
    (eng / "tokenizer.json").write_bytes(bytes(data) + b" ")
    with pytest.raises(EngineError, match=r"tokenizer.json was modified after export \(size"):
        read_manifest(eng, verify=False)  # sizes are still checked


# --- check_graphs against the real graphs ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_stages(tiny_engine):
    d = tiny_engine[0]
    return {name: OrtStage(d / f"{name}.onnx", name=name) for name in STAGE_NAMES}


def test_real_graphs_expose_shapes_and_metadata(tiny_stages, tiny_engine):
    check_graphs(read_manifest(tiny_engine[0]), tiny_stages)
    dec = tiny_stages["decoder"]
    assert tiny_stages["vision_encoder"].input_shapes["pixel_values"] == ["images", 3, 336, 336]
    assert dec.input_shapes["past_key_1"] == ["batch", 2, "past_full", 16]
    assert dec.input_shapes["past_key_2"] == ["batch", 2, "past_kept", 16]
    assert dec.output_shapes["logits"] == ["batch", 1024]
    assert dec.metadata == {"dart.layer": "2", "dart.pivots_image": "4", "dart.pivots_text": "4",
                            "dart.max_pivots": "8", "dart.max_span": "584"}


GRAPH_MISMATCHES = [
    (("preprocess", "image_size"), 224,
     "vision_encoder.onnx: 'pixel_values' has dim 2 = 336, but manifest.json 'preprocess.image_size' is 224"),
    (("dart", "layer"), 3,
     ("decoder.onnx: the graph prunes at layer K = 2 (its first 2 layers keep the full KV), but "
      "manifest.json 'dart.layer' is 3")),
    (("dart", "layer"), 1, "the graph prunes at layer K = 2"),
    (("decoder", "vocab_size"), 2048,
     "decoder.onnx: 'logits' has dim 1 = 1024, but manifest.json 'decoder.vocab_size' is 2048"),
    (("tokens", "image_seq_len"), 500,
     ("vision_encoder.onnx: 'image_features' has dim 1 = 576, but manifest.json "
      "'tokens.image_seq_len' is 500")),
    (("decoder", "hidden_size"), 128,
     "'image_features' has dim 2 = 64, but manifest.json 'decoder.hidden_size' is 128"),
    (("decoder", "num_kv_heads"), 4,
     "'past_key_0' has dim 1 = 2, but manifest.json 'decoder.num_kv_heads' is 4"),
    (("decoder", "head_dim"), 8, "'past_key_0' has dim 3 = 16, but manifest.json 'decoder.head_dim' is 8"),
    (("decoder", "num_layers"), 5,
     "decoder.onnx: the graph has 8 past_* KV inputs, but manifest.json 'decoder.num_layers' is 5"),
    (("dart", "max_span"), 600,
     "decoder.onnx: the graph's metadata has dart.max_span = 584, but manifest.json 'dart.max_span' is 600"),
    (("dart", "pivots_text"), 3,
     "the graph's metadata has dart.pivots_text = 4, but manifest.json 'dart.pivots_text' is 3"),
]


@pytest.mark.parametrize("path, value, expected", GRAPH_MISMATCHES,
                         ids=[f"{'.'.join(p)}={v}" for p, v, _ in GRAPH_MISMATCHES])
def test_check_graphs_refuses_a_manifest_that_does_not_describe_the_graphs(
        tiny_engine, tiny_stages, tmp_path, path, value, expected):
    d = copy_engine(tiny_engine[0], tmp_path / "e")
    _rewrite(d, edit(tiny_engine[1], path, value))
    m = read_manifest(d, verify=False)  # in range: parsing accepts it
    with pytest.raises(EngineError) as e:
        check_graphs(m, tiny_stages)
    one_line_error(e, expected, "re-export")


def test_load_runs_check_graphs(tiny_engine, tmp_path):
    d = copy_engine(tiny_engine[0], tmp_path / "e")
    _rewrite(d, edit(tiny_engine[1], ("preprocess", "image_size"), 224))
    with pytest.raises(EngineError) as e:
        runtime.load(d, verify=False)
    one_line_error(e, "'preprocess.image_size' is 224")


def _fake(**attrs):
    return SimpleNamespace(**attrs)


def test_check_graphs_metadata_and_fakes(tiny_engine):
    m = read_manifest(tiny_engine[0], verify=False)
    check_graphs(m, {name: _fake() for name in STAGE_NAMES})  # nothing exposed: nothing checked
    ok = {"dart.layer": "2", "dart.pivots_image": "4", "dart.pivots_text": "4", "dart.max_span": "584"}
    check_graphs(m, {"decoder": _fake(metadata=ok)})
    check_graphs(m, {"decoder": _fake(metadata={"dart.max_pivots": "16"})})  # a larger body runs fewer pivots
    for meta, expected in [
        ({"dart.max_pivots": "7"},
         ("DartPruneSlots unrolls 7 pivot steps (metadata dart.max_pivots), but manifest.json "
         "'dart.pivots_image' + 'dart.pivots_text' is 8")),
        ({"dart.layer": "two"}, "decoder.onnx: metadata dart.layer = 'two' is not an integer"),
        ({"dart.pivots_image": "3"},
         "metadata has dart.pivots_image = 3, but manifest.json 'dart.pivots_image' is 4"),
    ]:
        with pytest.raises(EngineError) as e:
            check_graphs(m, {"decoder": _fake(metadata=meta)})
        one_line_error(e, expected)
    # TensorRT reports dynamic dims as -1: they match anything
    check_graphs(m, {"vision_encoder": _fake(input_shapes={"pixel_values": [-1, 3, 336, 336]},
                                             output_shapes={"image_features": [-1, 576, -1]})})
    with pytest.raises(EngineError) as e:
        check_graphs(m, {"vision_encoder": _fake(input_shapes={"pixel_values": [-1, 3, 336]})})
    one_line_error(e, "vision_encoder.onnx: 'pixel_values' has 3 dims, expected at least 4")


# --- onnx_refs -------------------------------------------------------------------------------------


def _external(name: str, location: str, shape=(2, 3)) -> TensorProto:
    t = numpy_helper.from_array(np.zeros(shape, np.float32), name)
    set_external_data(t, location=location, offset=0, length=4 * int(np.prod(shape)))
    t.ClearField("raw_data")
    return t


def _value(name):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _nested_if(depth: int, location: str) -> onnx.GraphProto:
    """A graph whose innermost of `depth` nested If branches holds an external initializer."""
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "leaf", [], [_value("y")],
                          [_external("w", location)])
    for i in range(depth):
        other = helper.make_graph([helper.make_node("Identity", ["cond"], ["y"])], "other", [], [_value("y")])
        node = helper.make_node("If", ["cond"], ["y"], then_branch=g, else_branch=other)
        g = helper.make_graph([node], f"level{i}", [], [_value("y")],
                              [numpy_helper.from_array(np.array(True), "cond")])
    return g


def _model(graph, **kw) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], **kw)


def test_field_numbers_match_onnx_proto():
    from runtime import onnx_refs as r

    number = lambda msg, field: msg.DESCRIPTOR.fields_by_name[field].number
    expected = {
        r._MODEL: {number(onnx.ModelProto, f): k for f, k in
                   (("graph", r._GRAPH), ("training_info", r._TRAINING), ("functions", r._FUNCTION))},
        r._TRAINING: {number(onnx.TrainingInfoProto, f): r._GRAPH for f in ("initialization", "algorithm")},
        r._FUNCTION: {number(onnx.FunctionProto, "node"): r._NODE,
                      number(onnx.FunctionProto, "attribute_proto"): r._ATTRIBUTE},
        r._GRAPH: {number(onnx.GraphProto, f): k for f, k in
                   (("node", r._NODE), ("initializer", r._TENSOR), ("sparse_initializer", r._SPARSE))},
        r._NODE: {number(onnx.NodeProto, "attribute"): r._ATTRIBUTE},
        r._ATTRIBUTE: {number(onnx.AttributeProto, f): k for f, k in
                       (("t", r._TENSOR), ("g", r._GRAPH), ("tensors", r._TENSOR), ("graphs", r._GRAPH),
                        ("sparse_tensor", r._SPARSE), ("sparse_tensors", r._SPARSE))},
        r._SPARSE: {number(onnx.SparseTensorProto, f): r._TENSOR for f in ("values", "indices")},
        r._TENSOR: {},
    }
    assert r._CHILDREN == expected
    assert r._TENSOR_EXTERNAL_DATA == number(TensorProto, "external_data")
    assert r._TENSOR_DATA_LOCATION == number(TensorProto, "data_location")
    assert r._EXTERNAL == TensorProto.EXTERNAL
    entry = onnx.StringStringEntryProto
    assert (number(entry, "key"), number(entry, "value")) == (1, 2)


def test_locations_everywhere_a_tensor_can_be(tmp_path):
    """Main graph, sparse initializer, node attributes (t, tensors, sparse_tensor, g, graphs),
    nested subgraphs, function bodies and attribute defaults, training graphs: each found, in
    file order (onnx writes a node's attributes sorted by name: else_branch first), once."""
    sparse = onnx.SparseTensorProto()
    sparse.values.CopyFrom(_external("sv", "sparse_values.bin", (2,)))
    sparse.indices.CopyFrom(numpy_helper.from_array(np.array([0, 3], np.int64), "si"))
    sparse.dims.extend([4])
    then_g = _nested_if(2, "deep_then.bin")
    else_g = helper.make_graph([helper.make_node("Identity", ["e"], ["y"])], "else", [], [_value("y")],
                               [_external("e", "else.bin")])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=_external("c", "const_t.bin")),
        helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Custom", [], ["q"], domain="x", tensors=[_external("a", "list_a.bin"),
                                                                   _external("b", "list_b.bin")]),
        helper.make_node("Custom", [], ["q2"], domain="x", sp=sparse),
        helper.make_node("Custom", [], ["q3"], domain="x", graphs=[_nested_if(1, "graphs_attr.bin")]),
        helper.make_node("Fn", [], ["f"], domain="local"),
    ]
    graph = helper.make_graph(nodes, "main", [], [_value("z")],
                              [_external("w1", "weights.bin"), _external("w2", "weights.bin"),
                               numpy_helper.from_array(np.array(True), "cond")])
    graph.sparse_initializer.append(copy.deepcopy(sparse))
    graph.sparse_initializer[0].values.external_data[0].value = "sparse_init.bin"
    body = [helper.make_node("Constant", [], ["f"], value=_external("fc", "function.bin"))]
    fn = helper.make_function("local", "Fn", [], ["f"], body, [helper.make_opsetid("", 18)])
    default = helper.make_attribute("default_t", _external("fd", "function_default.bin"))
    fn.attribute_proto.append(default)
    model = _model(graph, functions=[fn])
    train = model.training_info.add()
    train.initialization.CopyFrom(helper.make_graph([], "init", [], [], [_external("ti", "training.bin")]))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert external_data_locations(path) == [
        "const_t.bin", "else.bin", "deep_then.bin", "list_a.bin", "list_b.bin", "sparse_values.bin",
        "graphs_attr.bin", "weights.bin", "sparse_init.bin", "training.bin", "function.bin",
        "function_default.bin",
    ]


def test_locations_match_onnx_on_the_real_decoder(tiny_engine):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    path = tiny_engine[0] / "decoder.onnx"
    model = onnx.load(str(path), load_external_data=False)
    theirs = {e.value for t in _get_all_tensors(model) if uses_external_data(t)
              for e in t.external_data if e.key == "location"}
    assert external_data_locations(path) == sorted(theirs) == ["decoder.onnx.data"]
    assert external_data_locations(tiny_engine[0] / "vision_encoder.onnx") == []


def test_nesting_is_bounded(tmp_path):
    ok, deep = tmp_path / "ok.onnx", tmp_path / "deep.onnx"
    onnx.save(_model(_nested_if(15, "inner.bin")), str(ok))  # 1 + 3 * 15 + 1 = 47 levels
    assert external_data_locations(ok) == ["inner.bin"]
    onnx.save(_model(_nested_if(MAX_DEPTH // 3 + 1, "inner.bin")), str(deep))
    with pytest.raises(EngineError) as e:
        external_data_locations(deep)
    one_line_error(e, f"deep.onnx: not a valid ONNX model (messages nested deeper than {MAX_DEPTH} levels)")


def test_large_inline_weights_are_skipped_not_read(tmp_path):
    w = numpy_helper.from_array(np.zeros((8 << 20,), np.float32), "w")  # 32 MiB of raw_data
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [_value("y")],
                              [w, _external("x", "after_the_big_one.bin")])
    path = tmp_path / "big.onnx"
    onnx.save(_model(graph), str(path))
    del w, graph
    tracemalloc.start()
    found = external_data_locations(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert found == ["after_the_big_one.bin"]
    assert peak < 1 << 20, peak


def test_truncated_and_garbage_files_are_engine_errors(tmp_path, tiny_engine):
    data = (tiny_engine[0] / "decoder.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError) as e:
        external_data_locations(path)
    one_line_error(e, "cut.onnx: not a valid ONNX model (", "truncated?", "re-export the engine")
    # every cut of a small model: a valid prefix (cut on a field boundary) or a one-line EngineError
    small = tmp_path / "small.onnx"
    onnx.save(_model(_nested_if(2, "inner.bin")), str(small))
    whole = small.read_bytes()
    outcomes = set()
    for n in range(len(whole)):
        path.write_bytes(whole[:n])
        try:
            outcomes.add(tuple(external_data_locations(path)))
        except EngineError as exc:
            assert "\n" not in str(exc)
            outcomes.add("error")
    assert outcomes == {(), ("inner.bin",), "error"}  # cut before the graph, after it, inside it
    rng = np.random.default_rng(0)
    for _ in range(200):
        path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes())
        try:
            external_data_locations(path)
        except EngineError as exc:
            assert "\n" not in str(exc)
    with pytest.raises(EngineError) as e:
        external_data_locations(tmp_path / "missing.onnx")
    one_line_error(e, "missing.onnx: cannot read it (No such file or directory)")


def test_onnxruntime_prints_no_error_lines(tiny_stages, capfd):
    """A failing run is one EngineError; ONNX Runtime's own red [E:onnxruntime...] line is silenced."""
    dec = tiny_stages["decoder"]
    feeds = {n: np.zeros((2, 2, 0, 16), np.float32) for n in dec.input_names if n.startswith("past_")}  # batch 2
    feeds |= {"inputs_embeds": np.zeros((1, 5, 64), np.float32), "position_ids": np.arange(5, dtype=np.int32)[None],
              "span_start": np.array(0, np.int32), "span_len": np.array(0, np.int32), "quota": np.array(0, np.int32),
              "kept_slots": np.zeros((1, 5), np.int32)}  # batch 1
    with pytest.raises(EngineError) as e:
        dec.run(feeds)
    one_line_error(e, "decoder: onnxruntime failed (")
    out, err = capfd.readouterr()
    assert "onnxruntime" not in out + err

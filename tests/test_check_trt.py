"""export.check_trt: the static TensorRT 10.3 check of exported graphs (no TensorRT needed)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dart_ops.onnx_op import NODE_PREFIX, standalone_model
from export.check_trt import (
    MAX_OPSET,
    MAX_TOPK_K,
    SUPPORTED_OPS,
    Finding,
    _walk,
    check_engine_dir,
    check_model,
    format_report,
    inline,
    main,
)

ROOT = Path(__file__).resolve().parents[1]
F, I64 = TensorProto.FLOAT, TensorProto.INT64
vi = helper.make_tensor_value_info


def _model(nodes, inputs, outputs, inits=(), opset=18, functions=(), domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(graph, functions=list(functions), opset_imports=[
        helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)])
    m.ir_version = 10
    return m


def _k(name, value):
    return numpy_helper.from_array(np.array([value], np.int64), name)


def _rules(findings):
    return {(f.rule, f.severity) for f in findings}


def _tensor(f: Finding) -> str:
    return re.search(r"'([^']+)'", f.message).group(1)


# --- the project's real graphs ---------------------------------------------------------------

# Exactly the warnings an exported llava-tiny may raise: a new one fails here on purpose.
EXPECTED_WARNINGS = {
    ("embed_tokens.onnx", "int64", "input_ids"),
    ("decoder.onnx", "int64", "position_ids"),
    ("decoder.onnx", "int64", "span_start"),
    ("decoder.onnx", "int64", "span_len"),
    ("decoder.onnx", "int64", "quota"),
    ("decoder.onnx", "int64", "kept_positions"),
    ("decoder.onnx", "int64", "image_pivots"),
    # DartPrune's counts feed Slice/ConstantOfShape sizes: shape input tensors in TensorRT.
    ("decoder.onnx", "shape-input", "span_start"),
    ("decoder.onnx", "shape-input", "span_len"),
    ("decoder.onnx", "shape-input", "quota"),
}


def test_tiny_engine_has_no_errors_and_only_known_warnings(tiny_engine):
    engine_dir, manifest = tiny_engine
    result = check_engine_dir(engine_dir)
    assert list(result) == [manifest["stages"][s]["file"] for s in ("vision_encoder", "embed_tokens", "decoder")]
    findings = [f for fs in result.values() for f in fs]
    assert [f for f in findings if f.severity == "error"] == []
    assert {(f.graph, f.rule, _tensor(f)) for f in findings} == EXPECTED_WARNINGS
    assert len(findings) == len(EXPECTED_WARNINGS)  # one finding per tensor
    assert all(f.node == "<graph>" for f in findings)
    assert result.nodes["decoder.onnx"] > result.nodes["vision_encoder.onnx"] > 0


def test_tiny_decoder_dartprune_body_is_trt_shaped(tiny_engine):
    engine_dir, manifest = tiny_engine
    model = onnx.load(str(engine_dir / "decoder.onnx"), load_external_data=False)
    assert any(f.name == "DartPrune" for f in model.functions)
    body = [(n, c) for n, _, c in _walk(inline(model).graph, {}) if n.name.startswith(NODE_PREFIX)]
    assert body, "DartPrune was not inlined"
    assert not {n.op_type for n, _ in body} & {"NonZero", "Loop", "If", "Scan", "Unique"}
    assert {n.op_type for n, _ in body} <= SUPPORTED_OPS
    topks = [(n, c) for n, c in body if n.op_type == "TopK"]
    assert topks
    for node, consts in topks:
        k = consts.get(node.input[1])
        assert node.input[1] in consts and k is not None, f"{node.name}: K is not a constant"
        assert 1 <= int(np.max(k)) <= MAX_TOPK_K
    assert max(int(np.max(c[n.input[1]])) for n, c in topks) == manifest["dart"]["max_span"]


def test_check_engine_dir_never_reads_weights(tiny_engine, tmp_path):
    engine_dir, _ = tiny_engine
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy, ignore=shutil.ignore_patterns("*.data", "checkpoint"))
    assert not list(copy.glob("*.data"))
    assert check_engine_dir(copy) == check_engine_dir(engine_dir)


def test_standalone_dartprune_model_passes():
    findings = check_model(standalone_model(4, 4, 18), "dart_prune.onnx")
    assert not [f for f in findings if f.severity == "error"]
    assert {(f.rule, _tensor(f)) for f in findings} == {
        ("int64", "span_start"), ("int64", "span_len"), ("int64", "quota"), ("int64", "keep"),
        ("shape-input", "span_start"), ("shape-input", "span_len"), ("shape-input", "quota")}


# --- hand-made violations --------------------------------------------------------------------

@pytest.mark.parametrize("op, inputs", [("Unique", ["x"]), ("Compress", ["x", "c"]),
                                        ("STFT", ["x", "c"])])  # STFT: added in TensorRT 10.5
def test_unsupported_op_is_an_error(op, inputs):
    node = helper.make_node(op, inputs, ["y"], name="bad")
    m = _model([node], [vi("x", F, [4]), vi("c", TensorProto.BOOL, [4])], [vi("y", F, None)], opset=17)
    (f,) = check_model(m, "g.onnx")
    assert (f.rule, f.severity, f.node, f.op_type, f.graph) == ("unsupported-op", "error", "bad", op, "g.onnx")
    assert op in f.message and "10.3" in f.message


def _topk(k_input, inits=(), nodes=(), extra_inputs=()):
    topk = helper.make_node("TopK", ["x", k_input], ["v", "i"], name="topk", axis=-1)
    return _model([*nodes, topk], [vi("x", F, ["n", 5000]), *extra_inputs],
                  [vi("v", F, None)], inits)


def test_topk_k_from_graph_input_is_an_error():
    findings = check_model(_topk("k", extra_inputs=[vi("k", I64, [1])]), "g.onnx")
    assert ("topk-k-not-constant", "error") in _rules(findings)
    assert next(f for f in findings if f.rule == "topk-k-not-constant").node == "topk"


def test_topk_k_computed_at_run_time_is_an_error():
    shape = helper.make_node("Shape", ["x"], ["s"], start=1, end=2)
    findings = check_model(_topk("s", nodes=[shape]), "g.onnx")
    assert ("topk-k-not-constant", "error") in _rules(findings)


def test_topk_k_above_3840_is_an_error():
    const = helper.make_node("Constant", [], ["k"], value=_k("k", 4000))
    findings = check_model(_topk("k", nodes=[const]), "g.onnx")
    assert _rules(findings) == {("topk-k-too-large", "error")}
    assert "4000" in findings[0].message and "3840" in findings[0].message


@pytest.mark.parametrize("k", [1, MAX_TOPK_K])
def test_topk_constant_k_within_limit_passes(k):
    assert check_model(_topk("k", inits=[_k("k", k)]), "g.onnx") == []


def test_nonzero_is_a_data_dependent_shape_warning():
    m = _model([helper.make_node("NonZero", ["x"], ["y"], name="nz")], [vi("x", F, [4])], [vi("y", I64, None)])
    assert _rules(check_model(m, "g.onnx")) == {("data-dependent-shape", "warning"), ("int64", "warning")}


def test_if_is_a_control_flow_warning_and_its_branches_are_checked():
    then = helper.make_graph([helper.make_node("Unique", ["x"], ["t"], name="inner")], "then", [],
                             [vi("t", F, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", F, None)])
    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)
    m = _model([node], [vi("c", TensorProto.BOOL, []), vi("x", F, [4])], [vi("y", F, None)])
    findings = check_model(m, "g.onnx")
    assert {(f.node, f.rule, f.severity) for f in findings} == {
        ("if", "control-flow", "warning"), ("inner", "unsupported-op", "error")}


def test_loop_is_a_control_flow_warning():
    body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]),
                              helper.make_node("Add", ["s_in", "s_in"], ["s_out"])], "body",
                             [vi("i", I64, []), vi("c_in", TensorProto.BOOL, []), vi("s_in", F, [1])],
                             [vi("c_out", TensorProto.BOOL, []), vi("s_out", F, [1])])
    node = helper.make_node("Loop", ["n", "", "s"], ["y"], name="loop", body=body)
    m = _model([node], [vi("s", F, [1])], [vi("y", F, None)], inits=[_k("n", 3)])
    assert _rules(check_model(m, "g.onnx")) == {("control-flow", "warning")}


def test_int64_graph_io_warns_once_per_tensor_and_merges_when_many():
    ids = [vi(f"ids{i}", I64, ["b"]) for i in range(3)]
    m = _model([helper.make_node("Identity", ["ids0"], ["out"])], ids, [vi("out", I64, ["b"])],
               inits=[_k("w", 7)])  # int64 initializers are fine in TensorRT 10
    findings = check_model(m, "g.onnx")
    assert sorted(_tensor(f) for f in findings) == ["ids0", "ids1", "ids2", "out"]
    assert _rules(findings) == {("int64", "warning")}
    many = [vi(f"ids{i}", I64, ["b"]) for i in range(12)]
    m = _model([helper.make_node("Identity", ["ids0"], ["out"])], many, [vi("out", F, ["b"])])
    (f,) = check_model(m, "g.onnx")
    assert f.rule == "int64" and "12 int64" in f.message


@pytest.mark.parametrize("opset", [MAX_OPSET + 1, 8])
def test_opset_outside_10_3_range_is_an_error(opset):
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", F, [4])], [vi("y", F, [4])], opset=opset)
    findings = check_model(m, "g.onnx")
    assert _rules(findings) == {("opset", "error")}
    assert findings[0].node == "<graph>" and str(opset) in findings[0].message


def test_opset_20_is_accepted():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", F, [4])], [vi("y", F, [4])], opset=20)
    assert check_model(m, "g.onnx") == []


def test_custom_op_without_function_is_a_plugin_error():
    node = helper.make_node("FancyOp", ["x"], ["y"], name="fancy", domain="acme")
    m = _model([node], [vi("x", F, [4])], [vi("y", F, [4])], domains=["acme"])
    (f,) = check_model(m, "g.onnx")
    assert (f.rule, f.severity, f.op_type, f.node) == ("plugin", "error", "FancyOp", "fancy")
    assert "plugin creator" in f.message


def test_custom_op_with_function_is_inlined_and_its_body_checked():
    body = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="body_topk"),
            helper.make_node("NonZero", ["x"], ["nz"], name="body_nz"),
            helper.make_node("Relu", ["v"], ["y"], name="body_relu")]
    fn = helper.make_function("acme", "Pick", ["x", "k"], ["y"], body, [helper.make_opsetid("", 18)])
    node = helper.make_node("Pick", ["x", "k"], ["y"], name="pick", domain="acme")
    m = _model([node], [vi("x", F, [8]), vi("k", I64, [1])], [vi("y", F, None)], functions=[fn],
               domains=["acme"])
    findings = check_model(m, "g.onnx")
    assert ("plugin", "error") not in _rules(findings)
    assert {("topk-k-not-constant", "error"), ("data-dependent-shape", "warning")} <= _rules(findings)
    assert all(f.op_type != "Pick" for f in findings)


def test_unsqueeze_axes_must_be_constant():
    node = helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsq")
    m = _model([node], [vi("x", F, [4]), vi("axes", I64, [1])], [vi("y", F, None)])
    assert ("input-not-constant", "error") in _rules(check_model(m, "g.onnx"))
    ok = _model([node], [vi("x", F, [4])], [vi("y", F, None)], inits=[_k("axes", 0)])
    assert check_model(ok, "g.onnx") == []


def test_graph_input_used_as_a_shape_is_a_shape_input_warning():
    node = helper.make_node("Reshape", ["x", "shape"], ["y"])
    m = _model([node], [vi("x", F, [4]), vi("shape", I64, [2])], [vi("y", F, None)])
    assert {(f.rule, _tensor(f)) for f in check_model(m, "g.onnx")} == {
        ("int64", "shape"), ("shape-input", "shape")}
    through_shape = _model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
                           [vi("x", F, [4])], [vi("y", F, None)])
    assert check_model(through_shape, "g.onnx") == []


def test_scatter_elements_with_reduction_needs_the_plugin_library():
    node = helper.make_node("ScatterElements", ["x", "idx", "u"], ["y"], reduction="add")
    m = _model([node], [vi("x", F, [4]), vi("u", F, [2])], [vi("y", F, [4])], inits=[_k("idx", 1)])
    assert _rules(check_model(m, "g.onnx")) == {("plugin", "warning")}


def test_format_report_lists_each_finding_on_one_line():
    bad = Finding("a.onnx", "n", "Unique", "error", "unsupported-op", "Unique is not supported")
    text = format_report({"a.onnx": [bad], "b.onnx": []})
    lines = text.splitlines()
    assert lines[0].startswith("a.onnx: FAILED, 1 error")
    assert lines[1].strip() == "error [unsupported-op] n (Unique): Unique is not supported"
    assert lines[2] == "b.onnx: OK"
    assert "1 error(s), 0 warning(s)" in lines[-1]


# --- the CLI ---------------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "export.check_trt", *map(str, args)],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_reports_the_tiny_engine(tiny_engine):
    engine_dir, _ = tiny_engine
    r = _cli(engine_dir)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^decoder\.onnx: OK, 9 warnings \(\d+ nodes after inlining\)$", r.stdout, re.MULTILINE)
    assert re.search(r"^vision_encoder\.onnx: OK \(\d+ nodes after inlining\)$", r.stdout, re.MULTILINE)
    assert "0 error(s), 10 warning(s) in 3 graph(s)" in r.stdout
    assert r.stderr == ""


def test_cli_json(tiny_engine):
    engine_dir, _ = tiny_engine
    r = _cli(engine_dir, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["tensorrt"] == "10.3" and doc["errors"] == 0 and doc["warnings"] == 10
    assert set(doc["graphs"]) == {"vision_encoder.onnx", "embed_tokens.onnx", "decoder.onnx"}
    assert {f["rule"] for f in doc["graphs"]["decoder.onnx"]["findings"]} == {"int64", "shape-input"}


def test_cli_exit_1_on_errors(tmp_path):
    m = _model([helper.make_node("Unique", ["x"], ["y"])], [vi("x", F, [4])], [vi("y", F, None)])
    onnx.save(m, tmp_path / "decoder.onnx")
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"decoder": {"file": "decoder.onnx"}}}))
    r = _cli(tmp_path)
    assert r.returncode == 1
    assert "decoder.onnx: FAILED, 1 error" in r.stdout and "[unsupported-op]" in r.stdout


@pytest.mark.parametrize("setup", ["missing", "no-manifest", "bad-manifest", "no-stages", "missing-graph"])
def test_cli_exit_2_on_bad_directory(tmp_path, setup):
    d = tmp_path / "engine"
    if setup != "missing":
        d.mkdir()
    if setup == "bad-manifest":
        (d / "manifest.json").write_text("{not json")
    if setup == "no-stages":
        (d / "manifest.json").write_text(json.dumps({"stages": {}}))
    if setup == "missing-graph":
        (d / "manifest.json").write_text(json.dumps({"stages": {"decoder": {"file": "decoder.onnx"}}}))
    r = _cli(d)
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_main_verbose_raises(tmp_path):
    with pytest.raises(ValueError):
        main([str(tmp_path / "missing"), "-v"])

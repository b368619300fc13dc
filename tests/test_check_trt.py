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

from dart_ops import onnx_op_slots as slots
from dart_ops.onnx_op import standalone_model
from dart_ops.onnx_op_slots import NODE_PREFIX as SLOTS_PREFIX
from dart_ops.onnx_op_slots import OP_NAME as SLOTS_OP
from dart_ops.onnx_op_slots import check_no_shape_inputs
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
F, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
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

# The two rules issue 15 fixed: no exported graph of any family may break them.
TRT_RULES = {"shape-input", "int64-io"}
# Every other finding an exported graph may raise, per preset, as (graph, rule, node): none today.
# A new one fails here on purpose.
EXPECTED_OTHER = {"llava-tiny": set(), "qwen2-vl-tiny": set(), "qwen2.5-vl-tiny": set(), "llava-next-tiny": set()}
STAGES = ("vision_encoder", "embed_tokens", "decoder")
# The decoder's integer inputs (engine format 3): int32 scalars used as data and the S' carrier.
DECODER_INT32 = {"position_ids", "span_start", "span_len", "quota", "kept_slots"}


def _assert_clean(engine_dir, manifest, preset):
    """No errors, no shape-input / int64-io finding, only the expected other findings; the decoder
    really has the integer inputs the rules look at (so a clean result is not an empty check)."""
    result = check_engine_dir(engine_dir)
    assert list(result) == [manifest["stages"][s]["file"] for s in STAGES]
    findings = [f for fs in result.values() for f in fs]
    assert [f.line() for f in findings if f.severity == "error" or f.rule in TRT_RULES] == []
    assert {(f.graph, f.rule, f.node) for f in findings} == EXPECTED_OTHER[preset]
    graphs = {name: onnx.load(str(engine_dir / name), load_external_data=False) for name in result}
    for name, model in graphs.items():  # vision stages included: every integer I/O is int32 or bool
        io = [*model.graph.input, *model.graph.output]
        assert {v.type.tensor_type.elem_type for v in io} <= {F, TensorProto.FLOAT16, I32, TensorProto.BOOL}, name
        assert check_no_shape_inputs(model) == [], name
    decoder = graphs[manifest["stages"]["decoder"]["file"]]
    assert DECODER_INT32 <= {v.name for v in decoder.graph.input if v.type.tensor_type.elem_type == I32}
    return result


def test_tiny_engine_has_no_errors_and_no_shape_input_or_int64_io(tiny_engine):
    engine_dir, manifest = tiny_engine
    result = _assert_clean(engine_dir, manifest, "llava-tiny")
    assert result.nodes["decoder.onnx"] > result.nodes["vision_encoder.onnx"] > 0


@pytest.fixture(scope="module", params=["qwen2-vl-tiny", "qwen2.5-vl-tiny", "llava-next-tiny"])
def family_engine(request, export_once):
    """Every other family's tiny preset: (preset, engine dir, manifest); the exports the family test
    files use (conftest's export_once: one export per session for the same arguments)."""
    ratio = "0.111" if request.param.startswith("llava") else "0.333"
    out = export_once(request.param, "--ratio", ratio)
    return request.param, out, json.loads((out / "manifest.json").read_text())


def test_every_family_has_no_errors_and_no_shape_input_or_int64_io(family_engine):
    preset, engine_dir, manifest = family_engine
    _assert_clean(engine_dir, manifest, preset)


def test_tiny_decoder_dart_body_is_trt_shaped(tiny_engine):
    engine_dir, manifest = tiny_engine
    model = onnx.load(str(engine_dir / "decoder.onnx"), load_external_data=False)
    assert any(f.name == SLOTS_OP for f in model.functions)
    body = [(n, c) for n, _, c in _walk(inline(model).graph, {}) if n.name.startswith(SLOTS_PREFIX)]
    assert body, "DartPruneSlots was not inlined"
    assert not {n.op_type for n, _ in body} & {"NonZero", "Loop", "If", "Scan", "Unique", "CumSum"}
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


def test_old_dartprune_standalone_model_breaks_both_rules():
    """dart::DartPrune (engine format 2): its int64 scalars decide Slice/ConstantOfShape sizes."""
    findings = check_model(standalone_model(4, 4, 18), "dart_prune.onnx")
    assert {(f.severity, f.rule, _tensor(f)) for f in findings} == {
        ("error", "int64-io", "span_start"), ("error", "int64-io", "span_len"), ("error", "int64-io", "quota"),
        ("error", "int64-io", "keep"),
        ("error", "shape-input", "span_start"), ("error", "shape-input", "span_len"),
        ("error", "shape-input", "quota")}
    assert len(findings) == 7


def test_dartpruneslots_standalone_model_is_clean():
    assert check_model(slots.standalone_model(4, 4, 18, index_dtype="int32"), "dart_prune_slots.onnx") == []
    # with int64 scalars it still has no shape input: only the dtype rule fires
    findings = check_model(slots.standalone_model(4, 4, 18, index_dtype="int64"), "dart_prune_slots.onnx")
    assert sorted((f.rule, _tensor(f)) for f in findings) == [
        ("int64-io", "keep"), ("int64-io", "kept_slots"), ("int64-io", "quota"), ("int64-io", "span_len"),
        ("int64-io", "span_start")]


# --- hand-made violations --------------------------------------------------------------------

@pytest.mark.parametrize("op, inputs, sized_by", [
    ("Det", ["x"], None), ("Unique", ["x"], "x"), ("Compress", ["x", "c"], "c"),
    ("STFT", ["x", "c"], "c")])  # STFT: added in TensorRT 10.5
def test_unsupported_op_is_an_error(op, inputs, sized_by):
    node = helper.make_node(op, inputs, ["y"], name="bad")
    m = _model([node], [vi("x", F, [4]), vi("c", TensorProto.BOOL, [4])], [vi("y", F, None)], opset=17)
    findings = check_model(m, "g.onnx")
    (f,) = [f for f in findings if f.rule == "unsupported-op"]
    assert (f.rule, f.severity, f.node, f.op_type, f.graph) == ("unsupported-op", "error", "bad", op, "g.onnx")
    assert op in f.message and "10.3" in f.message
    # the input that sizes Unique's / Compress' / STFT's output is a shape-input error too
    assert [_tensor(f) for f in findings if f.rule == "shape-input"] == ([sized_by] if sized_by else [])
    assert len(findings) == 1 + bool(sized_by)


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
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([0, 1, 1], np.float32))),
             helper.make_node("NonZero", ["c"], ["nz"], name="nz"), helper.make_node("Cast", ["nz"], ["y"], to=I32)]
    m = _model(nodes, [], [vi("y", I32, None)])
    assert _rules(check_model(m, "g.onnx")) == {("data-dependent-shape", "warning")}


def test_nonzero_over_a_graph_input_is_also_a_shape_input_error():
    m = _model([helper.make_node("NonZero", ["x"], ["nz"], name="nz"), helper.make_node("Cast", ["nz"], ["y"], to=I32)],
               [vi("x", F, [4])], [vi("y", I32, None)])
    findings = check_model(m, "g.onnx")
    assert _rules(findings) == {("data-dependent-shape", "warning"), ("shape-input", "error")}
    (f,) = [f for f in findings if f.rule == "shape-input"]
    assert f.message.startswith("input 'x' reaches NonZero 'nz' input 0 (X): an output shape decided by its values")


def test_if_is_a_control_flow_warning_and_its_branches_are_checked():
    then = helper.make_graph([helper.make_node("Det", ["x"], ["t"], name="inner")], "then", [],
                             [vi("t", F, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e", F, None)])
    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)
    cond = numpy_helper.from_array(np.array(True), "c")
    m = _model([node], [vi("x", F, [2, 2])], [vi("y", F, None)], inits=[cond])
    findings = check_model(m, "g.onnx")
    assert {(f.node, f.rule, f.severity) for f in findings} == {
        ("if", "control-flow", "warning"), ("inner", "unsupported-op", "error")}
    # the condition from a graph input: control flow decided by an input's values
    m = _model([node], [vi("c", TensorProto.BOOL, []), vi("x", F, [2, 2])], [vi("y", F, None)])
    (f,) = [f for f in check_model(m, "g.onnx") if f.rule == "shape-input"]
    assert f.message.startswith("input 'c' reaches If 'if' input 0 (cond): control flow decided by its values")


def test_loop_is_a_control_flow_warning():
    body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]),
                              helper.make_node("Add", ["s_in", "s_in"], ["s_out"])], "body",
                             [vi("i", I64, []), vi("c_in", TensorProto.BOOL, []), vi("s_in", F, [1])],
                             [vi("c_out", TensorProto.BOOL, []), vi("s_out", F, [1])])
    node = helper.make_node("Loop", ["n", "", "s"], ["y"], name="loop", body=body)
    m = _model([node], [vi("s", F, [1])], [vi("y", F, None)], inits=[_k("n", 3)])
    assert _rules(check_model(m, "g.onnx")) == {("control-flow", "warning")}


INT64_WHY = ("integer graph I/O must be int32 or bool for TensorRT 10.3 (INT64 needs int64 bindings; the parser "
             "casts int64 indices to int32; docs/TENSORRT_10.3.md sections 2, 3, 7): re-export with this version")


def _gather(index_dtype, out_dtype=F):
    """table (initializer, float) [ids] -> out: an embedding lookup with `index_dtype` ids."""
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("Cast", ["emb"], ["out"], to=out_dtype)]
    return _model(nodes, [vi("ids", index_dtype, ["b", "s"])], [vi("out", out_dtype, ["b", "s", 4])], [table])


def test_int64_graph_input_is_an_error():
    (f,) = check_model(_gather(I64), "embed_tokens.onnx")
    assert (f.graph, f.node, f.op_type, f.severity, f.rule) == ("embed_tokens.onnx", "<graph>", "", "error", "int64-io")
    assert f.message == f"input 'ids' is int64: {INT64_WHY}"
    assert "\n" not in f.line()


def test_int32_and_bool_graph_io_are_fine():
    assert check_model(_gather(I32), "g.onnx") == []
    assert check_model(_gather(I32, out_dtype=TensorProto.BOOL), "g.onnx") == []


def test_int64_graph_output_is_an_error():
    (f,) = check_model(_gather(I32, out_dtype=I64), "g.onnx")
    assert (f.severity, f.rule, f.message) == ("error", "int64-io", f"output 'out' is int64: {INT64_WHY}")


def test_int64_graph_io_is_one_error_per_tensor_and_merges_when_many():
    ids = [vi(f"ids{i}", I64, ["b"]) for i in range(3)]
    m = _model([helper.make_node("Identity", ["ids0"], ["out"])], ids, [vi("out", I64, ["b"])],
               inits=[_k("w", 7)])  # int64 initializers are constants, not bindings: fine
    findings = check_model(m, "g.onnx")
    assert sorted(_tensor(f) for f in findings) == ["ids0", "ids1", "ids2", "out"]
    assert _rules(findings) == {("int64-io", "error")}
    many = [vi(f"ids{i}", I64, ["b"]) for i in range(12)]
    m = _model([helper.make_node("Identity", ["ids0"], ["out"])], many, [vi("out", F, ["b"])])
    (f,) = check_model(m, "g.onnx")
    assert (f.rule, f.severity) == ("int64-io", "error")
    assert f.message == f"12 int64 graph inputs/outputs (ids0, ids1, ids2, ids3, ...): {INT64_WHY}"


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


SHAPE_WHY = ("TensorRT makes it a shape input tensor, which needs IOptimizationProfile::setShapeValues (int32 only "
             "in the TensorRT 10.3 Python API, docs/TENSORRT_10.3.md section 4); re-export with this version (no input "
             "value reaches a shape)")


def _reaching(op, operands, before=()):
    """n (int32 scalar input) -> Cast int64 -> Add 1 -> Mul 2 -> Unsqueeze = v (1,) -> [`before` nodes] ->
    `op`(x, ...operands) named "use"; x float (b, 64)."""
    consts = {"one": np.array(1, np.int64), "two": np.array(2, np.int64), "axes0": np.array([0], np.int64),
              "minus1": np.array([-1], np.int64), "zero": np.array([0], np.int64), "axis1": np.array([1], np.int64)}
    nodes = [helper.make_node("Cast", ["n"], ["n64"], to=I64), helper.make_node("Add", ["n64", "one"], ["n1"]),
             helper.make_node("Mul", ["n1", "two"], ["n2"]), helper.make_node("Unsqueeze", ["n2", "axes0"], ["v"]),
             *before, helper.make_node(op, ["x", *operands], ["y", "i"][:1 + (op == "TopK")], name="use")]
    return _model(nodes, [vi("x", F, ["b", 64]), vi("n", I32, [])], [vi("y", F, None)],
                  [numpy_helper.from_array(v, k) for k, v in consts.items()])


@pytest.mark.parametrize("op, operands, before, index, operand", [
    ("Reshape", ["shape"], [helper.make_node("Concat", ["minus1", "v"], ["shape"], axis=0)], 1, "shape"),
    ("Slice", ["zero", "v", "axis1"], [], 2, "ends"),
    ("TopK", ["v"], [], 1, "K"),
])
def test_input_reaching_a_shape_through_arithmetic_is_a_shape_input_error(op, operands, before, index, operand):
    findings = [f for f in check_model(_reaching(op, operands, before), "g.onnx") if f.rule == "shape-input"]
    assert [(f.severity, f.node, f.message) for f in findings] == [
        ("error", "<graph>", f"input 'n' reaches {op} 'use' input {index} ({operand}): {SHAPE_WHY}")]
    assert "\n" not in findings[0].line()


def test_input_used_as_data_only_is_not_a_shape_input():
    """span-like int32 scalars in masks, comparisons, Where and Gather indices: data, not shapes
    (DartPruneSlots' use of span_start / span_len)."""
    win = numpy_helper.from_array(np.arange(8, dtype=np.int32), "win")
    nodes = [helper.make_node("Less", ["win", "n"], ["valid"]),  # (8,) j < n
             helper.make_node("Add", ["win", "a"], ["tok"]),  # (8,) a + j
             helper.make_node("Gather", ["x", "tok"], ["picked"], axis=1),  # (b, 8)
             helper.make_node("Where", ["valid", "picked", "x0"], ["y"])]
    x0 = numpy_helper.from_array(np.zeros(8, np.float32), "x0")
    m = _model(nodes, [vi("x", F, ["b", 64]), vi("n", I32, []), vi("a", I32, [])], [vi("y", F, ["b", 8])],
               [win, x0])
    assert check_no_shape_inputs(m) == []
    assert check_model(m, "g.onnx") == []


def test_a_shape_through_shape_is_not_a_shape_input():
    through_shape = _model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
                           [vi("x", F, [4])], [vi("y", F, None)])
    assert check_model(through_shape, "g.onnx") == []
    # S' from the last dim of an input (kept_slots' role): Shape -> Gather -> Range, values never read
    nodes = [helper.make_node("Shape", ["slots"], ["s"]), helper.make_node("Gather", ["s", "one"], ["kept"]),
             helper.make_node("Range", ["zero", "kept", "one"], ["y"])]
    m = _model(nodes, [vi("slots", I32, ["b", "kept"])], [vi("y", I64, None)],
               [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                numpy_helper.from_array(np.array(1, np.int64), "one")])
    assert _rules(check_model(m, "g.onnx")) == {("int64-io", "error")}  # the output only


def test_graph_input_used_as_a_shape_is_a_shape_input_error():
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="r")
    m = _model([node], [vi("x", F, [4]), vi("shape", I64, [2])], [vi("y", F, None)])
    assert {(f.severity, f.rule, _tensor(f)) for f in check_model(m, "g.onnx")} == {
        ("error", "int64-io", "shape"), ("error", "shape-input", "shape")}


def test_any_input_whose_values_reach_a_shape_is_an_error_not_only_integer_scalars():
    """A float (b, s) input -> ReduceMax -> Cast -> Reshape's shape: a data-dependent shape too (the rule
    is onnx_op_slots.check_no_shape_inputs', which follows values through every op)."""
    nodes = [helper.make_node("ReduceMax", ["h"], ["m"], keepdims=0), helper.make_node("Cast", ["m"], ["mi"], to=I64),
             helper.make_node("Unsqueeze", ["mi", "zero"], ["shp"]), helper.make_node("Reshape", ["x", "shp"], ["y"],
                                                                                    name="r")]
    m = _model(nodes, [vi("x", F, ["b", "s"]), vi("h", F, ["b", "s"])], [vi("y", F, None)],
               [numpy_helper.from_array(np.array([0], np.int64), "zero")])
    (f,) = check_model(m, "g.onnx")
    assert (f.rule, f.severity) == ("shape-input", "error")
    assert f.message == f"input 'h' reaches Reshape 'r' input 1 (shape): {SHAPE_WHY}"


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
    assert re.search(r"^decoder\.onnx: OK \(\d+ nodes after inlining\)$", r.stdout, re.MULTILINE)
    assert re.search(r"^vision_encoder\.onnx: OK \(\d+ nodes after inlining\)$", r.stdout, re.MULTILINE)
    assert "0 error(s), 0 warning(s) in 3 graph(s)" in r.stdout
    assert r.stderr == ""


def test_cli_json(tiny_engine):
    engine_dir, _ = tiny_engine
    r = _cli(engine_dir, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["tensorrt"] == "10.3" and doc["errors"] == 0 and doc["warnings"] == 0
    assert set(doc["graphs"]) == {"vision_encoder.onnx", "embed_tokens.onnx", "decoder.onnx"}
    assert all(g["findings"] == [] and g["nodes"] > 0 for g in doc["graphs"].values())


def test_cli_exit_1_on_errors(tmp_path):
    m = _model([helper.make_node("Det", ["x"], ["y"])], [vi("x", F, [2, 2])], [vi("y", F, None)])
    onnx.save(m, tmp_path / "decoder.onnx")
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"decoder": {"file": "decoder.onnx"}}}))
    r = _cli(tmp_path)
    assert r.returncode == 1
    assert "decoder.onnx: FAILED, 1 error (1 nodes after inlining)" in r.stdout and "[unsupported-op]" in r.stdout


def test_cli_exit_1_on_a_format_2_decoder(tmp_path):
    """An engine directory whose decoder is the old DartPrune interface (int64 scalars that decide
    shapes) fails: 3 shape inputs and 4 int64 tensors, each on one line."""
    onnx.save(standalone_model(4, 4, 18), tmp_path / "decoder.onnx")
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"decoder": {"file": "decoder.onnx"}}}))
    r = _cli(tmp_path)
    assert r.returncode == 1 and r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0].startswith("decoder.onnx: FAILED, 7 errors (")
    shape = [line for line in lines if "[shape-input]" in line]
    assert [line.split("'")[1] for line in shape] == ["span_start", "span_len", "quota"]
    assert all("setShapeValues" in line and "re-export" in line for line in shape)
    assert sum("[int64-io]" in line for line in lines) == 4
    assert lines[-1] == "TensorRT 10.3 static check: 7 error(s), 0 warning(s) in 1 graph(s)"


def test_cli_exit_1_on_a_real_engine_with_int64_ids(tiny_engine, tmp_path):
    """The exported llava-tiny with embed_tokens' input_ids rewritten to int64 (graph only)."""
    engine_dir, _ = tiny_engine
    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy, ignore=shutil.ignore_patterns("*.data", "checkpoint"))
    model = onnx.load(str(copy / "embed_tokens.onnx"), load_external_data=False)
    (ids,) = [v for v in model.graph.input if v.name == "input_ids"]
    assert ids.type.tensor_type.elem_type == I32
    ids.type.tensor_type.elem_type = I64
    onnx.save(model, copy / "embed_tokens.onnx")
    r = _cli("--engine-dir", copy)
    assert r.returncode == 1, r.stdout
    assert f"  error [int64-io] <graph>: input 'input_ids' is int64: {INT64_WHY}" in r.stdout.splitlines()
    assert "1 error(s), 0 warning(s) in 3 graph(s)" in r.stdout


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

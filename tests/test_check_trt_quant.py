"""export.check_trt on quantized graphs: the INT4/INT8 weight-only forms TensorRT 10.3 parses, and a
one-line reason per node for the ones it rejects (hand-built graphs and ONNX Runtime quantizer outputs)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.check_trt import check_model

ROOT = Path(__file__).resolve().parents[1]
F, I4, U4, I8 = TensorProto.FLOAT, TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8
vi = helper.make_tensor_value_info
K, N = 256, 64  # weights (K, N): x (b, K) @ W -> (b, N)

OPSET_21 = ("warning [opset] <graph>: default-domain opset 21 is above the operator matrix's 9..20; INT4/blocked "
            "DequantizeLinear needs it and TensorRT 10.3's parser accepts it (it refuses no newer opset): confirm "
            "with an engine build on the device")
REQUANTIZE = "re-quantize with --target trt (symmetric INT4, block size 128)"
BLOCK_SIZES = f"TensorRT supports INT4 block sizes 64 and 128 only; {REQUANTIZE}"


def _model(nodes, inits, opset=21, x_shape=("b", K), out_shape=("b", N), domains=()):
    graph = helper.make_graph(nodes, "g", [vi("x", F, list(x_shape))], [vi("y", F, list(out_shape))],
                              initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                *(helper.make_opsetid(d, 1) for d in domains)])
    m.ir_version = 10
    return m


def _int4(shape, value=1, dtype=ml_dtypes.int4, name="w_q"):
    return numpy_helper.from_array(np.full(shape, value, dtype), name)


def _dq_matmul(block=128, zero_point=None, qtype=I4, opset=21, scale=0.5, shape=(K, N), axis=0, consumer="MatMul",
               scale_rows=None):
    """x @ DequantizeLinear(w_q, w_scale[, w_zp], axis, block_size) with int4 weights blocked along K."""
    dtype = {I4: ml_dtypes.int4, U4: ml_dtypes.uint4, I8: np.int8}[qtype]
    rows = scale_rows or (shape[0] // block if block else shape[0])
    inits = [_int4(shape, dtype=dtype), numpy_helper.from_array(np.full((rows, shape[1]), scale, np.float32),
                                                                   "w_scale")]
    inputs = ["w_q", "w_scale"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(np.full((rows, shape[1]), zero_point, dtype), "w_zp"))
        inputs.append("w_zp")
    attrs = {"axis": axis, **({"block_size": block} if block else {})}
    dq = helper.make_node("DequantizeLinear", inputs, ["w"], name="dq", **attrs)
    use = helper.make_node(consumer, ["x", "w"] if consumer != "Gather" else ["w", "x"], ["y"], name="use")
    return _model([dq, use], inits, opset=opset)


def _lines(model):
    return [f.line() for f in check_model(model, "g.onnx")]


def _dq(rule, message, severity="error", node="dq", op="DequantizeLinear"):
    """One finding's report line."""
    return f"{severity} [{rule}] {node} ({op}): {message}"


# --- supported: INT4 weight-only blocked DequantizeLinear -> MatMul/Gemm -----------------------------

@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("zero_point", [None, 0])  # no zero point, or an all-zero one
def test_int4_symmetric_blocked_weights_pass(block, zero_point):
    assert _lines(_dq_matmul(block, zero_point)) == [OPSET_21]


def test_int4_blocked_weights_into_gemm_pass():
    assert _lines(_dq_matmul(128, consumer="Gemm")) == [OPSET_21]


def test_int4_fake_quantized_float_weights_pass():
    # Constant float weights -> QuantizeLinear(int4, blocked) -> DequantizeLinear -> MatMul: both are weights.
    inits = [numpy_helper.from_array(np.ones((K, N), np.float32), "w_f"),
             numpy_helper.from_array(np.full((K // 128, N), 0.5, np.float32), "w_scale"), _int4((K // 128, N), 0, name="z")]
    nodes = [helper.make_node("QuantizeLinear", ["w_f", "w_scale", "z"], ["w_q"], name="q", axis=0, block_size=128),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "z"], ["w"], name="dq", axis=0, block_size=128),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    assert _lines(_model(nodes, inits)) == [OPSET_21]


def test_com_microsoft_dequantize_is_checked_as_the_standard_op():
    # The parser picks importers by op_type: com.microsoft.DequantizeLinear is the standard DQ to it.
    def contrib(block):
        m = _dq_matmul(block, opset=17)
        m.graph.node[0].domain = "com.microsoft"
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return m

    assert _lines(contrib(128)) == []  # not a plugin error; the contrib op takes int4 below opset 21
    assert _lines(contrib(32)) == [_dq("quant-block", f"block size 32: {BLOCK_SIZES}")]


# --- INT8 weight-only --------------------------------------------------------------------------------

def _int8_per_channel(with_activation_qdq=False, opset=17):
    inits = [numpy_helper.from_array(np.ones((K, N), np.int8), "w_q"),
             numpy_helper.from_array(np.full(N, 0.1, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zp")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="dq_w", axis=1)]
    x = "x"
    if with_activation_qdq:
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q_x"),
                  helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dq_x")]
        x = "xd"
    nodes.append(helper.make_node("MatMul", [x, "w"], ["y"], name="mm"))
    return _model(nodes, inits, opset=opset)


def test_int8_per_channel_weight_only_builds_with_a_warning():
    assert _lines(_int8_per_channel()) == [_dq(
        "weight-only", "INT8 weight-only MatMul: TensorRT documents weight-only quantization for INT4 only; with no "
        "Q/DQ on the activation the GEMM runs in float on dequantized weights (no INT8 GEMM; memory saving not "
        "assured)", "warning", "dq_w")]


def test_int8_per_channel_weights_with_activation_qdq_pass():
    assert _lines(_int8_per_channel(with_activation_qdq=True)) == []


def test_int8_per_channel_scale_count_must_match_the_axis():
    m = _int8_per_channel()
    m.graph.node[0].attribute[0].i = 0  # axis 0 has K = 256 entries, the scale has N = 64
    assert _lines(m) == [_dq("quant-axis", "64 scales for 256 channels on axis 0: the scale count must equal the "
                             "quantization axis' size", node="dq_w")]


def test_per_channel_scales_without_an_axis_attribute_warn():
    m = _int8_per_channel(with_activation_qdq=True)
    del m.graph.node[0].attribute[:]  # per-channel over N = axis 1, which is ONNX's default
    assert _lines(m) == [_dq("quant-axis", "no axis attribute: ONNX means axis 1, but TensorRT 10.1's parser "
                                           "defaulted to axis 0 for per-channel scales; write the axis explicitly",
                             "warning", "dq_w")]


def test_opset_21_without_int4_or_blocks_stays_an_error():
    (line,) = _lines(_int8_per_channel(opset=21))[:1]
    assert line.startswith("error [opset] <graph>: default-domain opset 21 is outside TensorRT 10.3's")


# --- unsupported, one line per node ------------------------------------------------------------------

@pytest.mark.parametrize("block", [32, 16, 256])
def test_int4_block_sizes_other_than_64_and_128_are_errors(block):
    assert _lines(_dq_matmul(block)) == [OPSET_21, _dq("quant-block", f"block size {block}: {BLOCK_SIZES}")]


def test_int4_non_zero_zero_point_is_an_error():
    assert _lines(_dq_matmul(128, zero_point=1)) == [OPSET_21, _dq(
        "quant-zero-point", f"non-zero zero points (asymmetric quantization): TensorRT supports symmetric "
        f"quantization only; {REQUANTIZE}")]


def test_uint4_asymmetric_weights_are_an_error():
    assert _lines(_dq_matmul(128, zero_point=8, qtype=U4)) == [OPSET_21, _dq(
        "quant-type", f"UINT4 quantization: TensorRT 10.3 quantizes to INT8, INT4 or FP8 only; asymmetric INT4 "
        f"(uint4 with zero points): {REQUANTIZE}")]


def test_block_size_below_opset_21_is_an_error():
    # [O] int4 and block_size exist from opset 21 on; opset 20 itself is in TensorRT's range (no opset finding).
    assert _lines(_dq_matmul(128, opset=20)) == [_dq(
        "quant-opset", "int4 data and block_size need DequantizeLinear-21 but the model's default-domain opset is 20: "
        "export at opset 21")]


def test_int4_per_channel_is_an_error():
    m = _dq_matmul(block=0, shape=(K, N), axis=1)
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full(N, 0.5, np.float32), "w_scale"))
    assert _lines(m) == [OPSET_21, _dq("quant-block", "per-channel INT4: TensorRT needs per-block INT4 scales "
                                                      f"(block size 64 or 128); {REQUANTIZE}")]


def test_int8_blocked_is_an_error_in_10_3():
    assert _lines(_dq_matmul(128, qtype=I8)) == [OPSET_21, _dq(
        "quant-block", "blocked INT8 quantization: TensorRT 10.3 block-quantizes INT4 only; give INT8 one scale per "
        "channel (1-D scale)")]


def test_int4_block_must_divide_the_dimension():
    # K = 192 = 2 scale rows: ONNX allows a partial last block of 64; TensorRT would infer block 96.
    m = _dq_matmul(128, shape=(192, N), scale_rows=2)
    assert _lines(m) == [OPSET_21, _dq("quant-block", "dimension 0 has 192 elements, not 2 x block_size 128: "
                                                      "TensorRT infers the block size from the shapes; make it a "
                                                      "multiple of 128")]


@pytest.mark.parametrize("k, ok", [(64, True), (128, True), (96, False)])
def test_a_single_partial_block_is_the_whole_dimension(k, ok):
    # K < block_size with one scale row: ONNX's one partial block = TensorRT's inferred block of K.
    m = _dq_matmul(128, shape=(k, N), scale_rows=1)
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = k
    assert _lines(m) == [OPSET_21] + ([] if ok else [_dq("quant-block", f"block size {k}/1: {BLOCK_SIZES}")])


def test_int4_blocked_rank_3_weights_are_an_error():
    inits = [_int4((2, K, N)), numpy_helper.from_array(np.full((2, K // 128, N), 0.5, np.float32), "w_scale")]
    dq = helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="dq", axis=1, block_size=128)
    mm = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    m = _model([dq, mm], inits, x_shape=(2, "s", K), out_shape=(2, "s", N))
    assert _lines(m) == [OPSET_21, _dq("quant-block", "blocked INT4 on a rank-3 tensor: TensorRT 10.3 "
                                                      "block-quantizes 2-D weights only")]


def test_negative_scales_are_an_error():
    m = _dq_matmul(128, scale=-0.5)
    assert _lines(m) == [OPSET_21, _dq("quant-scale", "128 of 128 scales are <= 0 (ONNX Runtime's symmetric RTN "
                                                      "maps each block's signed extreme to -8, so it writes negative "
                                                      "scales): TensorRT needs every scale > 0; quantize with "
                                                      "python -m export.quantize --target trt (positive scales)")]


def test_int4_activation_quantization_is_an_error():
    # QuantizeLinear(x) -> int4 (per-block on an activation), then back: INT4 is weight-only in TensorRT.
    inits = [numpy_helper.from_array(np.full((1, K // 128), 0.5, np.float32), "s"), _int4((1, K // 128), 0, name="z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_x", axis=1, block_size=128),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_x", axis=1, block_size=128),
             helper.make_node("Relu", ["xd"], ["y"], name="relu")]
    m = _model(nodes, inits, x_shape=(1, K), out_shape=(1, K))
    why = "TensorRT supports INT4 for weights only (weight-only quantization); keep activations in float"
    assert _lines(m) == [OPSET_21,
                         _dq("int4-activation", f"INT4 on an activation ('x' is not a constant): {why}",
                             node="q_x", op="QuantizeLinear"),
                         _dq("int4-activation", f"INT4 on an activation ('xq' is not a constant): {why}", node="dq_x")]


def test_int4_weights_outside_a_gemm_warn():
    m = _dq_matmul(128, consumer="Gather")
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.INT32  # x: the Gather's indices
    opset, dq = _lines(m)
    assert opset == OPSET_21
    assert dq == ("warning [weight-only] dq (DequantizeLinear): INT4 weights feed Gather: TensorRT's INT4 weight-only "
                  "quantization is for GEMMs (MatMul/Gemm); elsewhere the weights are dequantized by a separate layer")


@pytest.mark.parametrize("op, what, fix", [
    ("MatMulNBits", "ONNX Runtime's weight-only int4/int8 MatMul",
     "export with --target trt (DequantizeLinear(int4, block_size) -> MatMul)"),
    ("GatherBlockQuantized", "ONNX Runtime's block-quantized Gather",
     "leave the embedding Gather unquantized for --target trt"),
    ("DynamicQuantizeMatMul", "an ONNX Runtime quantized kernel", "quantize with QuantizeLinear/DequantizeLinear (QDQ)"),
])
def test_onnx_runtime_contrib_quant_ops_are_errors(op, what, fix):
    node = helper.make_node(op, ["x", "w_q", "w_scale"], ["y"], name="q_op", domain="com.microsoft")
    m = _model([node], [numpy_helper.from_array(np.zeros((N, 2, 64), np.uint8), "w_q"),
                        numpy_helper.from_array(np.ones((N, 2), np.float32), "w_scale")],
               opset=17, domains=["com.microsoft"])
    assert _lines(m) == [_dq("ort-contrib-op", f"com.microsoft.{op} ({what}) has no TensorRT importer or plugin; "
                                               f"{fix}", node="q_op", op=op)]


@pytest.mark.parametrize("op", ["MatMulInteger", "QLinearMatMul", "DynamicQuantizeLinear"])
def test_integer_quant_ops_are_unsupported(op):
    node = helper.make_node(op, ["x"], ["y"], name="iq")
    assert _lines(_model([node], [], opset=17)) == [_dq(
        "unsupported-op", f"{op} is not supported by TensorRT 10.3's ONNX parser (integer-arithmetic quantization); "
        "quantize with QuantizeLinear/DequantizeLinear (QDQ) instead", node="iq", op=op)]


def test_zero_point_in_external_data_is_a_warning(tmp_path):
    m = _dq_matmul(128, zero_point=0, shape=(K, 1024))  # zero point (2, 1024) int4 = 1 KiB
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=1000)
    lines = _lines(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False))
    assert lines == [OPSET_21, _dq("quant-zero-point", "zero point 'w_zp' is in external data (not read here): "
                                                       "TensorRT rejects the graph unless it is all zeros", "warning")]


# --- ONNX Runtime's MatMulNBitsQuantizer on a 2-MatMul model -----------------------------------------

def _two_matmuls():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((K, K)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return _model(nodes, inits, opset=17, out_shape=("b", K))


def _ort_quantize(block_size, symmetric=True, qdq=True, model=None):
    mnq = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    from onnxruntime.quantization.quant_utils import QuantFormat

    fmt = QuantFormat.QDQ if qdq else QuantFormat.QOperator
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    q = mnq.MatMulNBitsQuantizer(model or _two_matmuls(), block_size=block_size, is_symmetric=symmetric,
                                 quant_format=fmt, algo_config=mnq.DefaultWeightOnlyQuantConfig(
                                     block_size=block_size, is_symmetric=symmetric, quant_format=fmt))
    q.process()
    return q.model.model


def _positive_scales(model):
    """Re-quantize every blocked INT4 DequantizeLinear in place, from its own dequantized weights, the way
    TensorRT wants it: scale = amax / 7 > 0 per block (ONNX Runtime's RTN maps the signed extreme to -8)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        q, s = (numpy_helper.to_array(inits[name]) for name in node.input[:2])  # (K, N) int4, (K / B, N)
        k, n = q.shape
        w = q.astype(np.float32).reshape(s.shape[0], k // s.shape[0], n) * s[:, None, :]  # (K / B, B, N)
        scale = np.abs(w).max(axis=1) / 7
        scale[scale == 0] = 1
        q = np.clip(np.rint(w / scale[:, None, :]), -8, 7).astype(ml_dtypes.int4).reshape(k, n)
        inits[node.input[0]].CopyFrom(numpy_helper.from_array(q, node.input[0]))
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(scale.astype(s.dtype), node.input[1]))
    return model


def _findings(model):
    return [(f.node, f.severity, f.rule) for f in check_model(model, "g.onnx")]


def test_ort_qdq_symmetric_128_has_the_trt_structure_but_negative_scales():
    m = _ort_quantize(128)
    assert [n.op_type for n in m.graph.node] == ["DequantizeLinear", "MatMul", "Relu", "DequantizeLinear", "MatMul"]
    assert _findings(m) == [("<graph>", "warning", "opset"), ("mm1_DQ_Q4", "error", "quant-scale"),
                            ("mm2_DQ_Q4", "error", "quant-scale")]
    scales = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith("_scales")}
    message = check_model(m, "g.onnx")[1].message
    assert message.startswith(f"{int(np.sum(scales['w1_DQ_scales'] <= 0))} of 512 scales are <= 0")


def test_ort_qdq_128_with_positive_scales_passes():
    assert _lines(_positive_scales(_ort_quantize(128))) == [OPSET_21]


def test_ort_qdq_block_32_is_rejected_per_node():
    assert _findings(_ort_quantize(32)) == [
        ("<graph>", "warning", "opset"), ("mm1_DQ_Q4", "error", "quant-block"), ("mm1_DQ_Q4", "error", "quant-scale"),
        ("mm2_DQ_Q4", "error", "quant-block"), ("mm2_DQ_Q4", "error", "quant-scale")]


def test_ort_qdq_asymmetric_is_rejected_per_node():
    assert _findings(_ort_quantize(128, symmetric=False)) == [
        ("<graph>", "warning", "opset"), ("mm1_DQ_Q4", "error", "quant-type"), ("mm2_DQ_Q4", "error", "quant-type")]


def test_ort_qoperator_matmulnbits_is_rejected_per_node():
    assert _findings(_ort_quantize(128, qdq=False)) == [
        ("mm1_Q4", "error", "ort-contrib-op"), ("mm2_Q4", "error", "ort-contrib-op")]


# --- the CLI on a quantized engine directory --------------------------------------------------------

def _cli(engine_dir, *args):
    return subprocess.run([sys.executable, "-m", "export.check_trt", "--engine-dir", str(engine_dir), *args],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)


def _engine_dir(path, model):
    path.mkdir()
    onnx.save(model, path / "decoder.onnx")
    (path / "manifest.json").write_text(json.dumps({"stages": {"decoder": {"file": "decoder.onnx"}}}))
    return path


def test_cli_accepts_int4_qdq_and_lists_rejected_nodes(tmp_path):
    ok = _cli(_engine_dir(tmp_path / "ok", _dq_matmul(128)))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["decoder.onnx: OK, 1 warning (2 nodes after inlining)", f"  {OPSET_21}",
                                      "TensorRT 10.3 static check: 0 error(s), 1 warning(s) in 1 graph(s)"]
    bad = _cli(_engine_dir(tmp_path / "bad", _dq_matmul(32, zero_point=1)), "--json")
    assert bad.returncode == 1
    findings = json.loads(bad.stdout)["graphs"]["decoder.onnx"]["findings"]
    assert [(f["node"], f["severity"], f["rule"]) for f in findings] == [
        ("<graph>", "warning", "opset"), ("dq", "error", "quant-zero-point")]


# --- the real llava-tiny decoder ---------------------------------------------------------------------

def test_ort_qdq_llava_tiny_decoder_is_checked_node_by_node(tiny_engine):
    """ONNX Runtime raises the model, not its DartPruneSlots function, to opset 21: the check still inlines
    the function (no shape input appears: no input value reaches a shape, every integer I/O is int32) and
    reports every quantized MatMul's weights."""
    engine_dir, _ = tiny_engine
    decoder = onnx.load(str(engine_dir / "decoder.onnx"))
    weights = {t.name for t in decoder.graph.initializer}
    linear = [n for n in decoder.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    m = _ort_quantize(128, model=decoder)  # export.quantize --target trt default; K = 64 is one block
    dq = [n.name for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(linear) > 0
    assert any(f.name == "DartPruneSlots" for f in m.functions)  # not inlined by the quantizer
    known = [("<graph>", "warning", "opset")]
    assert sorted(_findings(m)) == sorted(known + [(name, "error", "quant-scale") for name in dq])
    assert sorted(_findings(_positive_scales(m))) == known

"""Check an engine directory's ONNX graphs against TensorRT 10.3's ONNX parser, without TensorRT.

    python -m export.check_trt --engine-dir engines/llava-tiny          # report, exit 1 on errors
    python -m export.check_trt --engine-dir engines/llava-tiny --json   # findings as JSON

A static check: model-local functions are inlined first (the parser imports them node by node
too), then every node is held against the published operator matrix and the few restrictions that
decide whether TensorRT 10.3 parses and builds the graph. "error": the parser rejects the node, the
engine build fails, or a rule of this project below is broken. "warning": it builds, with a restriction
or a caveat worth knowing.
It reads graph structure only (onnx.load(..., load_external_data=False)), never the external weights;
of the tensors stored inline it reads constants and Q/DQ scales and zero points (their sign, zeros).

Two graph-level rules are this project's own, stricter than the parser, and errors so that a
regression fails CI (docs/TENSORRT_10.3.md has the research they rest on):
  shape-input  no graph input whose VALUES reach a shape (a Reshape/Expand/Tile/ConstantOfShape shape,
               a Slice bound, a Range limit, TopK's K, Reduce/Squeeze/Unsqueeze axes, ...; also a
               data-dependent output shape or If/Loop control), through any arithmetic but not through
               Shape/Size. TensorRT makes such an input a shape input tensor, whose profile needs
               IOptimizationProfile::setShapeValues: int32 only in the 10.3 Python API (section 4).
               The verdict is dart_ops.onnx_op_slots.shape_input_uses (a dataflow walk after
               inlining, the project's one implementation); the message names the operand reached.
  int64-io     no int64 graph input or output: integer I/O is int32 (or bool). 10.3 keeps INT64 I/O as
               INT64 bindings ([C] 9.0), its parser casts int64 Gather/GatherElements/ScatterElements
               indices to INT32 and TopK's indices are INT32 in the layer (sections 2, 3, 7).
An engine directory written by this version's export.build has neither; the fix for an older one
is to re-export it.

Quantized graphs: INT4 weight-only DequantizeLinear (symmetric, blocked 64 or 128 along one dim of
2-D weights, positive FLOAT/FLOAT16/BFLOAT16 scales) -> MatMul/Gemm passes, with opset 21 (which it
needs) as a warning; INT8 per-channel weights pass, with a warning when only the weights are quantized.
Rejected, one line per node: com.microsoft MatMulNBits/GatherBlockQuantized and other ONNX Runtime
quantized kernels, uint4/uint8 or non-zero zero points, other block sizes, blocked INT8, INT4
activations, scales <= 0 (ONNX Runtime's symmetric RTN writes negative ones), int4/block_size below
opset 21.

Sources (the rules below cite them by letter):
[M] onnx-tensorrt operator support matrix, docs/operators.md: release/10.3,
    https://github.com/onnx/onnx-tensorrt/blob/release/10.3/docs/operators.md. The copies read
    for this module were the 10.0 one (header: "TensorRT 10.0 supports operators in the inclusive
    range of opset 9 to opset 20") and the 10.15 one (full table; "opset 9 to opset 24"): the op
    list below is the 10.15 table's Y rows minus the ops [C] says were added after 10.3.
[C] onnx-tensorrt docs/Changelog.md (10.4: Blackman/Hamming/HannWindow, Pad tensor axes;
    10.5: STFT; 10.7: dynamic Squeeze/Unsqueeze axes; 10.8: dynamic CumSum axis;
    10.14: Attention; 10.15: RotaryEmbedding, RMSNormalization, TensorScatter;
    9.0: "The ONNX parser no longer automatically casts INT64 to INT32 ... INT64 bindings").
[P] onnx-tensorrt 10.x parser source, ModelImporter.cpp (parseNode: builtin importer, else a
    model-local function, else FallbackPluginImporter; "Make sure input X has Int64 binding")
    and onnxOpImporters.cpp (TopK: K is wired to ITopKLayer input 1; Squeeze/Unsqueeze:
    "axes input must be an initializer"; ScatterElements with a reduction uses the
    ScatterElements plugin), https://github.com/onnx/onnx-tensorrt (10.x branches).
[L] TensorRT 10 layer docs: ITopKLayer::setK "only values up to 3840 are supported", TopK
    operator "k <= 3840"; ITensor::isShapeTensor and IOptimizationProfile::setShapeValues
    (shape input tensors: host values, min/opt/max in the profile), TensorRT 10.3 developer guide
    (dynamic shapes, data-dependent shapes, loops and conditionals),
    https://docs.nvidia.com/deeplearning/tensorrt/archives/tensorrt-1030/developer-guide/index.html
Quantized graphs (Q/DQ weights, ONNX Runtime's quantizer outputs) are held against:
[H] TensorRT 10.3's own API docs, include/NvInfer.h at NVIDIA/TensorRT tag v10.3.0,
    https://github.com/NVIDIA/TensorRT/blob/v10.3.0/include/NvInfer.h (IQuantizeLayer, IDequantizeLayer):
    "a 2-D tensor for block quantization (supported for DataType::kINT4 only)"; "Block dequantization
    is supported only for 2-D input tensors with DataType::kINT4 that are rooted at an IConstantLayer
    (i.e. weights)"; "Per-channel dequantization is supported only for input that is rooted at an
    IConstantLayer (i.e. weights). Activations cannot be quantized per-channel."; "zeroPt must only
    contain zero-valued coefficients, because only symmetric quantization is supported"; "The subgraph
    which terminates with the scale tensor must be a build-time constant."; "IDequantizeLayer supports
    DataType::kINT8, DataType::kFP8 or DataType::kINT4 precision".
[Q] TensorRT "Working with Quantized Types" docs: Quantization Schemes,
    https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-schemes.html:
    "INT4 quantization requires per-block scales. The supported block sizes are {64, 128}. The block
    dimension should be one of the last two dimensions." and "s is the block's quantization scale
    expressed using a 16-bit or 32-bit floating point"; 10.11 page .../10.11.0/inference-library/
    work-quantized-types.html: "TensorRT quantizes activations and weights for INT8, FP8, and FP4.
    Weight-only quantization is supported for INT4."
[MQ] operators.md rows, 10.0 table (release 10.1-GA): "DequantizeLinear | Y | INT8, FP8, INT4 |
    `x_zero_point` must be zero" (10.15 adds FP4); QuantizeLinear: "`y_zero_point` must be 0";
    MatMulInteger, QLinearMatMul, QLinearConv, ConvInteger, DynamicQuantizeLinear: N; data types
    "DOUBLE, FLOAT32, FLOAT16, BFLOAT16, INT32, INT64, FP8, INT8, INT4, UINT8, and BOOL" (no UINT4).
    [C] 10.0 EA: "Added support for `INT4` quantization".
[PQ] the parser's QuantDequantLinearHelper (onnxOpImporters.cpp, onnx-tensorrt 10.1-GA; the 10.2 and
    10.3 changelogs list no Q/DQ change): rejects UINT8 data ("notInvalidType(inputs.at(0), {"UINT8"}, node, nodeIdx)"),
    "TensorRT only supports symmetric quantization. The zero point for the QuantizeLinear/
    DequantizeLinear operator must be all zeros.", "Scale coefficients must all be positive",
    "Only a single blocking dimension is allowed.", "Invalid rank for the scale tensor", "Quantization
    to INT4 is not supported for tensors with an odd last dimension."; it never reads block_size: the
    block size is inferred from the input and scale shapes. ModelImporter.cpp parseNode picks the
    importer by op_type alone, so a com.microsoft DequantizeLinear is imported as the standard one and
    com.microsoft MatMulNBits falls through to the plugin importer (no such plugin exists).
[O] ONNX DequantizeLinear-21 / QuantizeLinear-21 add int4/uint4 and the block_size attribute
    (onnx/defs/quantization, opset 21); ONNX Runtime's MatMulNBitsQuantizer in QDQ format therefore
    raises the model to opset 21 ("Force to update it to opset 21").
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, inliner, numpy_helper

from dart_ops.onnx_op_slots import shape_input_uses
from export.check_trt_quant import (  # TRT_VERSION, ORT_QUANT_OPS: part of this module's API too
    INTEGER_QUANT_OPS,
    ORT_QUANT_OPS,
    QDQ_OPS,
    QUANT_OPSET,
    TRT_VERSION,
    _check_qdq,
    _Index,
    _needs_quant_opset,
)
from export.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, Parser, dataclass_defaults, report

# [M] "supports operators in the inclusive range of opset 9 to opset 20". The parser itself only
# logs below opset 7 and never refuses a newer opset; outside 9..20 nothing is guaranteed.
MIN_OPSET, MAX_OPSET = 9, 20
# [L] ITopKLayer: k <= 3840.
MAX_TOPK_K = 3840

# [M] rows marked Y in the operator matrix, default ONNX domain, as of TensorRT 10.3 ([C] for
# what came later). Marked N there (hence errors here): Unique, Compress, BitShift, Bitwise*,
# DFT, Det, Multinomial, Optional*, QLinear*, Sequence*, String*, MatMulInteger, ...
SUPPORTED_OPS = frozenset([
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh",
    "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace",
    "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike",
    "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool",
    "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU",
    "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization",
    "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop",
    "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean",
    "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not",
    "OneHot", "Or", "Pad", "ParametricSoftplus", "Pow", "PRelu", "QuantizeLinear", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RNN", "RoiAlign", "Round",
    "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid",
    "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split",
    "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu",
    "Unsqueeze", "Upsample", "Where", "Xor",
])

# Plugin creators TensorRT itself ships that a custom-domain node may name (op_type). Left empty
# on purpose: this project needs none, and a plugin name here would only turn an error into a
# warning that still needs libnvinfer_plugin loaded at build and run time.
KNOWN_TRT_PLUGINS: frozenset[str] = frozenset()

# [M]/[L] outputs whose shape depends on input values (data-dependent shapes, TensorRT >= 8.5).
DATA_DEPENDENT = {"NonZero", "NonMaxSuppression"}
# [M] Loop/If/Scan are "Y" with restrictions; [L] "Working with Loops / Conditionals".
CONTROL_FLOW = {
    "Loop": "scan outputs cannot have a dynamic length and loop-carried values must keep one shape",
    "If": "both branches' outputs must have the same rank (and distinct names); a non-constant "
          "condition becomes an IIfConditional, which blocks fusion across it",
    "Scan": "lowered to an ILoop; each iteration runs serially",
}
# Inputs the 10.3 parser needs as weights (an initializer or a Constant output):
# [M] CumSum "axis must be a build-time constant" (dynamic since 10.8 [C]); Reduce* "axes must be
# an initializer"; [P] Squeeze/Unsqueeze "axes input must be an initializer" (dynamic since 10.7
# [C]); Pad axes (tensor axes since 10.4 [C]). (op, input index, first opset with that input)
CONST_INPUTS = {"CumSum": (1, "axis", 11), "Squeeze": (1, "axes", 13), "Unsqueeze": (1, "axes", 13),
                "Pad": (3, "axes", 18), "ReduceSum": (1, "axes", 13)}
CONST_INPUTS.update({op: (1, "axes", 18) for op in (
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSumSquare")})
# Rule "shape-input": which operands decide a shape, and where a value stops mattering, are
# onnx_op_slots' tables (its SHAPE_OPERANDS also lists ops whose output shape depends on data, and
# If/Loop's condition and trip count); DATA_DEPENDENT_OPERANDS names the former in the message.
DATA_DEPENDENT_OPERANDS = {"NonZero", "Compress", "Unique", "NonMaxSuppression"}
MERGE_ABOVE = 8  # more int64 graph I/O tensors than this: one merged finding per graph


@dataclass(frozen=True)
class Finding:
    graph: str
    node: str  # node name, or "<graph>" for graph-level findings
    op_type: str
    severity: str  # "error" | "warning"
    rule: str
    message: str

    def line(self) -> str:
        where = self.node if not self.op_type else f"{self.node} ({self.op_type})"
        return f"{self.severity} [{self.rule}] {where}: {self.message}"


class CheckError(ValueError):
    """Bad input (no engine directory, unreadable manifest or graph): exit 2."""


class EngineFindings(dict):
    """check_engine_dir's result: {file name: [Finding]}, plus `nodes` {file name: node count}."""

    def __init__(self):
        super().__init__()
        self.nodes: dict[str, int] = {}


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _const_value(node: onnx.NodeProto):
    """The value of a Constant node as a numpy array, or None when it is not readable here."""
    for a in node.attribute:
        if a.name == "value" and a.HasField("t") and a.t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(a.t)
        if a.name == "value_int":
            return numpy_helper.to_array(onnx.helper.make_tensor("v", TensorProto.INT64, [], [a.i]))
        if a.name == "value_ints":
            return numpy_helper.to_array(onnx.helper.make_tensor("v", TensorProto.INT64, [len(a.ints)], a.ints))
    return None


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"<{node.op_type} #{index}>"


def _walk(graph: onnx.GraphProto, consts: dict):
    """Yield (node, index, consts) for every node, entering Loop/If/Scan bodies; `consts` maps
    tensor names to a value (or None if unknown) for initializers and Constant outputs."""
    consts = dict(consts)
    for init in graph.initializer:
        external = init.data_location == TensorProto.EXTERNAL
        consts[init.name] = None if external or init.data_type == TensorProto.STRING else numpy_helper.to_array(init)
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            consts[node.output[0]] = _const_value(node)
        yield node, i, consts
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _walk(sub, consts)


def _check_node(node, index, consts, opset, graph_name, info: _Index) -> list[Finding]:
    op, name = node.op_type, _node_name(node, index)

    def f(severity, rule, message):
        return Finding(graph_name, name, op, severity, rule, message)

    if node.domain == "com.microsoft" and op in ORT_QUANT_OPS:  # [PQ] no importer, no plugin
        what, fix = ORT_QUANT_OPS[op]
        return [f("error", "ort-contrib-op", f"com.microsoft.{op} ({what}) has no TensorRT importer or plugin; "
                                             f"{fix}")]
    if node.domain not in ("", "ai.onnx") and op in QDQ_OPS:  # [PQ] imported as the standard op
        return _check_qdq(node, None, info, f)
    if node.domain not in ("", "ai.onnx"):
        # [P] no builtin importer and no local function left after inlining: FallbackPluginImporter.
        if op in KNOWN_TRT_PLUGINS:
            return [f("warning", "plugin", f"imported as TensorRT's '{op}' plugin: libnvinfer_plugin must be "
                                          "loaded when building and running the engine")]
        return [f("error", "plugin", f"custom op {node.domain}::{op} has no model-local function: TensorRT's "
                                     f"parser looks for a plugin creator named '{op}'; register one (or give the "
                                     "op a function body of standard ONNX ops)")]
    if op in INTEGER_QUANT_OPS:  # [MQ]
        return [f("error", "unsupported-op", f"{op} is not supported by TensorRT {TRT_VERSION}'s ONNX parser "
                                             "(integer-arithmetic quantization); quantize with QuantizeLinear/"
                                             "DequantizeLinear (QDQ) instead")]
    if op not in SUPPORTED_OPS:
        return [f("error", "unsupported-op", f"{op} is not supported by TensorRT {TRT_VERSION}'s ONNX parser "
                                             "(operator matrix); rewrite it with supported ops or as a plugin")]
    if op in QDQ_OPS:
        return _check_qdq(node, opset, info, f)
    out = []
    if op == "TopK":  # [M] [P] [L]
        k_name = node.input[1] if opset >= 10 and len(node.input) > 1 else None
        if k_name is not None and k_name not in consts:
            out.append(f("error", "topk-k-not-constant",
                         f"K ('{k_name}') is not an initializer or Constant: TensorRT takes it only as a "
                         f"build-time shape tensor <= {MAX_TOPK_K} (a data-dependent K fails the build); "
                         "make K a Constant"))
        else:
            k = consts.get(k_name) if k_name is not None else next(
                (a.i for a in node.attribute if a.name == "k"), None)
            k = None if k is None or np.size(k) == 0 else int(np.max(k))
            if k is not None and k > MAX_TOPK_K:
                out.append(f("error", "topk-k-too-large", f"K = {k} exceeds TensorRT's TopK limit of "
                                                          f"{MAX_TOPK_K}; split the selection or shorten the axis"))
    if op in CONST_INPUTS:
        idx, what, since = CONST_INPUTS[op]
        if opset >= since and len(node.input) > idx and node.input[idx] and node.input[idx] not in consts:
            out.append(f("error", "input-not-constant",
                         f"{what} ('{node.input[idx]}') must be an initializer or Constant for TensorRT "
                         f"{TRT_VERSION}'s {op} importer; export it as a constant"))
    if op in DATA_DEPENDENT:
        out.append(f("warning", "data-dependent-shape",
                     f"{op}'s output shape depends on data: supported through data-dependent shapes, which "
                     "need an output allocator for graph outputs, run slower and stop shape-based fusion"))
    if op in CONTROL_FLOW:
        out.append(f("warning", "control-flow", f"{op} is supported with restrictions: {CONTROL_FLOW[op]}"))
    if op == "ScatterElements":  # [P] reduction != none goes through a plugin
        red = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
        if red != "none":
            out.append(f("warning", "plugin", f"reduction='{red}' is imported through TensorRT's ScatterElements "
                                              "plugin: libnvinfer_plugin must be loaded"))
    return out


def _int64_io(graph: onnx.GraphProto, graph_name: str) -> list[Finding]:
    """Rule "int64-io": an int64 graph input or output is an error. Our rule is integer I/O in int32
    (or bool), docs/TENSORRT_10.3.md sections 2, 3 and 7: 10.3 keeps INT64 I/O as INT64 and needs
    INT64 bindings ([C] 9.0; [P] "Make sure input X has Int64 binding"), the parser casts int64
    Gather/GatherElements/ScatterElements indices to INT32, and TopK's indices are INT32 in the layer.
    INT64 initializers are not flagged: they are constants, not bindings."""
    io = [("input", v) for v in graph.input] + [("output", v) for v in graph.output]
    inits = {t.name for t in graph.initializer}
    hits = [(kind, v.name) for kind, v in io
            if v.type.tensor_type.elem_type == TensorProto.INT64 and v.name not in inits]
    why = (f"integer graph I/O must be int32 or bool for TensorRT {TRT_VERSION} (INT64 needs int64 bindings; "
           "the parser casts int64 indices to int32; docs/TENSORRT_10.3.md sections 2, 3, 7): re-export with "
           "this version")
    if len(hits) > MERGE_ABOVE:
        names = ", ".join(n for _, n in hits[:4])
        return [Finding(graph_name, "<graph>", "", "error", "int64-io",
                        f"{len(hits)} int64 graph inputs/outputs ({names}, ...): {why}")]
    return [Finding(graph_name, "<graph>", "", "error", "int64-io", f"{kind} '{name}' is int64: {why}")
            for kind, name in hits]


def _shape_inputs(model: onnx.ModelProto, graph_name: str) -> list[Finding]:
    """Rule "shape-input": a graph input whose values reach a shape-determining operand ([L] a shape
    input tensor; docs/TENSORRT_10.3.md section 4), from dart_ops.onnx_op_slots.shape_input_uses (the
    one dataflow walk of the project); `model` is inlined already."""
    return [Finding(graph_name, "<graph>", "", "error", "shape-input", _shape_input_message(name, use))
            for name, use in shape_input_uses(model).items()]


def _shape_input_message(name: str, use: tuple[onnx.NodeProto, int]) -> str:
    node, index = use
    what = f"{node.op_type} '{node.name or node.output[0]}' input {index} ({_operand_name(node.op_type, index)})"
    kind = "data" if node.op_type in DATA_DEPENDENT_OPERANDS else (
        "control" if node.op_type in ("If", "Loop") else "shape")
    why = {"shape": "TensorRT makes it a shape input tensor, which needs IOptimizationProfile::setShapeValues "
                    "(int32 only in the TensorRT 10.3 Python API, docs/TENSORRT_10.3.md section 4)",
           "data": "an output shape decided by its values (a data-dependent shape)",
           "control": "control flow decided by its values"}[kind]
    return f"input '{name}' reaches {what}: {why}; re-export with this version (no input value reaches a shape)"


def _operand_name(op_type: str, index: int) -> str:
    try:
        formal = onnx.defs.get_schema(op_type).inputs
    except onnx.defs.SchemaError:
        return "operand"
    return formal[min(index, len(formal) - 1)].name if formal else "operand"


def inline(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every model-local function inlined (recursively), as TensorRT imports it.
    convert_version: without it onnx leaves a call in place when the function's opset differs from the
    model's, as after ONNX Runtime's QDQ quantizer raises the model (not its functions) to opset 21."""
    return inliner.inline_local_functions(model, convert_version=True) if model.functions else model


def check_model(model: onnx.ModelProto, graph_name: str) -> list[Finding]:
    """All findings for one model (inlined first), graph-level ones first."""
    opset = _default_opset(model)
    model = inline(model)
    info = _Index(model.graph)
    out = _opset(opset, model.graph, info, graph_name)
    out += _int64_io(model.graph, graph_name)
    out += _shape_inputs(model, graph_name)
    for node, i, consts in _walk(model.graph, {}):
        out += _check_node(node, i, consts, opset or MAX_OPSET, graph_name, info)
    return out


def _opset(opset, graph: onnx.GraphProto, info: _Index, graph_name: str) -> list[Finding]:
    """[M] opsets 9..20; opset 21 too when the graph needs it for INT4/blocked Q/DQ ([O] [C] [PQ]: the
    10.3 parser imports INT4 Q/DQ and only warns below opset 7, it never refuses a newer opset)."""
    if opset is not None and MIN_OPSET <= opset <= MAX_OPSET:
        return []
    if opset == QUANT_OPSET and any(_needs_quant_opset(n, info) for n, _, _ in _walk(graph, {})):
        return [Finding(graph_name, "<graph>", "", "warning", "opset",
                        f"default-domain opset {opset} is above the operator matrix's {MIN_OPSET}..{MAX_OPSET}; "
                        f"INT4/blocked DequantizeLinear needs it and TensorRT {TRT_VERSION}'s parser accepts it (it "
                        "refuses no newer opset): confirm with an engine build on the device")]
    return [Finding(graph_name, "<graph>", "", "error", "opset",
                    f"default-domain opset {opset} is outside TensorRT {TRT_VERSION}'s supported range "
                    f"{MIN_OPSET}..{MAX_OPSET}; re-export with an opset in that range")]


def count_nodes(model: onnx.ModelProto) -> int:
    return sum(1 for _ in _walk(inline(model).graph, {}))


def _stage_files(path: Path) -> list[str]:
    if not path.is_dir():
        raise CheckError(f"{path} is not a directory")
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise CheckError(f"{path} is not an engine directory (no manifest.json)")
    try:
        stages = json.loads(manifest.read_text())["stages"]
        files = [stage["file"] for stage in stages.values()]  # vision_encoder, embed_tokens, decoder
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckError(f"{manifest}: unreadable manifest ({type(e).__name__}: {e})") from e
    if not files:
        raise CheckError(f"{manifest} lists no stages")
    return files


def check_engine_dir(path) -> EngineFindings:
    """{graph file: [Finding]} for every stage in `path`/manifest.json, in manifest order (the
    weights are never read)."""
    path = Path(path)
    result = EngineFindings()
    for name in _stage_files(path):
        try:
            model = onnx.load(str(path / name), load_external_data=False)
        except Exception as e:  # missing or corrupt file
            raise CheckError(f"{path / name}: cannot load ({type(e).__name__}: {e})") from e
        result[name] = check_model(model, name)
        result.nodes[name] = count_nodes(model)
    return result


def _totals(findings_by_graph) -> tuple[int, int]:
    all_ = [f for fs in findings_by_graph.values() for f in fs]
    return sum(f.severity == "error" for f in all_), sum(f.severity == "warning" for f in all_)


def format_report(findings_by_graph) -> str:
    nodes = getattr(findings_by_graph, "nodes", {})
    lines = []
    for name, findings in findings_by_graph.items():
        errors, warnings = _totals({name: findings})
        head = "OK" if not errors else f"FAILED, {errors} error{'s' * (errors != 1)}"
        if warnings:
            head += f", {warnings} warning{'s' * (warnings != 1)}"
        count = f" ({nodes[name]} nodes after inlining)" if name in nodes else ""
        lines.append(f"{name}: {head}{count}")
        lines += [f"  {f.line()}" for f in sorted(findings, key=lambda f: f.severity != "error")]
    errors, warnings = _totals(findings_by_graph)
    lines.append(f"TensorRT {TRT_VERSION} static check: {errors} error(s), {warnings} warning(s) "
                 f"in {len(findings_by_graph)} graph(s)")
    return "\n".join(lines)


def to_json(findings_by_graph) -> dict:
    nodes = getattr(findings_by_graph, "nodes", {})
    errors, warnings = _totals(findings_by_graph)
    return {"tensorrt": TRT_VERSION, "errors": errors, "warnings": warnings,
            "graphs": {name: {"nodes": nodes.get(name), "findings": [asdict(f) for f in fs]}
                       for name, fs in findings_by_graph.items()}}


@dataclass(frozen=True)
class CheckConfig:
    engine_dir: Path
    json: bool = False
    verbose: bool = False


EPILOG = """examples:
  python -m export.check_trt --engine-dir engines/llava-tiny          # report, exit 1 on errors
  python -m export.check_trt --engine-dir engines/llava-tiny --json   # findings as JSON
  python -m export.check_trt engines/llava-tiny                       # the same, positional form

errors: what TensorRT 10.3's parser or builder would reject, and two rules of this project:
  shape-input  a graph input whose values reach a shape (TensorRT would make it a shape input tensor)
  int64-io     an int64 graph input or output (integer I/O is int32 or bool)
  (both: re-export with this version; see docs/TENSORRT_10.3.md)

exit codes: 0 no errors (warnings allowed); 1 a graph has errors (listed), or the check itself
failed; 2 usage error (a bad flag, no engine directory, an unreadable manifest or graph).
"""


def parse_args(argv=None) -> CheckConfig:
    d = dataclass_defaults(CheckConfig)
    p = Parser(prog="python -m export.check_trt", epilog=EPILOG,
               description=f"Static check of an engine directory's ONNX graphs against TensorRT "
                           f"{TRT_VERSION}'s ONNX parser and the project's TensorRT rules (no TensorRT needed).")
    p.add_argument("--engine-dir", type=Path, default=None, help="engine directory (with manifest.json)")
    p.add_argument("engine_dir_positional", nargs="?", type=Path, default=None, metavar="ENGINE_DIR",
                   help="the same as --engine-dir (the older form)")
    p.add_argument("--json", action="store_true", default=d["json"], help="print the findings as JSON")
    p.add_argument("-v", "--verbose", action="store_true", default=d["verbose"], help="tracebacks on failure")
    a = p.parse_args(argv)
    given = {x for x in (a.engine_dir, a.engine_dir_positional) if x is not None}
    if not given:
        p.error("no engine directory: pass --engine-dir DIR")
    if len(given) > 1:
        p.error(f"two engine directories given ({a.engine_dir_positional} and --engine-dir {a.engine_dir}): "
                "pass one")
    return CheckConfig(given.pop(), a.json, a.verbose)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        result = check_engine_dir(cfg.engine_dir)
        print(json.dumps(to_json(result), indent=2) if cfg.json else format_report(result))
    except CheckError as e:  # bad input: a usage error
        return report(e, cfg.verbose, "", EXIT_USAGE)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001  one line for the user, the traceback with -v
        return report(e, cfg.verbose)
    return EXIT_FAILURE if _totals(result)[0] else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""The quantization rules of export.check_trt: which weight-only quantized forms TensorRT 10.3's
ONNX parser accepts (symmetric blocked INT4 DequantizeLinear -> MatMul/Gemm with block size 64 or
128 and positive constant scales; INT8 per-channel) and a one-line reason per node for those it
rejects (com.microsoft MatMulNBits and other contrib ops, asymmetric INT4, other block sizes, int4
activations). Sources, cited as [H] [Q] [MQ] [PQ] [O]: export/check_trt.py's module docstring."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

TRT_VERSION = "10.3"

# --- quantization ([H] [Q] [MQ] [PQ] [O]) ---
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}  # any domain: [PQ] the parser dispatches on op_type
QUANT_OPSET = 21  # [O] int4 and block_size need {Q,DQ}uantizeLinear-21
QUANT_TYPES = {TensorProto.INT8: "INT8", TensorProto.INT4: "INT4", TensorProto.FLOAT8E4M3FN: "FP8"}  # [H]
SCALE_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}  # [Q] 16/32-bit float; [PQ]
INT4_BLOCK_SIZES = (64, 128)  # [Q]
GEMM_OPS = {"MatMul", "Gemm"}
REQUANTIZE = "re-quantize with --target trt (symmetric INT4, block size 128)"
# Re-quantization hints for quantized types TensorRT does not take ([PQ] rejects UINT8; [H] no UINT4).
TYPE_HINTS = {TensorProto.UINT8: "quantize to signed INT8 (symmetric) instead",
              TensorProto.UINT4: f"asymmetric INT4 (uint4 with zero points): {REQUANTIZE}"}
# [MQ] N rows of the quantization family in the default domain: integer arithmetic, not Q/DQ.
INTEGER_QUANT_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLinear"}
# ONNX Runtime contrib ops (com.microsoft) of the quantization family, [PQ] no importer and no plugin:
# op -> (what it is, what to do instead).
ORT_QUANT_OPS = {
    "MatMulNBits": ("ONNX Runtime's weight-only int4/int8 MatMul",
                    "export with --target trt (DequantizeLinear(int4, block_size) -> MatMul)"),
    "GatherBlockQuantized": ("ONNX Runtime's block-quantized Gather",
                             "leave the embedding Gather unquantized for --target trt"),
}
ORT_QUANT_OPS.update({op: ("an ONNX Runtime quantized kernel", "quantize with QuantizeLinear/DequantizeLinear (QDQ)")
                      for op in (
    "MatMulBnb4", "MatMulFpQ4", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QGemm",
    "QAttention", "QEmbedLayerNormalization", "QOrderedMatMul", "QOrderedAttention", "QOrderedGelu",
    "QOrderedLayerNormalization", "QOrderedLongformerAttention", "QuantizeWithOrder", "DequantizeWithOrder",
    "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearReduceMean", "QLinearWhere",
    "QLinearConvTranspose", "QuantizeBFP", "DequantizeBFP")})



# --- quantized graphs ----------------------------------------------------------------------------

@dataclass
class _Tensor:
    dtype: int | None  # TensorProto data type; None when unknown
    shape: tuple | None  # dims (None for a symbolic one); None when unknown
    proto: TensorProto | None = None  # an initializer's or a Constant's tensor
    const: bool = False  # an initializer or a Constant output


class _Index:
    """Types, shapes, constants, producers and consumers of every tensor of a graph and its subgraphs."""

    def __init__(self, graph: onnx.GraphProto):
        self.tensors: dict[str, _Tensor] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.rooted: set[str] = set()  # [H] "rooted at an IConstantLayer": constants and what only they feed
        self._add(graph)

    def _add(self, graph):
        for v in [*graph.input, *graph.value_info, *graph.output]:
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim) \
                if t.HasField("shape") else None
            self.tensors.setdefault(v.name, _Tensor(t.elem_type or None, shape))
        for init in graph.initializer:
            self.tensors[init.name] = _Tensor(init.data_type, tuple(init.dims), init, True)
            self.rooted.add(init.name)
        for node in graph.node:  # in topological order (ONNX requires it)
            self.producer.update((o, node) for o in node.output)
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                t = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
                self.tensors[node.output[0]] = _Tensor(t.data_type, tuple(t.dims), t, True) if t is not None \
                    else _Tensor(None, None, None, True)
                self.rooted.add(node.output[0])
            elif any(node.input) and all(i in self.rooted for i in node.input if i):
                self.rooted.update(node.output)
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    self._add(sub)

    def get(self, name: str) -> _Tensor:
        return self.tensors.get(name) or _Tensor(None, None)

    def value(self, name: str):
        """A constant's values, or None (not a constant, or its data is external: not read here)."""
        t = self.get(name).proto
        return None if t is None or t.data_location == TensorProto.EXTERNAL else numpy_helper.to_array(t)

    def produced_by(self, name: str, op_type: str) -> bool:
        return getattr(self.producer.get(name), "op_type", None) == op_type


def _attr(node: onnx.NodeProto, name: str, default=None):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _quant_type(node: onnx.NodeProto, info: _Index) -> int | None:
    """The quantized type of a Q/DQ node: its zero point's, else Q's output_dtype (Q without either: INT8,
    [PQ] "ONNX default is UINT8, TRT will default to INT8"), else DQ's input (or the producing Q's)."""
    if len(node.input) > 2 and node.input[2] and info.get(node.input[2]).dtype:
        return info.get(node.input[2]).dtype
    if node.op_type == "QuantizeLinear":
        return _attr(node, "output_dtype") or TensorProto.INT8
    if info.produced_by(node.input[0], "QuantizeLinear"):
        return _quant_type(info.producer[node.input[0]], info)
    return info.get(node.input[0]).dtype


def _needs_quant_opset(node: onnx.NodeProto, info: _Index) -> bool:
    """[O] a default-domain Q/DQ node that only opset 21 allows (int4/uint4 data or a block_size)."""
    return (node.op_type in QDQ_OPS and node.domain in ("", "ai.onnx")
            and (_attr(node, "block_size", 0) > 0
                 or _quant_type(node, info) in (TensorProto.INT4, TensorProto.UINT4)))


def _qdq_error(node, qtype, weights, opset, info) -> tuple[str, str] | None:
    """The first reason TensorRT 10.3 rejects this QuantizeLinear/DequantizeLinear node, as (rule, message)."""
    x, scale = node.input[0], node.input[1] if len(node.input) > 1 else ""
    zp = node.input[2] if len(node.input) > 2 else ""
    tname = TensorProto.DataType.Name(qtype) if qtype else "?"
    if qtype is not None and qtype not in QUANT_TYPES:  # [H] [PQ]
        hint = TYPE_HINTS.get(qtype, "use INT8, INT4 (weights) or FP8")
        return "quant-type", f"{tname} quantization: TensorRT {TRT_VERSION} quantizes to INT8, INT4 or FP8 only; {hint}"
    if qtype == TensorProto.INT4 and not weights:  # [Q] "Weight-only quantization is supported for INT4"; [H]
        return "int4-activation", (f"INT4 on an activation ('{x}' is not a constant): TensorRT supports INT4 for "
                                   "weights only (weight-only quantization); keep activations in float")
    if opset is not None and opset < QUANT_OPSET and _needs_quant_opset(node, info):  # [O]
        return "quant-opset", (f"int4 data and block_size need {node.op_type}-21 but the model's default-domain "
                               f"opset is {opset}: export at opset {QUANT_OPSET}")
    if zp:  # [H] [PQ] symmetric only
        zero = info.value(zp)
        if zero is not None and np.any(zero.astype(np.float32) != 0):
            return "quant-zero-point", ("non-zero zero points (asymmetric quantization): TensorRT supports "
                                        f"symmetric quantization only; {REQUANTIZE}")
        if zp not in info.rooted:
            return "quant-zero-point", (f"zero point '{zp}' is computed at run time: TensorRT needs a build-time "
                                        "constant of zeros; drop the zero point (symmetric quantization)")
    return _scale_error(node, qtype, weights, info) if scale else None


def _scale_error(node, qtype, weights, info) -> tuple[str, str] | None:
    """Scale checks and the granularity they imply: per-tensor, per-channel (1-D) or blocked (same rank)."""
    x, scale = node.input[0], node.input[1]
    s = info.get(scale)
    if scale not in info.rooted:  # [H] "must be a build-time constant"
        return "quant-scale", f"scale '{scale}' is computed at run time: TensorRT needs build-time constant scales"
    if s.dtype is not None and s.dtype not in SCALE_TYPES:  # [Q] [PQ]
        return "quant-scale", (f"{TensorProto.DataType.Name(s.dtype)} scale: TensorRT takes FLOAT, FLOAT16 or "
                               "BFLOAT16 scales")
    xs = info.get(x).shape
    if s.shape is None or None in s.shape:
        return None
    size = int(np.prod(s.shape))
    if size == 1 or len(s.shape) == 1:  # per-tensor or per-channel
        kind = "per-tensor" if size == 1 else "per-channel"
        if qtype == TensorProto.INT4:  # [Q] "INT4 quantization requires per-block scales"
            return "quant-block", (f"{kind} INT4: TensorRT needs per-block INT4 scales (block size "
                                   f"{' or '.join(map(str, INT4_BLOCK_SIZES))}); {REQUANTIZE}")
        if kind == "per-channel" and not weights:  # [H]
            return "quant-axis", (f"per-channel scales on an activation ('{x}' is not a constant): TensorRT "
                                  "quantizes activations per-tensor only")
        axis = _attr(node, "axis", 1)
        if kind == "per-channel" and xs and -len(xs) <= axis < len(xs) and xs[axis] not in (None, *s.shape):
            return "quant-axis", (f"{s.shape[0]} scales for {xs[axis]} channels on axis {axis}: the scale count "
                                  "must equal the quantization axis' size")
        return None
    return _block_error(node, qtype, weights, xs, s.shape)


def _block_error(node, qtype, weights, xs, ss) -> tuple[str, str] | None:
    """Blocked quantization: [H] INT4 and 2-D weights only; [Q] block sizes {64, 128}; [PQ] one blocked dim,
    the block size inferred from the shapes."""
    tname = TensorProto.DataType.Name(qtype) if qtype else "?"
    if xs is not None and len(ss) != len(xs):
        return "quant-axis", (f"scale of rank {len(ss)} for a rank-{len(xs)} input: TensorRT takes a scalar, "
                              "1-D (per-channel) or same-rank (blocked) scale")
    if qtype != TensorProto.INT4:
        return "quant-block", (f"blocked {tname} quantization: TensorRT {TRT_VERSION} block-quantizes INT4 only; "
                               f"give {tname} one scale per channel (1-D scale)")
    if len(ss) != 2 or not weights:
        return "quant-block", (f"blocked INT4 on a rank-{len(ss)} tensor: TensorRT {TRT_VERSION} block-quantizes "
                               "2-D weights only")
    block = _attr(node, "block_size", 0)
    if xs is None or None in xs:
        return None if block in (0, *INT4_BLOCK_SIZES) else _block_size_error(block)
    blocked = [i for i in range(2) if xs[i] != ss[i]]
    if len(blocked) != 1:
        return "quant-block", (f"scale shape {list(ss)} for weights {list(xs)}: exactly one dimension must be "
                               "blocked")
    axis = blocked[0]
    if block and xs[axis] != block * ss[axis] and ss[axis] > 1:  # one block: the same in ONNX and TensorRT
        return "quant-block", (f"dimension {axis} has {xs[axis]} elements, not {ss[axis]} x block_size {block}: "
                               f"TensorRT infers the block size from the shapes; make it a multiple of {block}")
    if xs[axis] % ss[axis] or xs[axis] // ss[axis] not in INT4_BLOCK_SIZES:  # the block TensorRT infers
        return _block_size_error(block if block * ss[axis] == xs[axis] else f"{xs[axis]}/{ss[axis]}")
    if xs[-1] % 2:
        return "quant-block", f"INT4 weights with an odd last dimension ({xs[-1]}): TensorRT packs INT4 in pairs"
    return None


def _block_size_error(block) -> tuple[str, str]:
    return "quant-block", (f"block size {block}: TensorRT supports INT4 block sizes "
                           f"{' and '.join(map(str, INT4_BLOCK_SIZES))} only; {REQUANTIZE}")


def _scale_sign_error(node, info) -> tuple[str, str] | None:
    """[PQ] "Scale coefficients must all be positive" (checked on constant scales whose values are read)."""
    values = info.value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    bad = 0 if values is None else int(np.sum(~(values.astype(np.float32) > 0)))
    if not bad:
        return None
    return "quant-scale", (f"{bad} of {values.size} scales are <= 0 (ONNX Runtime's symmetric RTN maps each block's "
                           "signed extreme to -8, so it writes negative scales): TensorRT needs every scale > 0; "
                           "quantize with python -m export.quantize --target trt (positive scales)")


def _qdq_warning(node, qtype, weights, info) -> tuple[str, str] | None:
    """Q/DQ that builds, with a caveat: an implicit axis; weight-only dequantization ([Q] documented for INT4)."""
    scale = info.get(node.input[1]).shape if len(node.input) > 1 else None
    if _attr(node, "axis") is None and scale and any(d != 1 for d in scale):  # not per-tensor
        # [PQ] 10.1-GA: attrs.get<int32_t>("axis", inputDims.nbDims), then axis 0 for per-channel scales;
        # later parsers default to 1 as ONNX does. 10.3's default is not published.
        return "quant-axis", ("no axis attribute: ONNX means axis 1, but TensorRT 10.1's parser defaulted to "
                              "axis 0 for per-channel scales; write the axis explicitly")
    if node.op_type != "DequantizeLinear" or not weights:
        return None
    users = info.consumers.get(node.output[0], [])
    ops = sorted({n.op_type for n in users} - GEMM_OPS)
    if qtype == TensorProto.INT4 and ops:
        return "weight-only", (f"INT4 weights feed {', '.join(ops)}: TensorRT's INT4 weight-only quantization is "
                               "for GEMMs (MatMul/Gemm); elsewhere the weights are dequantized by a separate layer")
    weight_only = [n for n in users if n.op_type in GEMM_OPS
                   and not all(info.produced_by(i, "DequantizeLinear") for i in n.input[:2])]
    if qtype in (TensorProto.INT8, TensorProto.FLOAT8E4M3FN) and weight_only:
        name = QUANT_TYPES[qtype]
        return "weight-only", (f"{name} weight-only {weight_only[0].op_type}: TensorRT documents weight-only "
                               "quantization for INT4 only; with no Q/DQ on the activation the GEMM runs in float "
                               f"on dequantized weights (no {name} GEMM; memory saving not assured)")
    return None


def _check_qdq(node, opset, info, f) -> list:  # [export.check_trt.Finding]
    qtype = _quant_type(node, info)
    weights = node.input[0] in info.rooted
    errors = [e for e in (_qdq_error(node, qtype, weights, opset, info), _scale_sign_error(node, info)) if e]
    if errors:
        return [f("error", *e) for e in errors]
    found = _qdq_warning(node, qtype, weights, info)
    if not found and node.input[2:3] and node.input[2] and info.value(node.input[2]) is None:
        found = ("quant-zero-point", (f"zero point '{node.input[2]}' is in external data (not read here): "
                                      "TensorRT rejects the graph unless it is all zeros"))
    return [f("warning", *found)] if found else []


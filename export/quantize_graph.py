"""One stage graph through ONNX Runtime's weight-only quantizer (export/quantize.py runs it per stage).

    plan = plan_graph(onnx.load(path, load_external_data=False), "decoder", True, (), set())
    spec, files = quantize_graph(path, out_dir / "decoder.onnx", plan, Scheme(4, 32, False, "ort", 4))

The plan names the candidate nodes (MatMul / Gemm with a constant 2-D weight; Gather for the
embeddings) of the MAIN graph, the LM head and --exclude matches left in float, and the Gemm nodes
rewritten as MatMul so the quantizer sees them. Quantization is
`onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` with its default (RTN)
algorithm; it walks the main graph and its subgraphs, never ONNX functions, so dart::DartPruneSlots'
body is left as exported, which quantize_graph checks afterwards with the graph's interface and
metadata. onnx, onnxruntime and numpy only (no torch).
"""

from __future__ import annotations

import fnmatch
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runtime.manifest import QuantSpec

log = logging.getLogger("export.quantize")

ALGORITHM = "rtn"  # QuantSpec.algorithm: ORT's DefaultWeightOnlyQuantConfig, round to nearest
FORMATS = {"ort": "MatMulNBits", "trt": "QDQ"}  # QuantSpec.format per --target
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")  # QOperator outputs (QDQ: DequantizeLinear)
EXTERNAL_DATA_BYTES = 1 << 30  # a quantized graph whose weights reach this is saved with external data
QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"


class QuantizeError(RuntimeError):
    """A failure the user can act on (one line, exit 1, nothing written)."""


@dataclass(frozen=True)
class Scheme:
    """How weights are quantized (all resolved: no None defaults left)."""

    bits: int  # 4 or 8
    block_size: int  # weights per scale along the input dim
    symmetric: bool
    target: str  # "ort": com.microsoft.MatMulNBits; "trt": DequantizeLinear(int4) -> MatMul (QDQ)
    accuracy_level: int | None  # MatMulNBits only


@contextmanager
def _quiet_quantizer(verbose: bool):
    """onnxruntime 1.31/1.32's matmul_nbits_quantizer calls logging.basicConfig(level=INFO) when it is
    imported, which would configure the root logger of whoever imports us; a NullHandler on the root
    for the import makes that a no-op. Its per-node INFO lines are kept for -v, and so is its warning
    that it raises the opset to 21 for int4 types (expected: the QDQ form and int4 Gather need it).
    NumPy warns about 0/0 on all-zero blocks (e.g. a padding row of the embeddings), where the
    quantizer then picks 0."""
    import numpy as np

    root = logging.getLogger()
    guard = logging.NullHandler() if not root.handlers else None
    if guard:
        root.addHandler(guard)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401
    finally:
        if guard:
            root.removeHandler(guard)
    logging.getLogger(QUANTIZER_LOGGER).setLevel(logging.DEBUG if verbose else logging.ERROR)
    with np.errstate(divide="ignore", invalid="ignore"):
        yield


@dataclass(frozen=True)
class StagePlan:
    """What to do to one stage's graph: the node types handed to the quantizer, the Gemm nodes to
    rewrite as MatMul first, and the weight-bearing nodes left in float."""

    stage: str
    op_types: tuple[str, ...]  # ("MatMul",) or ("Gather",)
    gemms: tuple[str, ...]  # Gemm node names rewritten as MatMul (+ Add) before quantizing
    excluded: tuple[str, ...]  # candidate nodes left in float (LM head, --exclude)
    candidates: int  # weight-bearing nodes of op_types (Gemm included) in the graph


def _weights(graph) -> dict[str, object]:
    return {t.name: t for t in graph.initializer}


def candidate_nodes(graph, op_types: tuple[str, ...]) -> list:
    """Nodes of the main graph whose weight is a constant 2-D initializer: MatMul / Gemm (input 1) for
    ("MatMul",), Gather (input 0) for ("Gather",). Nodes inside functions are never candidates."""
    inits = _weights(graph)
    found = []
    for node in graph.node:
        if "Gather" in op_types and node.op_type == "Gather":
            w = node.input[0]
        elif "MatMul" in op_types and node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            w = node.input[1]
        else:
            continue
        if w in inits and len(inits[w].dims) == 2:
            found.append(node)
    return found


def lm_head(graph, output: str = "logits") -> str | None:
    """The MatMul / Gemm that produces the logits (through at most 8 single-path ops such as Cast or
    Reshape), or None."""
    producer = {o: n for n in graph.node for o in n.output}
    name = output
    for _ in range(8):
        node = producer.get(name)
        if node is None or not node.input:
            return None
        if node.op_type in ("MatMul", "Gemm"):
            return node.name
        name = node.input[0]
    return None


def _matches_names(node) -> tuple[str, str]:
    """(node name, weight name): what --exclude patterns are matched against."""
    return node.name, node.input[0] if node.op_type == "Gather" else node.input[1]


def _matches(node, patterns: tuple[str, ...]) -> list[str]:
    return [p for p in patterns if any(fnmatch.fnmatchcase(n, p) for n in _matches_names(node))]


def plan_graph(model, stage: str, lm_head_float: bool, exclude: tuple[str, ...], used: set[str]) -> StagePlan:
    """The plan for one stage graph (loaded without its weights): its candidates, the decoder's LM head
    left in float when `lm_head_float`, the nodes matching `exclude`; `used` collects the patterns
    that matched something."""
    op_types = ("Gather",) if stage == "embed_tokens" else ("MatMul",)
    nodes = candidate_nodes(model.graph, op_types)
    excluded = []
    if stage == "decoder" and lm_head_float:
        head = lm_head(model.graph)
        if head is None:
            raise QuantizeError("decoder: no MatMul / Gemm produces 'logits', so the LM head cannot be left "
                                "in float; pass --lm-head to quantize every linear layer")
        excluded.append(head)
    for node in nodes:
        hits = _matches(node, exclude)
        used.update(hits)
        if hits and node.name not in excluded:
            excluded.append(node.name)
    log.debug("%s: linear layers (node: weight): %s", stage,
              ", ".join(f"{n.name}: {_matches_names(n)[1]}" for n in nodes))
    gemms = tuple(n.name for n in nodes if n.op_type == "Gemm" and n.name not in excluded)
    if len(nodes) == len([n for n in nodes if n.name in excluded]):
        raise QuantizeError(f"{stage}: nothing left to quantize ({len(nodes)} linear layers, all excluded)")
    return StagePlan(stage, op_types, gemms, tuple(excluded), len(nodes))


# --- one graph -------------------------------------------------------------------------------------


def gemm_as_matmul(graph, names: tuple[str, ...]) -> None:
    """Rewrite each named Gemm(A, B[, C]) (transA 0, alpha 1, beta 1) with a constant B as MatMul(A, B or
    B^T) [+ Add(C)]: the same product, in the form ONNX Runtime's quantizer handles. The MatMul keeps
    the Gemm's name (--exclude and the manifest name it)."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = _weights(graph)
    nodes = []
    for node in graph.node:
        if node.name not in names:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        plain = not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0
        if not plain or (bias and attrs.get("beta", 1.0) != 1.0):
            raise QuantizeError(f"{node.name}: a Gemm with transA / alpha / beta is not a plain linear "
                                f"layer; leave it in float with --exclude {node.name}")
        w = numpy_helper.to_array(inits[node.input[1]])  # (N, K) with transB, else (K, N)
        w = np.ascontiguousarray(w.T if attrs.get("transB", 0) else w)  # (K, N)
        weight = numpy_helper.from_array(w, node.input[1] + "_as_matmul")
        graph.initializer.append(weight)
        out = node.output[0]
        product = out + "_as_matmul" if bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], weight.name], [product], name=node.name))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [out], name=node.name + "_bias"))
    graph.ClearField("node")
    graph.node.extend(nodes)


def _snapshot(model) -> dict[str, list[bytes]]:
    """What quantization must leave unchanged: functions, metadata, graph inputs and outputs."""
    functions = []
    for f in model.functions:
        copy = type(f)()
        copy.CopyFrom(f)
        del copy.opset_import[:]  # (follows the model's opset: _align_function_opsets)
        functions.append(copy.SerializeToString(deterministic=True))
    return {"functions": functions,
            "metadata_props": [p.SerializeToString() for p in model.metadata_props],
            "inputs": [v.SerializeToString() for v in model.graph.input],
            "outputs": [v.SerializeToString() for v in model.graph.output]}


def count_quantized(model) -> int:
    """Nodes holding quantized weights: MatMulNBits / GatherBlockQuantized, or a DequantizeLinear of
    an int4 / uint4 initializer (QDQ)."""
    from onnx import TensorProto

    int4 = {t.name for t in model.graph.initializer if t.data_type in (TensorProto.INT4, TensorProto.UINT4)}
    return sum(1 for n in model.graph.node
               if n.op_type in QUANTIZED_OPS or (n.op_type == "DequantizeLinear" and n.input[0] in int4))


def _align_function_opsets(model) -> None:
    """A function's default-domain opset must equal the model's (docs: DESIGN constraints). The QDQ
    form (and int4 Gather) raises the model to opset 21; DartPruneSlots' body (Cast, Shape, Reshape,
    Unsqueeze, TopK, ScatterElements, ...) means the same at 18 and 21 for its types (the versions
    in between add types, Cast's saturate for float8 and Pad's wrap mode), so its import follows."""
    model_version = {o.domain or "": o.version for o in model.opset_import}.get("", None)
    for f in model.functions:
        for o in f.opset_import:
            if o.domain in ("", "ai.onnx") and model_version is not None:
                o.version = model_version


def positive_scales(model) -> int:
    """Make every blocked int4 DequantizeLinear scale positive; returns the blocks changed.

    ONNX Runtime's symmetric RTN (1.31/1.32, quant_slice_symmetric and its C++ twin) maps each
    block's signed extreme to -8, so a block whose largest-magnitude weight is positive gets a
    negative scale. onnx-tensorrt's DequantizeLinear importer refuses that ("Scale coefficients must
    all be positive"; export/check_trt_quant.py rule quant-scale). Negating such a block's scale and
    codes gives the same weights, except that the code -8 (the positive extreme) would become +8,
    which int4 cannot hold: it becomes 7, moving that one weight per block by one step (1/8 of the
    block's largest magnitude). This changes ORT's output format, not its rounding."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[1] not in inits:
            continue
        q_init, s_init = inits[node.input[0]], inits[node.input[1]]
        if q_init.data_type != TensorProto.INT4:
            continue
        block = next(a.i for a in node.attribute if a.name == "block_size")
        q = numpy_helper.to_array(q_init).astype(np.int8)  # (K, N) codes in [-8, 7]
        scales = numpy_helper.to_array(s_init)  # (K / block, N)
        flip = scales < 0
        if not flip.any():
            continue
        rows = np.repeat(flip, block, axis=0)[: q.shape[0]]  # (K, N): the rows of each flipped block
        q = np.where(rows, np.minimum(-q, 7), q)
        q_init.CopyFrom(numpy_helper.from_array(q.astype(numpy_helper.to_array(q_init).dtype), q_init.name))
        positive = np.where(flip, -scales, scales).astype(scales.dtype)
        s_init.CopyFrom(numpy_helper.from_array(positive, s_init.name))
        changed += int(flip.sum())
    return changed


def _has_external_data(model) -> bool:
    from onnx import TensorProto

    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def save_graph(model, dst: Path, external: bool) -> list[str]:
    """Save `model` as dst (+ dst.name + ".data", one file, when `external`); the names written."""
    import onnx

    if not external:
        onnx.save_model(model, str(dst))
        return [dst.name]
    data = dst.name + ".data"
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024, convert_attribute=False)
    return [dst.name, data]


def _read_external_data(model, base: Path) -> None:
    """Read every initializer's external data into raw_data. Not onnx.load's own reader: onnx 1.23
    refuses a data file with several hard links ("potential hardlink attack"), and hard-linked
    engine directories (`cp -al` copies, backups) are legitimate here; the locations were already
    checked to lie inside the engine directory and be listed in the manifest (read_manifest), and
    are checked again here."""
    from onnx import TensorProto

    root = base.resolve()
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        path = (base / info["location"]).resolve()
        if root not in path.parents:
            raise QuantizeError(f"{t.name}: external data {info['location']!r} lies outside {base}; re-export")
        offset, length = int(info.get("offset", 0)), info.get("length")
        with open(path, "rb") as f:
            f.seek(offset)
            t.raw_data = f.read(int(length)) if length is not None else f.read()
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT


def quantize_graph(src: Path, dst: Path, plan: StagePlan, scheme: Scheme,
                   verbose: bool = False) -> tuple[QuantSpec, list[str]]:
    """Quantize one stage graph (src, its external data beside it) into dst; returns its QuantSpec and
    the file names written. Raises QuantizeError when the result changed what it must not."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    external = _has_external_data(model)
    _read_external_data(model, src.parent)  # weights in memory: the quantizer reads them as numpy
    before = _snapshot(model)
    gemm_as_matmul(model.graph, plan.gemms)
    with _quiet_quantizer(verbose):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        from onnxruntime.quantization.quant_utils import QuantFormat

        fmt = QuantFormat.QOperator if scheme.target == "ort" else QuantFormat.QDQ
        quantizer = MatMulNBitsQuantizer(model, bits=scheme.bits, block_size=scheme.block_size,
                                         is_symmetric=scheme.symmetric, accuracy_level=scheme.accuracy_level,
                                         nodes_to_exclude=list(plan.excluded), quant_format=fmt,
                                         op_types_to_quantize=plan.op_types)
        quantizer.process()
    out = quantizer.model.model
    del model, quantizer
    after = _snapshot(out)
    changed = [k for k in before if before[k] != after[k]]
    if changed:
        raise QuantizeError(f"{src.name}: quantization changed the graph's {changed[0]} (dart::DartPruneSlots, "
                            "metadata and the interface must stay as exported); report it with this "
                            "onnxruntime version")
    _align_function_opsets(out)
    if scheme.target == "trt":
        log.debug("%s: %d int4 blocks given positive scales", plan.stage, positive_scales(out))
    nodes = count_quantized(out)
    if nodes == 0:
        raise QuantizeError(f"{src.name}: the quantizer quantized no node (weights not 2-D constants?)")
    if nodes < plan.candidates - len(plan.excluded):
        log.warning("%s: %d of %d linear layers quantized (the quantizer skipped the rest; -v says why)",
                    plan.stage, nodes, plan.candidates - len(plan.excluded))
    weight_bytes = sum(len(t.raw_data) for t in out.graph.initializer)
    files = save_graph(out, dst, external or weight_bytes >= EXTERNAL_DATA_BYTES)
    spec = QuantSpec(bits=scheme.bits, block_size=scheme.block_size, symmetric=scheme.symmetric,
                     algorithm=ALGORITHM, nodes=nodes,
                     format="GatherBlockQuantized" if "MatMul" not in plan.op_types else FORMATS[scheme.target],
                     accuracy_level=scheme.accuracy_level if "MatMul" in plan.op_types else None,
                     excluded=plan.excluded)
    return spec, files

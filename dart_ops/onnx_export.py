"""Glue between `torch.onnx.export` and the DartPruneSlots ONNX op.

We export with the dynamo exporter (`torch.onnx.export(..., dynamo=True)`): the TorchScript
exporter (`dynamo=False`) is deprecated in torch 2.9+, and the dynamo exporter's
`custom_translation_table` maps our custom op `torch.ops.dart.prune` to exactly one
`dart::DartPruneSlots` node (dart_ops/onnx_op_slots.py). Its output length is the last dimension
of its `kept_slots` input, so the graph after it is dynamic in an ordinary input axis ("kept").
The HF attention must be "eager" for export (SDPA's GQA path guards on the pruned length).

`exporting()` registers the op's schema for the export only. After export, `attach_dart_function`
ships the op's body as a model-local function, so ONNX Runtime and TensorRT's parser run the model
with no plugin, and sets the IR version ONNX Runtime 1.31 accepts.
"""

from __future__ import annotations

import contextlib

import onnx
from onnx.defs import OpSchema

from dart_ops import onnx_op_slots as slots
from dart_ops import spec
from dart_ops.onnx_op import IR_VERSION

INTS = ["tensor(int32)", "tensor(int64)"]


def register_schema() -> bool:
    """Register DartPruneSlots' signature with onnx (idempotent), so onnxscript, which the dynamo
    exporter uses to build the graph, can emit the node. True when this call registered it."""
    if onnx.defs.has(slots.OP_NAME, spec.OP_VERSION, spec.OP_DOMAIN):
        return False
    formal = OpSchema.FormalParameter
    schema = OpSchema(
        slots.OP_NAME,
        spec.OP_DOMAIN,
        spec.OP_VERSION,
        inputs=[
            formal("hidden", "T"),
            formal("keys", "T"),
            formal("span_start", "I"),
            formal("span_len", "I"),
            formal("quota", "I"),
            formal("kept_slots", "K"),
        ],
        outputs=[formal("keep", "tensor(int64)")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "hidden and keys"),
                          ("I", INTS, "span and quota scalars"),
                          ("K", INTS, "kept_slots (only its last dimension is read)")],
        attributes=[
            OpSchema.Attribute("pivots_image", OpSchema.AttrType.INT, "image pivots"),
            OpSchema.Attribute("pivots_text", OpSchema.AttrType.INT, "text pivots"),
        ],
    )
    onnx.defs.register_schema(schema)
    return True


@contextlib.contextmanager
def exporting():
    """`with exporting() as table: torch.onnx.export(..., custom_translation_table=table)`: the
    translation table, with DartPruneSlots' schema registered only for the export. The schema
    pins the output to int64 (what the decoder's op emits); left registered, onnx's checker would
    refuse a standalone int32 DartPruneSlots model (dart_ops.onnx_op_slots) checked afterwards in
    the same process, whose function body is its real definition."""
    added = register_schema()
    try:
        yield translation_table()
    finally:
        if added:
            onnx.defs.deregister_schema(slots.OP_NAME, spec.OP_VERSION, spec.OP_DOMAIN)


def translation_table() -> dict:
    """`custom_translation_table` for torch.onnx.export: dart::prune -> one dart::DartPruneSlots node."""
    import torch
    from onnxscript.values import Opset

    import dart_ops.torch_op  # noqa: F401  (registers torch.ops.dart.prune)

    register_schema()
    dart = Opset(spec.OP_DOMAIN, spec.OP_VERSION)

    def dart_prune(hidden, keys, span_start, span_len, quota, kept_slots, pivots_image: int, pivots_text: int):
        return dart.DartPruneSlots(hidden, keys, span_start, span_len, quota, kept_slots,
                                   pivots_image=pivots_image, pivots_text=pivots_text)

    return {torch.ops.dart.prune.default: dart_prune}


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("model imports no default-domain opset")


def attach_dart_function(model: onnx.ModelProto, max_pivots: int = spec.MAX_PIVOTS,
                         max_span: int = spec.MAX_SPAN) -> onnx.ModelProto:
    """Add DartPruneSlots' function (matching the model's opset, sized by max_pivots / max_span,
    see dart_prune_slots_function) and the `dart` opset import if the graph uses the op; set the IR
    version ONNX Runtime accepts. Modifies and returns `model`."""
    uses_op = any(n.domain == spec.OP_DOMAIN and n.op_type == slots.OP_NAME for n in model.graph.node)
    if uses_op:
        if not any(f.domain == spec.OP_DOMAIN and f.name == slots.OP_NAME for f in model.functions):
            model.functions.append(slots.dart_prune_slots_function(default_opset(model), max_pivots, max_span))
        if not any(e.domain == spec.OP_DOMAIN for e in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(spec.OP_DOMAIN, spec.OP_VERSION))
    model.ir_version = min(model.ir_version, IR_VERSION)
    return model

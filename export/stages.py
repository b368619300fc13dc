"""One export function per stage, each wrapping one module with its own dynamic dims.

Names, dims and dynamic shapes come from the family's stage declaration (export/declare.py); this
file only chooses the text stages' tracing sizes (EXAMPLE_SIZES, EXAMPLE_VALUES); the vision stage
is traced on the family's example (Family.vision_examples).

All three use the dynamo exporter (see dart_ops/onnx_export.py for why); the decoder carries one
dart::DartPruneSlots node whose function is attached afterwards. Example inputs use batch 2 (batch 1
would be specialised away) and lengths that are not 0 or 1.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import onnx
import torch

from dart_ops.decoder import kept_len
from dart_ops.onnx_export import attach_dart_function, exporting
from dart_ops.spec import MAX_SPAN
from export.axes import EXAMPLE_SEQ, Axis
from export.declare import StageDecl, dynamic_shapes, example_inputs

log = logging.getLogger(__name__)

# Weights above this many bytes go to "<stage>.onnx.data" (protobuf files stop at 2 GiB).
EXTERNAL_DATA_BYTES = 64 << 20
EXAMPLE_BATCH = 2


@contextlib.contextmanager
def eager_attention(model):
    """Export-time patch, reverted on exit: HF attention -> "eager" for every sub-config.

    Why: SDPA's GQA path (transformers 5.x, sdpa_attention.py) guards on the query length, which
    after DartPruneSlots is the dynamic "kept" axis, and the TorchScript exporter cannot export enable_gqa.
    """
    subs = getattr(model.config, "sub_configs", None) or {}  # HF composite configs (vision, text)
    configs = [c for c in [model.config, *[getattr(model.config, n, None) for n in subs]] if c]
    old = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o


def _save(model: onnx.ModelProto, path: Path, force_external: bool) -> list[str]:
    """Save `model` to `path`; returns the file names written (relative to path's folder)."""
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if force_external or size > EXTERNAL_DATA_BYTES:
        data = path.name + ".data"
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data, size_threshold=1024)
        return [path.name, data]
    onnx.save(model, str(path))
    return [path.name]


def _export(module, args, dynamic_shapes, input_names, output_names, opset, **dart_sizes) -> onnx.ModelProto:
    with exporting() as table:
        prog = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
            input_names=input_names, output_names=output_names,
            custom_translation_table=table, verbose=False,
        )
    model = attach_dart_function(prog.model_proto, **dart_sizes)
    onnx.checker.check_model(model, full_check=False)
    return model


# Tracing sizes of the text stages (axis -> size) and the decoder's scalar inputs; the vision stage
# is traced on the family's own example (Family.vision_examples). Validation (export/validate.py)
# runs other sizes. The past dims trace empty: the example is a prefill.
EXAMPLE_SIZES = {
    "embed_tokens": {"batch": EXAMPLE_BATCH, "seq": 17},
    "decoder": {"batch": EXAMPLE_BATCH, "seq": EXAMPLE_SEQ, "past_full": 0, "past_kept": 0},
}
# quota 1 prunes for any pivot count (<= MAX_PIVOTS = 16 kept + 16 harvested < 60), so the traced kept
# length differs from seq: equal sizes could let the tracer merge the two axes.
EXAMPLE_VALUES = {"decoder": {"span_start": 10, "span_len": 60, "quota": 1}}


def _export_decl(module, decl: StageDecl, axes: dict[str, Axis], opset: int, nest=None, args=None,
                 **dart_sizes):
    """Trace `module` on `args` (default: the declaration's example inputs at EXAMPLE_SIZES) with the
    declared dynamic shapes; `nest` regroups the flat per-input lists into the module's arguments."""
    nest = nest or tuple
    if args is None:
        args = example_inputs(decl, example_sizes(decl.name, module), EXAMPLE_VALUES.get(decl.name))
    shapes = dynamic_shapes(decl, axes)
    names = decl.input_names(), decl.output_names()
    return _export(module, nest(list(args)), nest(shapes), *names, opset, **dart_sizes)


def example_sizes(stage: str, module) -> dict[str, int]:
    """EXAMPLE_SIZES of a text stage; the decoder's "kept" (kept_slots' length) is the pruned length
    of the EXAMPLE_VALUES prompt for this decoder's pivots (what the eager op requires)."""
    sizes = dict(EXAMPLE_SIZES[stage])
    if stage == "decoder":
        v, dec = EXAMPLE_VALUES[stage], module.decoder
        sizes["kept"] = kept_len(sizes["seq"], v["span_start"], v["span_len"], v["quota"], dec.pivots_image,
                                 dec.pivots_text)
    return sizes


def export_vision_encoder(module, decl: StageDecl, axes: dict[str, Axis], opset: int, out: Path, example):
    """`example`: the family's tracing inputs (torch tensors in the declaration's order)."""
    model = _export_decl(module, decl, axes, opset, args=example)
    return _save(model, out / decl.file, force_external=False)


class EmbedTokens(torch.nn.Module):
    """The embed_tokens stage of every family: the HF model's input embedding, (B, S) ids -> (B, S, D)."""

    def __init__(self, hf):
        super().__init__()
        self.embed = hf.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


def export_embed_tokens(module, decl: StageDecl, axes: dict[str, Axis], opset: int, out: Path):
    model = _export_decl(module, decl, axes, opset)
    return _save(model, out / decl.file, force_external=False)


def dart_sizes(flat, image_seq_len: int) -> dict:
    """DartPruneSlots' body sized to this model: one unrolled step per configured pivot, spans up to
    the vision tokens of one image plus the pivot count, so the +inf padding is never empty (an
    empty tensor is one more thing for TensorRT's parser to get right). The manifest records
    max_span; the runtime refuses longer spans."""
    P = max(1, flat.decoder.pivots_image + flat.decoder.pivots_text)
    return {"max_pivots": P, "max_span": min(MAX_SPAN, image_seq_len + P)}


def export_decoder(flat, decl: StageDecl, axes: dict[str, Axis], opset: int, out: Path, sizes: dict):
    dec = flat.decoder
    if decl.input_names() != flat.input_names() or decl.output_names() != flat.output_names():
        raise ValueError(f"decoder: declared tensors {decl.input_names()} -> {decl.output_names()} differ "
                         f"from the module's {flat.input_names()} -> {flat.output_names()}")
    nest = lambda xs: (*xs[:6], tuple(xs[6:]))  # forward(embeds, pos, start, len, quota, kept_slots, past)
    model = _export_decl(flat, decl, axes, opset, nest, **sizes)
    set_metadata(model, {
        "dart.layer": dec.layer, "dart.pivots_image": dec.pivots_image, "dart.pivots_text": dec.pivots_text,
        "dart.max_pivots": sizes["max_pivots"], "dart.max_span": sizes["max_span"],
    })
    return _save(model, out / decl.file, force_external=True)


def set_metadata(model: onnx.ModelProto, props: dict) -> None:
    """ONNX metadata_props the runtime checks the manifest against (what the graph was built for:
    DartPruneSlots' layer and body sizes; ONNX Runtime exposes them as custom_metadata_map)."""
    for key, value in props.items():
        entry = next((e for e in model.metadata_props if e.key == key), None) or model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def decoder_dims(flat) -> dict:
    """The manifest's "decoder" sizes, from the family's text adapter (HF config, checked against
    the modules)."""
    return flat.decoder.text.kv_dims()


def timed(stage: str, fn, *args):
    t0 = time.perf_counter()
    files = fn(*args)
    log.info("%s: exported in %.1f s -> %s", stage, time.perf_counter() - t0, ", ".join(files))
    return files

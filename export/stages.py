"""One export function per stage, each wrapping one module with its own dynamic dims.

All three use the dynamo exporter (see dart_ops/onnx_export.py for why); the decoder carries one
dart::DartPrune node whose function is attached afterwards. Example inputs use batch 2 (batch 1
would be specialised away) and lengths that are not 0 or 1.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import onnx
import torch

from dart_ops.onnx_export import attach_dart_function, translation_table
from dart_ops.spec import MAX_SPAN
from export.axes import EXAMPLE_SEQ, Axis, torch_dim

log = logging.getLogger(__name__)

# Weights above this many bytes go to "<stage>.onnx.data" (protobuf files stop at 2 GiB).
EXTERNAL_DATA_BYTES = 64 << 20
EXAMPLE_BATCH = 2


@contextlib.contextmanager
def eager_attention(model):
    """Export-time patch, reverted on exit: HF attention -> "eager" for every sub-config.

    Why: SDPA's GQA path (transformers 5.x, sdpa_attention.py) guards on the query length, which
    after DartPrune is data-dependent, and the TorchScript exporter cannot export enable_gqa.
    """
    configs = [c for c in [model.config, *[getattr(model.config, n, None) for n in model.config.sub_configs]] if c]
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
    prog = torch.onnx.export(
        module, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
        input_names=input_names, output_names=output_names,
        custom_translation_table=translation_table(), verbose=False,
    )
    model = attach_dart_function(prog.model_proto, **dart_sizes)
    onnx.checker.check_model(model, full_check=False)
    return model


def export_vision_encoder(module, image_size: int, axes: dict[str, Axis], dtype, opset: int, out: Path):
    pixels = torch.randn(EXAMPLE_BATCH, 3, image_size, image_size, dtype=dtype)
    model = _export(module, (pixels,), ({0: torch_dim(axes["batch"])},),
                    ["pixel_values"], ["image_features"], opset)
    return _save(model, out / "vision_encoder.onnx", force_external=False)


def export_embed_tokens(module, axes: dict[str, Axis], opset: int, out: Path):
    ids = torch.randint(0, 10, (EXAMPLE_BATCH, 17))
    model = _export(module, (ids,), ({0: torch_dim(axes["batch"]), 1: torch_dim(axes["seq"])},),
                    ["input_ids"], ["inputs_embeds"], opset)
    return _save(model, out / "embed_tokens.onnx", force_external=False)


def decoder_example(flat, dims: dict, dtype, seq: int = EXAMPLE_SEQ, span=(10, 60), quota: int = 3):
    """Example prefill inputs for the FlatDecoder (batch 2, empty past)."""
    dec = flat.decoder
    past = tuple(
        torch.zeros(EXAMPLE_BATCH, dims["num_kv_heads"], 0, dims["head_dim"], dtype=dtype)
        for _ in range(2 * dec.num_layers)
    )
    return (
        torch.randn(EXAMPLE_BATCH, seq, dims["hidden_size"], dtype=dtype),
        torch.arange(seq).expand(EXAMPLE_BATCH, seq),
        torch.tensor(span[0]), torch.tensor(span[1]), torch.tensor(quota),
        past,
    )


def dart_sizes(flat, image_seq_len: int) -> dict:
    """DartPrune's body sized to this model: one unrolled step per configured pivot, spans up to
    the vision tokens of one image plus the pivot count, so the +inf padding is never empty (an
    empty tensor is one more thing for TensorRT's parser to get right). The manifest records
    max_span; the runtime refuses longer spans."""
    P = max(1, flat.decoder.pivots_image + flat.decoder.pivots_text)
    return {"max_pivots": P, "max_span": min(MAX_SPAN, image_seq_len + P)}


def export_decoder(flat, dims: dict, axes: dict[str, Axis], dtype, sizes: dict, opset: int, out: Path):
    dec = flat.decoder
    B, S = torch_dim(axes["batch"]), torch_dim(axes["seq"])
    low, high = torch_dim(axes["past_full"]), torch_dim(axes["past_kept"])
    kv = tuple({0: B, 2: low if i < 2 * dec.layer else high} for i in range(2 * dec.num_layers))
    model = _export(flat, decoder_example(flat, dims, dtype), ({0: B, 1: S}, {0: B, 1: S}, None, None, None, kv),
                    flat.input_names(), flat.output_names(), opset, **sizes)
    set_metadata(model, {
        "dart.layer": dec.layer, "dart.pivots_image": dec.pivots_image, "dart.pivots_text": dec.pivots_text,
        "dart.max_pivots": sizes["max_pivots"], "dart.max_span": sizes["max_span"],
    })
    return _save(model, out / "decoder.onnx", force_external=True)


def set_metadata(model: onnx.ModelProto, props: dict) -> None:
    """ONNX metadata_props the runtime checks the manifest against (what the graph was built for:
    DartPrune's layer and body sizes; ONNX Runtime exposes them as custom_metadata_map)."""
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

"""Dynamic axes, declared once by name with min/opt/max. ONNX dynamic shapes, the manifest (and
from it TensorRT profiles and runtime checks) all derive from this one declaration. The Axis is
the manifest schema's (runtime/manifest.py); `torch_dim` is its export-time form."""

from __future__ import annotations

from runtime.manifest import Axis

__all__ = ["EXAMPLE_SEQ", "VALIDATION_TEXT", "Axis", "declare", "min_seq", "torch_dim"]

# The decoder is traced with a prompt of EXAMPLE_SEQ tokens (export.stages.EXAMPLE_SIZES) and
# validated on one with VALIDATION_TEXT text tokens around a full image (export.validate): the
# seq axis must reach both, or the export fails after minutes with an exporter error.
EXAMPLE_SEQ = 100
VALIDATION_TEXT = (7, 23)


def min_seq(image_seq_len: int) -> int:
    """The smallest --max-seq an export of a model with `image_seq_len` vision tokens accepts."""
    return max(EXAMPLE_SEQ, image_seq_len + sum(VALIDATION_TEXT))


def torch_dim(axis: Axis):
    """torch.export.Dim of an axis (its name, min and max)."""
    import torch

    # torch.export cannot mark 0 as a lower bound for every op; it is fine for the past dims.
    return torch.export.Dim(axis.name, min=axis.min, max=axis.max)


def declare(max_batch: int, max_seq: int, max_context: int, vision: dict[str, Axis], max_span: int,
            dart) -> dict[str, Axis]:
    """Every axis of an export: the family's vision axes (`vision`, which must hold "vision_tokens",
    the per-image vision-token count, and names the vision stage's own axes: images, crops,
    patches...), the text axes batch, seq (prompt or step length), past_full (KV of layers < K),
    past_kept (layers >= K) and kept (the decoder's pruned length S', the last dim of kept_slots;
    a decode step has kept = seq = 1). opt values are those of a prompt of seq.opt tokens with one
    image of vision_tokens.opt tokens at index 5, pruned by `dart` (the export's
    dart_ops.spec.DartConfig). No axis bounds an input's VALUES: no graph input is a shape tensor
    (docs/TENSORRT_10.3.md section 4)."""
    if max_seq > max_context:
        raise ValueError(f"max seq {max_seq} exceeds max context {max_context}")
    if "vision_tokens" not in vision:
        raise ValueError(f"the family's vision axes {sorted(vision)} lack 'vision_tokens'")
    n = vision["vision_tokens"].opt
    opt_seq = min(max_seq, n + 64)
    span = min(n, max_span, max(opt_seq - 6, 0))
    kept = dart.counts(span, opt_seq - 5 - span).kept_len(opt_seq)
    ranges = {"batch": (1, 1, max_batch), "seq": (1, opt_seq, max_seq), "past_full": (0, opt_seq, max_context),
              "past_kept": (0, min(opt_seq, 128), max_context), "kept": (1, kept, max_seq)}
    clash = sorted(vision.keys() & ranges.keys())
    if clash:
        raise ValueError(f"the family's vision axes redeclare {clash}")
    return {**{name: Axis(a.min, a.opt, a.max, name) for name, a in vision.items()},
            **{name: Axis(lo, opt, hi, name) for name, (lo, opt, hi) in ranges.items()}}

"""DART as a PyTorch custom op, `torch.ops.dart.prune`.

Eagerly it runs the reference selection (canonical pivot order). For export it is one opaque node
whose output length S' is the last dimension of its input `kept_slots` (the caller computes S'
from dart_ops.spec before the call; the op's values are never read), so the length after pruning is
an ordinary input dimension, not a data-dependent size. dart_ops.onnx_export translates the node
into one `dart::DartPruneSlots` ONNX node (dart_ops.onnx_op_slots) and ships its function body with
the model: no graph input's value decides a shape (TensorRT 10.3 has no shape-tensor inputs to set,
docs/TENSORRT_10.3.md section 4).
"""

from __future__ import annotations

import torch

from dart_ops.reference import select_keep


@torch.library.custom_op("dart::prune", mutates_args=())
def dart_prune(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    span_start: torch.Tensor,
    span_len: torch.Tensor,
    quota: torch.Tensor,
    kept_slots: torch.Tensor,
    pivots_image: int,
    pivots_text: int,
) -> torch.Tensor:
    """(B, S, D) normed hidden, (B, S, F) keys, integer scalars, (B, S') kept_slots -> (B, S') kept
    indices, ascending (int64). S' must be the kept length the counts give (ValueError otherwise: the
    exported op cannot check it, dart_ops.onnx_op_slots, so the eager op does)."""
    keep = select_keep(
        hidden,
        keys,
        int(span_start),
        int(span_len),
        int(quota),
        pivots_image=pivots_image,
        pivots_text=pivots_text,
    )
    if keep.shape[1] != kept_slots.shape[-1]:
        raise ValueError(f"dart::prune: kept_slots has {kept_slots.shape[-1]} slots but DART keeps {keep.shape[1]} "
                         f"tokens (S={hidden.shape[1]}, span [{int(span_start)}, +{int(span_len)}), quota "
                         f"{int(quota)}): size it with dart_ops.spec.kept_len")
    return keep


@dart_prune.register_fake
def _dart_prune_fake(hidden, keys, span_start, span_len, quota, kept_slots, pivots_image, pivots_text):
    return hidden.new_empty((hidden.shape[0], kept_slots.shape[-1]), dtype=torch.long)

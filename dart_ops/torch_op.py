"""DART as a PyTorch custom op, `torch.ops.dart.prune`.

Eagerly it runs the reference selection (canonical pivot order). For export it is one opaque node
with a fake kernel whose output length is data-dependent (an unbacked size, bounded by the
sequence length); dart_ops.onnx_op translates that node into one `dart::DartPrune` ONNX node and
ships its function body with the model.
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
    pivots_image: int,
    pivots_text: int,
) -> torch.Tensor:
    """(B, S, D) normed hidden, (B, S, F) keys, int64 scalars -> (B, S') kept indices, ascending."""
    return select_keep(
        hidden,
        keys,
        int(span_start),
        int(span_len),
        int(quota),
        pivots_image=pivots_image,
        pivots_text=pivots_text,
    )


@dart_prune.register_fake
def _dart_prune_fake(hidden, keys, span_start, span_len, quota, pivots_image, pivots_text):
    kept = torch.library.get_ctx().new_dynamic_size()
    torch._check(kept >= 1)
    torch._check(kept <= hidden.shape[1])
    return hidden.new_empty((hidden.shape[0], kept), dtype=torch.long)

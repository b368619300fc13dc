"""What every family's vision stage shares: the declaration of its graph's tensors (`VisionIO`) and
the one row gather its index inputs feed (`gather_rows`).

Every index input of a vision graph (Qwen's position ids and window tables, LLaVA-NeXT's pack index)
is int32 and reaches an ONNX Gather directly, with no Cast: TensorRT 10.3's parser casts int64
Gather indices on non-int64 data to int32 ([P] onnxOpImporters.cpp 1935-1939), and its Gather layer
takes int32 natively ([H] NvInfer.h 2562); docs/TENSORRT_10.3.md sections 3 and 7. `gather_rows` is
an embedding lookup because plain indexing (`x[index]`) exports as Unsqueeze + GatherND, whose ONNX
indices must be int64 (section 6), and torch.index_select's ONNX translation inserts a Cast to int64
before its Gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["VisionIO", "gather_rows"]


@dataclass(frozen=True)
class VisionIO:
    """The vision graph's tensors: (name, dtype, dims) per input in order and for the output. dims:
    ints, or the family's axis names (Qwen: "patches" N, "merged" M = N / merge**2, "windows" Wn;
    LLaVA-NeXT: "crops", "vision_tokens")."""

    inputs: tuple[tuple[str, str, tuple[int | str, ...]], ...]
    output: tuple[str, str, tuple[int | str, ...]]

    def input_names(self) -> list[str]:
        return [name for name, _, _ in self.inputs]


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] along dim 0 for int32 (or int64) indices of any shape: (R, *rest) -> (*index.shape,
    *rest). Exported as one ONNX Gather on the index itself (torch's embedding translation adds no Cast),
    so an int32 graph input reaches TensorRT's Gather as int32 (module docstring)."""
    rows = F.embedding(index, table.reshape(table.shape[0], -1))  # (*index.shape, prod(rest))
    return rows.reshape(*index.shape, *table.shape[1:])

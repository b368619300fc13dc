"""Qwen2-VL / Qwen2.5-VL vision stage: one still image per call, exportable with the number of
patches and (2.5) of windows dynamic.

HF's own vision forward cannot be exported that way: it loops in Python over the window lengths
(`lengths.tolist()` in VisionAttention) and un-permutes with `argsort` (a TopK with a data-dependent
K for TensorRT); see notes/families.md section 1 and pitfalls 1-3. These wrappers run the same
submodules and weights (patch_embed, rotary_pos_emb, each block's norm1/norm2/attn.qkv/attn.proj/mlp,
merger) and HF's own eager attention math, and take what transformers derives from grid_thw as
inputs computed in numpy (runtime/qwen_vision.py):

    Qwen2-VL    pixel_values [N, 1176], vision_position_ids [N, 2] -> image_features [M, D]
    Qwen2.5-VL  + window_index [M], reverse_index [M], win_gather [Wn, P], win_valid [Wn, P],
                  win_unpad [N]                                       -> image_features [M, D]

N = 4 M patches (merge 2), M merged tokens, Wn windows, P = 64 patches per full window. With one
image per call (t = 1) Qwen2-VL attention, and Qwen2.5-VL's fullatt_block_indexes blocks, are full
attention over the image. Qwen2.5-VL's window blocks gather q, k, v into padded windows
[Wn, H, P, dh], mask the padding keys and gather the P-slot rows back with win_unpad: Gathers only,
O(N * P) work.

Every index input is int32 and every row gather here is export.families.vision_io.gather_rows (one
ONNX Gather on the int32 index, no Cast; that module says why). vision_position_ids is only cast to
float (HF's rotary angles).

Dynamic axes: "patches" (N), "merged" (M) and "windows" (Wn), one torch.export.Dim each as
export/declare.py makes them. N = merge**2 * M always holds (the runtime computes both from the
grid). torch.export.export alone rejects independent patches/merged Dims (the merger's reshape
guards on N % 4 == 0: "Constraints violated (patches)! ... Suggested fixes: patches = 4*_patches");
torch.onnx.export(dynamo=True) applies that suggested fix itself and keeps the axis names.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from export.families.vision_io import VisionIO, gather_rows
from runtime.manifest import INDEX_DTYPE
from runtime.qwen_vision import QwenVisionConfig, vision_inputs

__all__ = ["QWEN_VISION_MODULES", "Qwen2VisionStage", "Qwen25VisionStage", "VisionIO", "example_inputs",
           "make_stage", "stage_io", "torch_dynamic_shapes", "vision_config"]

# model_type -> the transformers module holding the vision tower's eager attention and rotary helper.
QWEN_VISION_MODULES = {
    "qwen2_vl": "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "qwen2_5_vl": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
}


def vision_config(hf_config) -> QwenVisionConfig:
    """The runtime's QwenVisionConfig from a Qwen2VLConfig / Qwen2_5_VLConfig (model.config)."""
    kind = hf_config.model_type
    if kind not in QWEN_VISION_MODULES:
        raise ValueError(f"model_type {kind!r} is not a Qwen2-VL / Qwen2.5-VL model")
    v = hf_config.vision_config
    extra = {"window_size": v.window_size} if kind == "qwen2_5_vl" else {}
    return QwenVisionConfig(kind=kind, patch=v.patch_size, merge=v.spatial_merge_size,
                            temporal=v.temporal_patch_size, channels=v.in_channels, **extra)


class _VisionStage(nn.Module):
    """Shared parts: HF's patch embedding, rotary table, blocks and merger (no weights of its own)."""

    def __init__(self, visual: nn.Module, kind: str):
        super().__init__()
        self.visual = visual
        self.train(False)  # inference only (dropout off, no "exporting in training mode" warning)
        hf = importlib.import_module(QWEN_VISION_MODULES[kind])
        self._eager_attention = hf.eager_attention_forward
        self._rotary = hf.apply_rotary_pos_emb_vision

    def embed(self, pixel_values, position_ids):
        x = self.visual.patch_embed(pixel_values)  # (N, C)
        cos, sin = self.visual.rotary_pos_emb(x, position_ids)  # (N, dh) each
        return x, cos, sin

    def qkv(self, attn, x, cos, sin):
        """HF VisionAttention's projection and rotary: q, k, v (N, H, dh)."""
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self._rotary(q, k, cos, sin)
        return q, k, v

    def full_attention(self, attn, q, k, v):
        """Attention over all N patches: (N, H, dh) -> (N, C), HF eager math (scale, fp32 softmax)."""
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, N, dh)
        out, _ = self._eager_attention(attn, q, k, v, attention_mask=None, scaling=attn.scaling)  # (1, N, H, dh)
        return out.reshape(q.shape[2], -1)  # (N, C)

    def block(self, blk, x, cos, sin, attend):
        q, k, v = self.qkv(blk.attn, blk.norm1(x), cos, sin)
        x = x + blk.attn.proj(attend(blk.attn, q, k, v))
        return x + blk.mlp(blk.norm2(x))  # (N, C)


class Qwen2VisionStage(_VisionStage):
    """Qwen2-VL: (pixel_values [N, 1176], vision_position_ids [N, 2]) -> image_features [N/4, D]."""

    def __init__(self, visual: nn.Module):
        super().__init__(visual, "qwen2_vl")

    def forward(self, pixel_values, vision_position_ids):
        x, cos, sin = self.embed(pixel_values, vision_position_ids)  # (N, C), (N, dh)
        for blk in self.visual.blocks:
            x = self.block(blk, x, cos, sin, self.full_attention)
        return self.visual.merger(x)  # (M, D)


class Qwen25VisionStage(_VisionStage):
    """Qwen2.5-VL with padded-window attention; see the module docstring for the inputs."""

    def __init__(self, visual: nn.Module):
        super().__init__(visual, "qwen2_5_vl")
        self.full_blocks = frozenset(visual.fullatt_block_indexes)
        self.unit = visual.spatial_merge_unit  # merge ** 2 patches per merged token

    def permute(self, x, window_index):
        """HF permute_input_for_window_attn: reorder merge units (groups of `unit` rows) into window
        order. (N, ...) -> (N, ...)."""
        units = gather_rows(x.reshape(-1, self.unit, *x.shape[1:]), window_index)  # (M, unit, ...)
        return units.reshape(x.shape)

    def window_attention(self, attn, q, k, v, win_gather, key_mask, win_unpad):
        """Attention inside each window: (N, H, dh) -> (N, C). Padding slots gather row 0 and are
        masked as keys; their query rows are computed and dropped by win_unpad."""
        qw, kw, vw = (gather_rows(t, win_gather).transpose(1, 2) for t in (q, k, v))  # (Wn, H, P, dh)
        out, _ = self._eager_attention(attn, qw, kw, vw, attention_mask=key_mask, scaling=attn.scaling)
        out = out.reshape(-1, q.shape[1] * q.shape[2])  # (Wn * P, C)
        return gather_rows(out, win_unpad)  # (N, C)

    def forward(self, pixel_values, vision_position_ids, window_index, reverse_index, win_gather, win_valid,
                win_unpad):
        x, cos, sin = self.embed(pixel_values, vision_position_ids)  # (N, C), (N, dh)
        x, cos, sin = (self.permute(t, window_index) for t in (x, cos, sin))  # window order
        zero = torch.zeros((), dtype=x.dtype)
        key_mask = torch.where(win_valid, zero, torch.finfo(x.dtype).min)[:, None, None, :]  # (Wn, 1, 1, P)

        def windows(attn, q, k, v):
            return self.window_attention(attn, q, k, v, win_gather, key_mask, win_unpad)

        for i, blk in enumerate(self.visual.blocks):
            x = self.block(blk, x, cos, sin, self.full_attention if i in self.full_blocks else windows)
        return gather_rows(self.visual.merger(x), reverse_index)  # (M, D), image order


def make_stage(model: nn.Module) -> _VisionStage:
    """The vision-stage wrapper of a Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration
    (or its .model), sharing its vision tower."""
    inner = model.model if hasattr(model, "model") else model  # ...ForConditionalGeneration -> ...Model
    visual = inner.visual
    kind = vision_config(model.config).kind
    return Qwen2VisionStage(visual) if kind == "qwen2_vl" else Qwen25VisionStage(visual)


def stage_io(cfg: QwenVisionConfig, out_dim: int, dtype: str = "float32") -> VisionIO:
    """Input names, dtypes and dims of the vision graph of `cfg`; out_dim: the merger's output width
    (the LLM hidden size); dtype: pixel_values' and image_features' dtype. The index inputs are
    INDEX_DTYPE (int32): Gather indices TensorRT 10.3 takes without a parser-inserted cast
    (docs/TENSORRT_10.3.md sections 3 and 7: [P] onnxOpImporters.cpp 1935-1939, [H] NvInfer.h 2562)."""
    I = INDEX_DTYPE
    inputs = [("pixel_values", dtype, ("patches", cfg.patch_dim)), ("vision_position_ids", I, ("patches", 2))]
    if cfg.kind == "qwen2_5_vl":
        P = cfg.window_patches
        inputs += [("window_index", I, ("merged",)), ("reverse_index", I, ("merged",)),
                   ("win_gather", I, ("windows", P)), ("win_valid", "bool", ("windows", P)),
                   ("win_unpad", I, ("patches",))]
    return VisionIO(tuple(inputs), ("image_features", dtype, ("merged", out_dim)))


def torch_dynamic_shapes(io: VisionIO, bounds: dict[str, tuple[int, int]]) -> tuple:
    """dynamic_shapes for torch.onnx.export(dynamo=True), one {dim: Dim} per input, one Dim per axis
    name as export/declare.py makes them; bounds: {axis: (min, max)} for every axis the inputs use."""
    dims = {name: torch.export.Dim(name, min=lo, max=hi) for name, (lo, hi) in bounds.items()}
    return tuple({i: dims[d] for i, d in enumerate(shape) if isinstance(d, str)} for _, _, shape in io.inputs)


def example_inputs(cfg: QwenVisionConfig, gh: int, gw: int, dtype=torch.float32, seed: int = 0) -> tuple:
    """Valid inputs of the vision graph for an image of gh x gw patches, as torch tensors in graph
    order: random pixel_values (seeded), the rest from runtime/qwen_vision.py (consistent tables)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(gh * gw, cfg.patch_dim, generator=g).to(dtype)  # (N, 1176)
    return (pixels, *(torch.from_numpy(a) for a in vision_inputs(gh, gw, cfg).values()))

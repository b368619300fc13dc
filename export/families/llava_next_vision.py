"""LLaVA-NeXT vision stage: all anyres crops of one image per call, packed into the prompt's order.

    pixel_values [crops, 3, 336, 336], pack_index [L] int32 -> image_features [1, L, D]

The CLIP tower runs on every crop at once (the base image first, then the tiles row-major, as
LlavaNextImageProcessor makes them), takes the hidden states of `vision_feature_layer` (a list of
layers is concatenated, as HF does), drops CLS under the "default" strategy, and applies the
projector. HF's `pack_image_features` then lays the tiles out as one feature map, unpads it to the
image's aspect, appends `image_newline` after every row and prepends the base features; that
geometry depends on the image size, so here it is one Gather from
`concat(features.reshape(crops * N, D), image_newline[None])` with a precomputed `pack_index`
(row `crops * N` is the newline). No data-dependent control flow: "crops" and "vision_tokens" (L)
stay dynamic in ONNX, and TensorRT sees only a Gather (notes/families.md section 4). pack_index is
int32 and feeds that Gather with no Cast (vision_io.gather_rows): TensorRT 10.3's parser casts
int64 indices on non-int64 data to int32 anyway ([P] onnxOpImporters.cpp 1935-1939;
docs/TENSORRT_10.3.md sections 3 and 7), and plain `table[pack_index]` would export as GatherND,
int64-only in ONNX.

`hf_pack_index` computes the index with transformers' own `pack_image_features` (the reference);
the runtime computes it in numpy.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from export.families.vision_io import VisionIO, gather_rows
from runtime.manifest import INDEX_DTYPE

__all__ = ["LlavaNextVisionStage", "example_inputs", "hf_pack_index", "make_stage", "num_crops", "stage_decl",
           "stage_io"]


class LlavaNextVisionStage(nn.Module):
    """(pixel_values [crops, 3, S, S], pack_index [L]) -> image_features [1, L, D]. Holds HF's vision
    tower, projector and image_newline (no weights of its own)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        inner = getattr(hf, "model", hf)  # ...ForConditionalGeneration -> LlavaNextModel
        config = hf.config
        layer = config.vision_feature_layer
        self.layers = (layer,) if isinstance(layer, int) else tuple(layer)
        if not self.layers or not all(isinstance(i, int) for i in self.layers):
            raise ValueError(f"vision_feature_layer {layer!r}: expected an int or a list of ints")
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r}: expected 'default' or 'full'")
        self.drop_cls = strategy == "default"
        self.tower = inner.vision_tower
        self.projector = inner.multi_modal_projector
        self.newline = inner.image_newline  # (D,)
        self.train(False)  # inference only

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """HF get_image_features before packing: (crops, 3, S, S) -> (crops, N, D)."""
        states = self.tower(pixel_values, output_hidden_states=True).hidden_states
        if len(self.layers) == 1:
            feats = states[self.layers[0]]  # (crops, 1 + N, Dv)
        else:  # HF concatenates the layers' states
            feats = torch.cat([states[i] for i in self.layers], dim=-1)  # (crops, 1 + N, Dv * layers)
        if self.drop_cls:
            feats = feats[:, 1:]  # (crops, N, Dv')
        return self.projector(feats)  # (crops, N, D)

    def forward(self, pixel_values: torch.Tensor, pack_index: torch.Tensor) -> torch.Tensor:
        feats = self.features(pixel_values)  # (crops, N, D)
        table = torch.cat([feats.reshape(-1, feats.shape[-1]), self.newline[None].to(feats.dtype)])  # (crops*N+1, D)
        return gather_rows(table, pack_index)[None]  # (1, L, D)


def make_stage(hf: nn.Module) -> LlavaNextVisionStage:
    """The vision-stage module of a LlavaNextForConditionalGeneration (or its LlavaNextModel),
    sharing its weights."""
    return LlavaNextVisionStage(hf)


def stage_io(image_size: int, out_dim: int, dtype: str = "float32") -> VisionIO:
    """Names, dtypes and dims of the vision graph: axes "crops" (base image + tiles) and
    "vision_tokens" (L, the packed length); image_size: the tower's (336); out_dim: the LLM hidden
    size; dtype: pixel_values' and image_features' dtype. pack_index is INDEX_DTYPE (int32): Gather
    indices TensorRT 10.3 takes without a parser-inserted cast (docs/TENSORRT_10.3.md sections 3 and 7:
    [P] onnxOpImporters.cpp 1935-1939, [H] NvInfer.h 2562)."""
    return VisionIO(
        inputs=(("pixel_values", dtype, ("crops", 3, image_size, image_size)),
                ("pack_index", INDEX_DTYPE, ("vision_tokens",))),
        output=("image_features", dtype, (1, "vision_tokens", out_dim)),
    )


def stage_decl(image_size: int, out_dim: int, dtype: str = "float32"):
    """stage_io as the export's export.declare.StageDecl ("vision_encoder", vision_encoder.onnx)."""
    from export.declare import StageDecl, TensorDecl

    io = stage_io(image_size, out_dim, dtype)
    return StageDecl("vision_encoder", "vision_encoder.onnx", inputs=tuple(TensorDecl(*t) for t in io.inputs),
                     outputs=(TensorDecl(*io.output),))


def _config(hf_or_config):
    return getattr(hf_or_config, "config", hf_or_config)


def num_crops(config, height: int, width: int) -> int:
    """Crops LlavaNextImageProcessor makes of a height x width image: 1 (base) + the best pinpoint's tiles."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches([height, width], config.image_grid_pinpoints, config.vision_config.image_size)


def hf_pack_index(config, height: int, width: int) -> torch.IntTensor:
    """pack_index [L] int32 of a height x width image, from transformers' own LlavaNextModel.pack_image_features:
    it packs a one-wide "feature" holding each row's number (crops * N rows, then the newline row
    crops * N), so the packed column is the index. pack_image_features reads only self.config."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    config = _config(config)
    crops = num_crops(config, height, width)
    per_crop = (config.vision_config.image_size // config.vision_config.patch_size) ** 2  # N
    rows = torch.arange(crops * per_crop, dtype=torch.float64).reshape(crops, per_crop, 1)  # exact ints
    newline = torch.tensor([crops * per_crop], dtype=torch.float64)
    (packed,), _ = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=config), [rows], torch.tensor([[height, width]]),
        config.vision_feature_select_strategy, image_newline=newline,
    )  # (L, 1)
    return packed[:, 0].to(torch.int32)


def example_inputs(hf_or_config, height: int, width: int, dtype=torch.float32, seed: int = 0) -> tuple:
    """(pixel_values [crops, 3, S, S], pack_index [L]) of a height x width image: seeded random pixels
    for the crop count that size gives, and its pack index (hf_pack_index)."""
    config = _config(hf_or_config)
    size = config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_crops(config, height, width), 3, size, size, generator=g).to(dtype)
    return pixels, hf_pack_index(config, height, width)

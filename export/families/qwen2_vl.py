"""Qwen2-VL and Qwen2.5-VL family (manifest family "qwen2_vl"): Qwen2VLForConditionalGeneration /
Qwen2_5_VLForConditionalGeneration, a dynamic-resolution ViT (patch 14, temporal patch 2, merge 2;
2.5: 112 px window attention with a few full-attention blocks) and a Qwen2 decoder with M-RoPE.

Presets:
    qwen2-vl, qwen2-vl-7b         Qwen/Qwen2-VL-2B-Instruct, -7B-Instruct (local path or HF cache)
    qwen2.5-vl, qwen2.5-vl-7b     Qwen/Qwen2.5-VL-3B-Instruct, -7B-Instruct
    qwen2-vl-tiny, qwen2.5-vl-tiny, qwen2.5-vl-bench, qwen2.5-vl-3b-shape: seeded random weights
    (export/families/qwen_presets.py)

Stages (one image per vision call; export/families/qwen_vision.py):
    vision_encoder  pixel_values [patches, 1176] + the grid's tables -> image_features [vision_tokens, D]
    embed_tokens, decoder: DartDecoder's (export.declare.text_decls) with position_ids [3, batch, seq]
Axes: vision_tokens (per image: min_pixels .. the engine's max_pixels), patches = 4 x vision_tokens,
windows (2.5: 112 px windows of the largest grid).
The engine caps max_pixels so one image's span plus the pivots fits DartPruneSlots' TopK bound
(dart_ops.spec.MAX_SPAN = 3840) and the prompt fits --max-seq; `--max-pixels` caps it lower.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

from export.families import Family, Loaded, VisionExamples, register
from export.families import qwen_presets as presets
from export.families.qwen_presets import RANDOM_PRESETS

log = logging.getLogger(__name__)

HUB_IDS = {
    "qwen2-vl": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
}
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
TEXT_MARGIN = 64  # prompt tokens besides the image that the capped max_pixels leaves room for
MIN_TOKENS = 64  # an engine takes images of at least this many tokens (the decoder traces a 60-token span)
TRACE_GRID = (16, 22)  # patches; 88 vision tokens, 2 windows of 2.5's 112 px
VALIDATION_GRIDS = ((8, 12), (20, 10), (6, 6))  # other token and window counts than traced



def cap_max_pixels(spec: dict, max_seq: int, pivots: int, user_cap: int | None) -> dict:
    """The preprocess spec with max_pixels capped so the largest image's L tokens satisfy
    L + pivots <= MAX_SPAN (DartPruneSlots' TopK bound) and L + TEXT_MARGIN <= max_seq, and within
    `user_cap` (--max-pixels). ValueError (one line) when nothing above min_pixels is left."""
    from dart_ops.spec import MAX_SPAN

    factor2 = (spec["patch"] * spec["merge"]) ** 2  # pixels per vision token
    limit = min(MAX_SPAN - pivots, max_seq - TEXT_MARGIN) * factor2
    cap = min(spec["max_pixels"], limit, user_cap or limit)
    if cap < max(spec["min_pixels"], MIN_TOKENS * factor2):
        raise ValueError(f"max_pixels {cap} (from --max-pixels / --max-seq {max_seq}) leaves fewer than "
                         f"{MIN_TOKENS} vision tokens per image or is below the processor's min_pixels "
                         f"{spec['min_pixels']}; use --max-pixels >= {max(spec['min_pixels'], MIN_TOKENS * factor2)}")
    if cap < spec["max_pixels"]:
        log.info("qwen2_vl: max_pixels %d -> %d (%d vision tokens at most per image)", spec["max_pixels"], cap,
                 cap // factor2)
    return {**spec, "max_pixels": cap}


def token_range(spec: dict) -> tuple[int, int]:
    """(fewest, most) vision tokens per image under the spec's min/max pixels: smart_resize's
    result has min_pixels <= gh * gw * patch^2 <= max_pixels, and a token is factor^2 pixels."""
    factor2 = (spec["patch"] * spec["merge"]) ** 2
    return max(1, -(-spec["min_pixels"] // factor2)), spec["max_pixels"] // factor2


def max_windows(max_tokens: int, merge: int, window_units: int) -> int:
    """The most 2.5 windows an image of at most `max_tokens` tokens has (window_units merged tokens
    per window side): max over grids (lh, lw) in merged tokens of ceil(lh/u) * ceil(lw/u)."""
    best = 1
    for lh in range(1, max_tokens + 1):
        lw = max_tokens // lh
        best = max(best, math.ceil(lh / window_units) * math.ceil(lw / window_units))
    return best


class QwenVLFamily(Family):
    name = "qwen2_vl"
    presets = {
        **{name: f"{hub} (local checkpoint or Hugging Face cache)" for name, hub in HUB_IDS.items()},
        **{name: p.description for name, p in presets.RANDOM_PRESETS.items()},
    }

    tiny_presets = ("qwen2-vl-tiny", "qwen2.5-vl-tiny")
    fixed_resolution = False  # parity tests: tests/test_qwen_family.py

    def accepts_checkpoint(self, config: dict) -> bool:
        return config.get("model_type") in MODEL_TYPES

    def vision_tokens(self, model: str) -> int:
        """A typical image's vision tokens (the trace grid's), for --dry-run and size checks."""
        return TRACE_GRID[0] * TRACE_GRID[1] // 4

    # --- loading ----------------------------------------------------------------------------------

    random_presets = RANDOM_PRESETS  # (`presets` in this class body is the dict above)
    hub_ids = HUB_IDS

    def random_model(self, model: str, dtype, device) -> tuple:
        return presets.build_random_model(model, seed=0, dtype=dtype, device=device), presets.tiny_processor(model)

    def from_pretrained(self, source: str, dtype, local_only: bool):
        import json

        import transformers

        if Path(source).is_dir():
            model_type = json.loads((Path(source) / "config.json").read_text())["model_type"]
        else:
            model_type = "qwen2_5_vl" if "2.5" in source else "qwen2_vl"
        cls = (transformers.Qwen2VLForConditionalGeneration if model_type == "qwen2_vl"
               else transformers.Qwen2_5_VLForConditionalGeneration)
        hf = cls.from_pretrained(source, dtype=dtype, local_files_only=local_only)
        processor = presets.image_text_processor(model_type).from_pretrained(source, local_files_only=local_only)
        return hf.eval(), processor

    def loaded(self, name: str, hf, processor) -> Loaded:
        from export.families.llava import prompt_spec
        from export.families.qwen_vision import vision_config

        cfg, tok = hf.config, processor.tokenizer
        if not getattr(processor, "chat_template", None):
            raise ValueError(f"{name} has no chat template (a base checkpoint?); the runtime builds prompts from "
                             "the checkpoint's chat template: use an -Instruct checkpoint")
        image_spec = presets.preprocess_spec(processor.image_processor)
        vision = vision_config(cfg)
        eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        eos = [i for i in dict.fromkeys([*eos, *_ids(getattr(cfg.text_config, "eos_token_id", None))])
               if isinstance(i, int) and i >= 0]
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[-1]
        return Loaded(
            family=self, name=name, model=hf, tokenizer_json=tok.backend_tokenizer.to_str(),
            preprocess={"kind": "qwen2_vl", **image_spec, "vision": asdict(vision)},
            prompt=prompt_spec(processor),
            tokens={"image_token": "<|image_pad|>", "image_token_id": int(cfg.image_token_id),
                    "image_seq_len": None, "bos_token_id": None, "eos_token_id": eos, "pad_token_id": pad},
            image_seq_len=0,  # varies per image: the vision_tokens axis
        )

    def apply_limits(self, loaded: Loaded, cfg) -> None:
        """Cap max_pixels (TopK bound, --max-seq, --max-pixels) in the recorded preprocessing."""
        pivots = cfg.dart.pivots_image + cfg.dart.pivots_text
        loaded.preprocess = cap_max_pixels(loaded.preprocess, cfg.max_seq, pivots, cfg.max_pixels)

    # --- stages -----------------------------------------------------------------------------------

    def flop_shape(self, config: dict):
        from dart_ops.flops import ModelShape

        return ModelShape.from_qwen_config(config)

    def vision_stage(self, hf):
        from export.families.qwen_vision import make_stage

        return make_stage(hf)

    def vision_axes(self, loaded: Loaded, max_batch: int) -> dict:
        from runtime.manifest import Axis
        from runtime.qwen_vision import QwenVisionConfig

        lo, hi = token_range(loaded.preprocess)
        trace, _ = self._grids(loaded)
        opt = trace[0] * trace[1] // 4
        m2 = loaded.preprocess["merge"] ** 2
        axes = {"vision_tokens": Axis(lo, opt, hi, "vision_tokens"),
                "patches": Axis(lo * m2, opt * m2, hi * m2, "patches")}
        vision = QwenVisionConfig(**loaded.preprocess["vision"])
        if vision.kind == "qwen2_5_vl":
            wn = max_windows(hi, vision.merge, vision.window_units)
            axes["windows"] = Axis(1, min(4, wn), wn, "windows")
        return axes

    def stage_decls(self, loaded: Loaded, flat, dims: dict, dtype: str) -> dict:
        from export.declare import StageDecl, TensorDecl, text_decls
        from export.families.qwen_vision import stage_io
        from runtime.qwen_vision import QwenVisionConfig

        io = stage_io(QwenVisionConfig(**loaded.preprocess["vision"]), dims["hidden_size"], dtype)
        axis = lambda dims_: tuple("vision_tokens" if d == "merged" else d for d in dims_)  # noqa: E731
        vision = StageDecl("vision_encoder", "vision_encoder.onnx",
                           inputs=tuple(TensorDecl(n, t, axis(d)) for n, t, d in io.inputs),
                           outputs=(TensorDecl(io.output[0], io.output[1], axis(io.output[2])),))
        return {"vision_encoder": vision, **text_decls(flat, dims, dtype)}

    @staticmethod
    def _grids(loaded: Loaded) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """The trace grid and the validation grids that the engine's token range admits."""
        lo, hi = token_range(loaded.preprocess)
        fits = lambda g: lo <= g[0] * g[1] // 4 <= hi  # noqa: E731
        trace = next(g for g in (TRACE_GRID, (16, 16), (12, 12), (8, 8)) if fits(g))
        return trace, [g for g in VALIDATION_GRIDS if fits(g) and g != trace]

    def vision_examples(self, loaded: Loaded, decl) -> VisionExamples:
        import torch

        from export.families.qwen_vision import example_inputs
        from runtime.qwen_vision import QwenVisionConfig

        cfg = QwenVisionConfig(**loaded.preprocess["vision"])
        dtype = getattr(torch, decl.inputs[0].dtype)
        trace, grids = self._grids(loaded)
        return VisionExamples(trace=list(example_inputs(cfg, *trace, dtype=dtype)),
                              validate=[list(example_inputs(cfg, *g, dtype=dtype, seed=1)) for g in grids],
                              tokens=grids[0][0] * grids[0][1] // 4)


def _ids(value) -> list:
    return value if isinstance(value, list) else [value]


register(QwenVLFamily())

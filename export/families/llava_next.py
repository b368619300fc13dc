"""LLaVA-NeXT family (manifest family "llava_next"): LlavaNextForConditionalGeneration, LLaVA-1.6's
"anyres": the image is tiled into 336 px crops at the best of the checkpoint's grid pinpoints, plus
a base crop of the whole image; CLIP (feature layer -2, no CLS) and the projector run per crop; the
tile features are unpadded to the image's aspect with an image_newline token after every row.

Presets:
    llava-next               llava-hf/llava-v1.6-mistral-7b-hf (local path or HF cache; Mistral decoder)
    llava-next-vicuna        llava-hf/llava-v1.6-vicuna-7b-hf (Llama/Vicuna decoder)
    llava-next-tiny, llava-next-vicuna-tiny, llava-next-bench, llava-next-7b-shape: seeded random
    weights (export/families/llava_next_presets.py)

Stages (one image per vision call; export/families/llava_next_vision.py):
    vision_encoder  pixel_values [crops, 3, 336, 336] + pack_index [vision_tokens] -> image_features
                    [1, vision_tokens, D]: the packing (unpadding, newline rows) is one Gather by an
                    index the runtime computes in numpy (runtime/llava_next_preprocess.py)
    embed_tokens, decoder: DartDecoder's (export.declare.text_decls), positions arange(S) as LLaVA-1.5
Axes: crops (1 + tiles of the pinpoints: 3..5 by default), vision_tokens (L = 576 + h'(w' + 1):
up to 2928 by default). DART's span is the whole image-token run (base, tiles and newlines), as
the DART authors treat LLaVA-NeXT; DartPruneSlots is sized to the largest L.
"""

from __future__ import annotations

from pathlib import Path

from export.families import Family, Loaded, VisionExamples, register
from export.families import llava_next_presets as presets
from export.families.llava_next_presets import RANDOM_PRESETS

HUB_IDS = {
    "llava-next": "llava-hf/llava-v1.6-mistral-7b-hf",
    "llava-next-vicuna": "llava-hf/llava-v1.6-vicuna-7b-hf",
}
KIND = "llava_next"
TRACE_SIZE = (480, 640)  # (H, W): 5 crops at the default pinpoints, 2340 tokens
VALIDATION_SIZES = ((1000, 333), (336, 336), (333, 1000))  # other crop and token counts than traced



class LlavaNextFamily(Family):
    name = "llava_next"
    presets = {
        **{name: f"{hub} (local checkpoint or Hugging Face cache)" for name, hub in HUB_IDS.items()},
        **{name: p.description for name, p in presets.RANDOM_PRESETS.items()},
    }
    tiny_presets = ("llava-next-tiny", "llava-next-vicuna-tiny")
    fixed_resolution = False  # parity tests: tests/test_llava_next_family.py
    default_max_seq = 3584  # 2928 vision tokens at most per image, plus text

    def accepts_checkpoint(self, config: dict) -> bool:
        return config.get("model_type") == "llava_next"

    def vision_tokens(self, model: str) -> int:
        """The most vision tokens one image gives (an image of a pinpoint's size), without loading
        weights, so --max-seq is checked against the longest span: 2928 at the default pinpoints, a
        checkpoint directory's own pinpoints (config.json image_grid_pinpoints) otherwise."""
        import json

        from runtime.llava_next_preprocess import NextPreprocessSpec, token_range

        pinpoints, size, patch = None, None, None
        if Path(model).is_dir():
            cfg = json.loads((Path(model) / "config.json").read_text())
            pinpoints = cfg.get("image_grid_pinpoints")
            size = cfg.get("vision_config", {}).get("image_size")
            patch = cfg.get("vision_config", {}).get("patch_size")
        spec = NextPreprocessSpec(**{k: v for k, v in (("pinpoints", pinpoints), ("crop_size", size),
                                                       ("shortest_edge", size), ("patch", patch)) if v})
        return token_range(spec)[1]

    # --- loading ----------------------------------------------------------------------------------

    random_presets = RANDOM_PRESETS  # (`presets` in this class body is the dict above)
    hub_ids = HUB_IDS

    def random_model(self, model: str, dtype, device) -> tuple:
        return presets.build_random_model(model, seed=0, dtype=dtype, device=device), presets.tiny_processor(model)

    def from_pretrained(self, source: str, dtype, local_only: bool):
        from transformers import (
            LlavaNextForConditionalGeneration,
            LlavaNextImageProcessorPil,
            LlavaNextProcessor,
        )

        hf = LlavaNextForConditionalGeneration.from_pretrained(source, dtype=dtype, local_files_only=local_only)
        # The PIL image processor explicitly: the torchvision one (transformers' default when it is
        # installed) differs from PIL's resampling, which the runtime reproduces bit for bit.
        processor = LlavaNextProcessor.from_pretrained(source, local_files_only=local_only)
        processor.image_processor = LlavaNextImageProcessorPil.from_pretrained(source, local_files_only=local_only)
        return hf.eval(), processor

    def loaded(self, name: str, hf, processor) -> Loaded:
        from export.families.llava import prompt_spec
        from export.families.llava_next_spec import preprocess_spec

        cfg, tok = hf.config, processor.tokenizer
        spec = preprocess_spec(processor.image_processor, patch=cfg.vision_config.patch_size)
        if spec["crop_size"] != cfg.vision_config.image_size:
            raise ValueError(f"{name}: the image processor's {spec['crop_size']} px crops do not match the "
                             f"{cfg.vision_config.image_size} px vision tower")
        # The model unpads with the config's pinpoints, the processor tiles with its own: HF itself
        # disagrees when they differ.
        if [list(p) for p in spec["pinpoints"]] != [list(p) for p in cfg.image_grid_pinpoints]:
            raise ValueError(f"{name}: the image processor's grid pinpoints {spec['pinpoints']} differ from the "
                             f"model config's {cfg.image_grid_pinpoints}")
        return Loaded(
            family=self, name=name, model=hf, tokenizer_json=tok.backend_tokenizer.to_str(),
            preprocess={"kind": KIND, **spec},
            prompt=prompt_spec(processor),
            tokens={"image_token": "<image>", "image_token_id": int(cfg.image_token_id), "image_seq_len": None,
                    "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                    "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else 0},
            image_seq_len=0,  # varies per image: the vision_tokens axis
        )

    # --- stages -----------------------------------------------------------------------------------

    def flop_shape(self, config: dict):
        from dart_ops.flops import ModelShape

        return ModelShape.from_llava_next_config(config)

    def vision_stage(self, hf):
        from export.families.llava_next_vision import make_stage

        return make_stage(hf)

    @staticmethod
    def _spec(loaded: Loaded):
        from runtime.llava_next_preprocess import NextPreprocessSpec

        return NextPreprocessSpec.from_json({k: v for k, v in loaded.preprocess.items() if k != "kind"})

    def vision_axes(self, loaded: Loaded, max_batch: int) -> dict:
        """crops per image and vision tokens per image, over every image size the pinpoints admit."""
        from runtime.llava_next_preprocess import crop_range, layout, token_range
        from runtime.manifest import Axis

        spec = self._spec(loaded)
        trace = layout(*TRACE_SIZE, spec)
        (c_lo, c_hi), (t_lo, t_hi) = crop_range(spec), token_range(spec)
        return {"crops": Axis(c_lo, min(max(trace.crops, c_lo), c_hi), c_hi, "crops"),
                "vision_tokens": Axis(t_lo, min(max(trace.tokens, t_lo), t_hi), t_hi, "vision_tokens")}

    def stage_decls(self, loaded: Loaded, flat, dims: dict, dtype: str) -> dict:
        from export.declare import text_decls
        from export.families.llava_next_vision import stage_decl

        vision = stage_decl(self._spec(loaded).crop_size, dims["hidden_size"], dtype)
        return {"vision_encoder": vision, **text_decls(flat, dims, dtype)}

    def vision_examples(self, loaded: Loaded, decl) -> VisionExamples:
        """Random crops with the pack index of a real image size: traced at 480 x 640 (5 crops),
        validated on sizes giving other crop and token counts."""
        import torch

        from runtime.llava_next_preprocess import layout, pack_index

        spec, dtype = self._spec(loaded), getattr(torch, decl.inputs[0].dtype)

        def example(hw: tuple[int, int], seed: int) -> list:
            lay = layout(*hw, spec)
            g = torch.Generator().manual_seed(seed)
            pixels = torch.randn(lay.crops, 3, spec.crop_size, spec.crop_size, generator=g).to(dtype)
            return [pixels, torch.from_numpy(pack_index(lay))]

        return VisionExamples(trace=example(TRACE_SIZE, 0),
                              validate=[example(hw, i + 1) for i, hw in enumerate(VALIDATION_SIZES)],
                              tokens=layout(*VALIDATION_SIZES[1], spec).tokens)


register(LlavaNextFamily())

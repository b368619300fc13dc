"""LLaVA-1.5 family: LlavaForConditionalGeneration (CLIP ViT-L/14-336 tower, feature layer -2
without CLS, MLP projector, Llama/Vicuna decoder).

Presets:
    llava           llava-hf/llava-1.5-7b-hf, from a local path or the local Hugging Face cache
    llava-tiny      seeded random weights, real token structure (336 px / patch 14 -> 576 vision
                    tokens), a real byte-level BPE tokenizer; for tests and the quick start
    llava-bench     the same structure at LLaVA-1.5 proportions sized for a 2-core CPU benchmark
    llava-7b-shape  random weights at the real LLaVA-1.5-7B shapes, for GPU benchmarks
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.families import Family, Loaded, register

HUB_ID = "llava-hf/llava-1.5-7b-hf"
IMAGE_SIZE = 336
PATCH_SIZE = 14
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
TEMPLATE_TEXT_ONLY = "USER: {prompt} ASSISTANT:"
TINY_VOCAB = 1024
TINY_IMAGE_TOKEN_ID = TINY_VOCAB - 1
TINY_TOKENIZER = Path(__file__).parent / "data" / "llava_tiny_tokenizer.json"



@dataclass(frozen=True)
class RandomPreset:
    """A LLaVA-1.5-structured model with seeded random weights (no download): 336 px / patch 14
    -> 576 vision tokens, CLIP feature layer -2, MLP projector, Llama decoder, and the committed
    tiny byte-level BPE tokenizer (ids >= its 1024 entries, if the model's vocabulary is larger,
    decode to nothing)."""

    description: str
    vision: dict  # CLIPVisionConfig sizes
    text: dict  # LlamaConfig sizes
    weight_scale: float = 1.0  # > 1 peaks the logits so greedy output varies (llava-tiny)


RANDOM_PRESETS = {
    "llava-tiny": RandomPreset(
        "random-weight tiny LLaVA-1.5 with 576 vision tokens (no download; tests, quick start)",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=TINY_VOCAB),
        weight_scale=8.0,
    ),
    # LLaVA-1.5 proportions scaled to a 2-core CPU: 576 vision tokens, MHA decoder with the 7B
    # MLP ratio (11008 / 4096), 8 layers so K = 2 leaves 6 pruned layers, the real vocabulary.
    "llava-bench": RandomPreset(
        "random-weight LLaVA-1.5 proportions for CPU benchmarks (8 layers, hidden 512, 576 vision tokens)",
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=4),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32064),
    ),
    # The real llava-1.5-7b shapes (CLIP ViT-L/14-336 + Vicuna-7B): GPU benchmarks without weights.
    "llava-7b-shape": RandomPreset(
        "random weights at the real LLaVA-1.5-7B shapes (GPU benchmarks; 7.1e9 parameters)",
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064),
    ),
}


def random_config(preset: str = "llava-tiny"):
    """LlavaConfig of a random-weight preset."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    p = RANDOM_PRESETS[preset]
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32, **p.vision)
    text = LlamaConfig(
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5,
        **p.text,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=TINY_IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_random_model(preset: str, seed: int = 0, dtype=None, device=None):
    """A random-weight preset, seeded, built directly on `device` in `dtype` (default fp32, CPU).

    Weights of 2-D non-embedding, non-norm parameters are multiplied by the preset's weight_scale.
    """
    from transformers import LlavaForConditionalGeneration

    from export.families import build_seeded

    return build_seeded(lambda: LlavaForConditionalGeneration(random_config(preset)), seed, dtype, device,
                        RANDOM_PRESETS[preset].weight_scale)


def build_tiny_model(seed: int = 0):
    """Random-weight `llava-tiny`, seeded (its preset scales the weights x8 so logits are peaked and
    greedy output varies with the prompt and the keep ratio)."""
    return build_random_model("llava-tiny", seed)


def tiny_processor():
    """LlavaProcessor for llava-tiny (so its checkpoint loads like any LLaVA checkpoint)."""
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_TOKENIZER), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
    )


def tiny_pad_processor():
    """llava-tiny's processor with LLaVA's pad-to-square image processor instead of CLIP's resize +
    center crop: LlavaImageProcessor(do_pad=True), the other preprocessing style (tests)."""
    from transformers import LlavaImageProcessor

    processor = tiny_processor()
    processor.image_processor = LlavaImageProcessor(
        do_pad=True, size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    return processor


_PROMPT_MARK = "DARTVLMPROMPTMARK"  # stands for the user's text while the chat template renders


def prompt_spec(processor) -> dict:
    """The manifest's prompt templates from the checkpoint's own chat template: one user turn (an
    image and the text, or the text alone) plus the generation prompt, rendered by the processor's
    apply_chat_template with a marker where the text goes; what an HF user feeds the processor, so
    the runtime's ids equal processor(text=apply_chat_template(...), images=...)'s. A checkpoint
    without a chat template gets LLaVA-1.5's conversation format (USER: <image>\n... ASSISTANT:)."""
    if not getattr(processor, "chat_template", None):
        return {"template": TEMPLATE, "template_text_only": TEMPLATE_TEXT_ONLY, "add_special_tokens": True}

    def render(content: list) -> str:
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        if text.count(_PROMPT_MARK) != 1:
            raise ValueError("the checkpoint's chat template does not place the user's text exactly once; "
                             "the runtime cannot reproduce it")
        return text.replace("{", "{{").replace("}", "}}").replace(_PROMPT_MARK, "{prompt}")

    text = {"type": "text", "text": _PROMPT_MARK}
    return {"template": render([{"type": "image"}, text]), "template_text_only": render([text]),
            "add_special_tokens": True}


_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's
_RUNTIME_RESAMPLE = ("bicubic", "bilinear")  # the filters runtime.preprocess reproduces


def preprocess_spec(ip, vision_image_size: int) -> dict:
    """The manifest's "preprocess" object (runtime.manifest.PreprocessSpec) read from a checkpoint's
    image processor (CLIPImageProcessor, LlavaImageProcessor, ...). ValueError, one line, for a
    behaviour the runtime cannot reproduce."""
    name = type(ip).__name__

    def refuse(what: str) -> ValueError:
        return ValueError(f"{name}: {what}; the runtime's preprocessing cannot reproduce it")

    size, crop = dict(getattr(ip, "size", None) or {}), dict(getattr(ip, "crop_size", None) or {})
    if getattr(ip, "do_convert_rgb", True) is False:
        raise refuse("do_convert_rgb=False (the runtime always converts to RGB)")
    if not getattr(ip, "do_resize", True) or set(size) != {"shortest_edge"}:
        raise refuse(f"resize {'off' if not getattr(ip, 'do_resize', True) else size} "
                     "(the runtime resizes the shortest edge: size={'shortest_edge': N})")
    resample = _RESAMPLE_NAMES.get(2 if ip.resample is None else int(ip.resample))  # None: HF's bilinear
    if resample not in _RUNTIME_RESAMPLE:
        raise refuse(f"resample {resample or ip.resample} (the runtime has {', '.join(_RUNTIME_RESAMPLE)})")
    # LlavaImageProcessor's do_pad pads to a square before resizing; other processors' do_pad pads a
    # batch to its largest image (to pad_size if set), a no-op for one image.
    pad = bool(getattr(ip, "do_pad", False)) and callable(getattr(ip, "pad_to_square", None))
    if getattr(ip, "do_pad", False) and not pad and getattr(ip, "pad_size", None):
        raise refuse(f"do_pad with pad_size={dict(ip.pad_size)}")
    edge = int(size["shortest_edge"])
    center_crop = bool(getattr(ip, "do_center_crop", False))
    if center_crop and (set(crop) != {"height", "width"} or crop["height"] != crop["width"]):
        raise refuse(f"crop_size {crop} (the runtime crops a square)")
    image_size = int(crop["height"]) if center_crop else edge
    if not center_crop and not pad:
        raise refuse(f"no center crop after a shortest-edge resize to {edge} (not square)")
    if image_size > edge:
        raise refuse(f"center crop {image_size} larger than the resize {edge} (zero padding)")
    if image_size != vision_image_size:
        raise refuse(f"{image_size} px images for a vision tower of {vision_image_size} px")
    normalize = getattr(ip, "do_normalize", True)
    if pad and not normalize:
        raise refuse("do_pad with do_normalize=False (the pad colour still comes from image_mean)")
    mean, std = (ip.image_mean, ip.image_std) if normalize else (0.0, 1.0)
    mean, std = ([float(x)] * 3 if isinstance(x, (int, float)) else [float(v) for v in x]
                 for x in (mean, std))
    return {
        "image_size": image_size, "pad_to_square": pad, "resample": resample,
        "rescale": float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0,
        "mean": mean, "std": std, "shortest_edge": edge, "center_crop": center_crop,
    }


class VisionEncoder:
    """pixel_values (B, 3, H, W) -> image_features (B, N, D): CLIP tower, feature layer, projector."""

    @staticmethod
    def build(model):
        import torch

        class _VisionEncoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.tower = model.model.vision_tower
                self.projector = model.model.multi_modal_projector
                self.layer = model.config.vision_feature_layer
                self.drop_cls = model.config.vision_feature_select_strategy == "default"

            def forward(self, pixel_values):
                states = self.tower(pixel_values, output_hidden_states=True).hidden_states
                feats = states[self.layer]  # (B, 1 + N, Dv)
                if self.drop_cls:
                    feats = feats[:, 1:]  # (B, N, Dv)
                return self.projector(feats)  # (B, N, D)

        return _VisionEncoder().eval()


class LlavaFamily(Family):
    name = "llava"
    presets = {
        "llava": f"{HUB_ID} (local checkpoint or Hugging Face cache)",
        **{name: p.description for name, p in RANDOM_PRESETS.items()},
    }

    def accepts_checkpoint(self, config: dict) -> bool:
        return config.get("model_type") == "llava"

    def vision_tokens(self, model: str) -> int:
        if model in self.presets:
            return (IMAGE_SIZE // PATCH_SIZE) ** 2
        import json

        vision = json.loads((Path(model) / "config.json").read_text()).get("vision_config", {})
        return (vision.get("image_size", IMAGE_SIZE) // vision.get("patch_size", PATCH_SIZE)) ** 2

    random_presets = RANDOM_PRESETS
    hub_ids = {"llava": HUB_ID}

    def random_model(self, model: str, dtype, device) -> tuple:
        return build_random_model(model, seed=0, dtype=dtype, device=device), tiny_processor()

    def from_pretrained(self, source: str, dtype, local_only: bool):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        hf = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype, local_files_only=local_only)
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
        return hf.eval(), processor

    def loaded(self, name: str, hf, processor) -> Loaded:
        cfg = hf.config
        tok = processor.tokenizer
        patch = cfg.vision_config.patch_size
        n = (cfg.vision_config.image_size // patch) ** 2
        return Loaded(
            family=self,
            name=name,
            model=hf,
            tokenizer_json=tok.backend_tokenizer.to_str(),
            preprocess=preprocess_spec(processor.image_processor, cfg.vision_config.image_size),
            prompt=prompt_spec(processor),
            tokens={
                "image_token": "<image>", "image_token_id": int(cfg.image_token_id),
                "image_seq_len": n, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
            },
            image_seq_len=n,
        )

    def flop_shape(self, config: dict):
        """dart_ops.flops.ModelShape of a LlavaConfig dict: CLIP tower + projector, and the decoder."""
        from dart_ops.flops import ModelShape, TextShape, VisionShape

        return ModelShape(VisionShape.from_llava_config(config), TextShape.from_config(config["text_config"]))

    def vision_stage(self, hf):
        return VisionEncoder.build(hf)

    def vision_axes(self, loaded: Loaded, max_batch: int) -> dict:
        """images: crops per vision call (one per image; LLaVA-1.5 has no tiling); vision_tokens:
        fixed by the tower's image and patch size."""
        from runtime.manifest import Axis

        n = loaded.image_seq_len
        return {"images": Axis(1, 1, max_batch, "images"), "vision_tokens": Axis(n, n, n, "vision_tokens")}

    def stage_decls(self, loaded: Loaded, flat, dims: dict, dtype: str) -> dict:
        """The three stages' declarations (export/declare.py): the CLIP vision stage here, the text
        stages as DartDecoder exports them for every family. dims: the manifest's decoder sizes;
        dtype: "float32" or "float16"."""
        from export.declare import StageDecl, TensorDecl, text_decls

        size, N, D = loaded.preprocess["image_size"], loaded.image_seq_len, dims["hidden_size"]
        vision = StageDecl("vision_encoder", "vision_encoder.onnx",
                           inputs=(TensorDecl("pixel_values", dtype, ("images", 3, size, size)),),
                           outputs=(TensorDecl("image_features", dtype, ("images", N, D)),))
        return {"vision_encoder": vision, **text_decls(flat, dims, dtype)}


register(LlavaFamily())

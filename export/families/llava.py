"""LLaVA-1.5 family: LlavaForConditionalGeneration (CLIP ViT-L/14-336 tower, feature layer -2
without CLS, MLP projector, Llama/Vicuna decoder).

Presets:
    llava        llava-hf/llava-1.5-7b-hf, from a local path or the local Hugging Face cache
    llava-tiny   seeded random weights, real token structure (336 px / patch 14 -> 576 vision
                 tokens), a real byte-level BPE tokenizer; for tests and the quick start
"""

from __future__ import annotations

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


class ModelNotAvailable(RuntimeError):
    """The weights of a preset are not on this machine."""


def tiny_config():
    """`llava-tiny`: the real token structure (336 px / patch 14 -> 576 vision tokens, image token
    in the vocabulary, CLIP feature layer -2, GQA decoder) at a size that runs in tests."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=TINY_IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_tiny_model(seed: int = 0, weight_scale: float = 8.0):
    """Random-weight `llava-tiny`, seeded. Weights are scaled up from the default init so logits
    are peaked and greedy output varies with the prompt and the keep ratio."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "norm" not in name:
                p.mul_(weight_scale)
    return model.eval()


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


class EmbedTokens:
    @staticmethod
    def build(model):
        import torch

        class _EmbedTokens(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = model.get_input_embeddings()

            def forward(self, input_ids):
                return self.embed(input_ids)  # (B, S) -> (B, S, D)

        return _EmbedTokens().eval()


class LlavaFamily(Family):
    name = "llava"
    presets = {
        "llava": f"{HUB_ID} (local checkpoint or Hugging Face cache)",
        "llava-tiny": "random-weight tiny LLaVA-1.5 with 576 vision tokens (no download)",
    }

    def accepts_checkpoint(self, config: dict) -> bool:
        return config.get("model_type") == "llava"

    def vision_tokens(self, model: str) -> int:
        if model in self.presets:
            return (IMAGE_SIZE // PATCH_SIZE) ** 2
        import json

        vision = json.loads((Path(model) / "config.json").read_text()).get("vision_config", {})
        return (vision.get("image_size", IMAGE_SIZE) // vision.get("patch_size", PATCH_SIZE)) ** 2

    def load(self, model: str, dtype) -> Loaded:
        if model == "llava-tiny":
            hf = build_tiny_model(seed=0).to(dtype)
            processor = tiny_processor()
            loaded = self._loaded(model, hf, processor)
            loaded.save_checkpoint = lambda d: (hf.save_pretrained(d), processor.save_pretrained(d))
            return loaded
        source = HUB_ID if model == "llava" else model
        hf, processor = self._from_pretrained(source, dtype, local_only=(model == "llava"))
        return self._loaded(model, hf, processor)

    def _from_pretrained(self, source: str, dtype, local_only: bool):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        try:
            hf = LlavaForConditionalGeneration.from_pretrained(
                source, dtype=dtype, local_files_only=local_only
            )
            processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
        except OSError as e:
            raise ModelNotAvailable(
                f"cannot load {source} ({str(e).splitlines()[0]}); point --model at a local "
                "checkpoint directory (e.g. from `huggingface-cli download " + HUB_ID + "`), "
                "or use --model llava-tiny, which needs no download"
            ) from None
        return hf.eval(), processor

    def _loaded(self, name: str, hf, processor) -> Loaded:
        cfg = hf.config
        tok = processor.tokenizer
        ip = processor.image_processor
        size = ip.crop_size["height"] if getattr(ip, "crop_size", None) else IMAGE_SIZE
        patch = cfg.vision_config.patch_size
        n = (cfg.vision_config.image_size // patch) ** 2
        return Loaded(
            family=self,
            name=name,
            model=hf,
            tokenizer_json=tok.backend_tokenizer.to_str(),
            preprocess={
                "image_size": size, "pad_to_square": True, "resample": "bicubic",
                "rescale": float(getattr(ip, "rescale_factor", 1 / 255)),
                "mean": [float(x) for x in ip.image_mean], "std": [float(x) for x in ip.image_std],
            },
            prompt={"template": TEMPLATE, "template_text_only": TEMPLATE_TEXT_ONLY,
                    "add_special_tokens": True},
            tokens={
                "image_token": "<image>", "image_token_id": int(cfg.image_token_id),
                "image_seq_len": n, "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else 0,
            },
            image_seq_len=n,
        )

    def stage_modules(self, loaded: Loaded, dart) -> dict:
        from dart_ops.decoder import DartDecoder, FlatDecoder

        hf = loaded.model
        decoder = DartDecoder(
            hf.model.language_model, hf.lm_head, dart.layer, dart.pivots_image, dart.pivots_text
        )
        return {
            "vision_encoder": VisionEncoder.build(hf),
            "embed_tokens": EmbedTokens.build(hf),
            "decoder": FlatDecoder(decoder).eval(),
        }


register(LlavaFamily())

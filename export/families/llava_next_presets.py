"""LLaVA-NeXT (LLaVA-1.6) random-weight presets, their tiny processor and chat templates (export side).

Presets (seeded random weights, no download), all with the structure of llava-hf/llava-v1.6-*-hf:
CLIP 336 px / patch 14 (576 tokens per crop), vision_feature_layer -2 without CLS, MLP projector,
the 5 default anyres pinpoints (3 to 5 crops: base image + 2..4 tiles), image_newline:
    llava-next-tiny          Mistral decoder (llava-v1.6-mistral-7b-hf), vision hidden 32 x 3 layers,
                             text hidden 64 x 4 layers (GQA 4/2); tests, quick start
    llava-next-vicuna-tiny   the same with a Llama decoder (llava-v1.6-vicuna-7b-hf)
    llava-next-bench         llava-bench's sizes (export/families/llava.py) on a Mistral decoder with
                             the real vocabulary, for 2-core CPU benchmarks (2928-token prefills)
    llava-next-7b-shape      the real llava-v1.6-mistral-7b shapes (GPU benchmarks without weights;
                             7.57e9 parameters, never instantiate it on a small machine)

Every preset uses llava-tiny's committed byte-level BPE tokenizer (data/llava_tiny_tokenizer.json:
<pad> 0, <s> 1, </s> 2, <image> 1023); ids above 1023 (bench and 7b-shape vocabularies) decode to
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from export.families.llava import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_SIZE,
    PATCH_SIZE,
    TINY_IMAGE_TOKEN_ID,
    TINY_TOKENIZER,
)

# image_grid_pinpoints of the llava-v1.6 checkpoints (and LlavaNextConfig's default), (height, width) px.
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_VOCAB = 1024  # the tiny tokenizer's entries (<image> is the last)
REAL_VOCAB = 32064  # llava-v1.6-mistral-7b-hf / -vicuna-7b-hf (32000 + <image>, <pad> and padding)
MAX_POSITIONS = 8192  # random presets: >= the longest prompt (2928 vision tokens + text) with margin

# Chat templates. Written to reproduce the real checkpoints' rendering of a conversation (one user
# turn with an image renders as below); at export time the family reads a real checkpoint's own
# template (its chat_template.json), never these.
CHAT_TEMPLATES = {
    # llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\nWhat is shown in this image? [/INST]"
    "mistral-instruct": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + "
        "message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' "
        "}}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
        "'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in "
        "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' "
        "[/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '"
        "}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
        "{% endfor %}"
    ),
    # llava-hf/llava-v1.6-vicuna-7b-hf ships LLaVA-1.5's template (no system prompt):
    # "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    "vicuna": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] "
        "!= 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ "
        "content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
        "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration "
        "%}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
}


@dataclass(frozen=True)
class RandomPreset:
    """A LLaVA-NeXT model with seeded random weights: CLIP at 336 px / patch 14, feature layer -2
    without CLS, anyres over PINPOINTS, image_newline, and a Mistral or Llama decoder."""

    description: str
    vision: dict  # CLIPVisionConfig sizes
    text: dict  # MistralConfig / LlamaConfig sizes (and rope_theta, max_position_embeddings)
    text_model_type: str = "mistral"  # "mistral" or "llama"
    weight_scale: float = 1.0  # > 1 peaks the logits so greedy output varies (tiny presets; decoder, lm_head)
    # The vision tower's and projector's factor (None: weight_scale). Kept small: CLIP with large
    # weights is ill-conditioned (ORT vs torch differ by 1.2e-4 of the features' scale at x12, above
    # the export's 1e-4 validation tolerance; 5e-7 at x2).
    vision_weight_scale: float | None = None
    chat_template: str = "mistral-instruct"  # a CHAT_TEMPLATES key


_TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
_TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": TINY_VOCAB}

# Tiny presets: text x12, vision x2. On a 2928-vision-token prompt (700 x 700 image) 20 greedy tokens
# hold 11-18 distinct ids and change at keep ratio 0.111; llava-tiny's x8 repeats 1-2 tokens there.
RANDOM_PRESETS = {
    "llava-next-tiny": RandomPreset(
        "random-weight tiny LLaVA-NeXT on Mistral (anyres, up to 2928 vision tokens; no download; tests)",
        vision=_TINY_VISION, text={**_TINY_TEXT, "rope_theta": 1e6}, weight_scale=12.0, vision_weight_scale=2.0,
    ),
    "llava-next-vicuna-tiny": RandomPreset(
        "random-weight tiny LLaVA-NeXT on Llama/Vicuna (anyres; no download; tests)",
        vision=_TINY_VISION, text={**_TINY_TEXT, "rope_theta": 1e4}, text_model_type="llama", weight_scale=12.0,
        vision_weight_scale=2.0, chat_template="vicuna",
    ),
    # llava-bench's sizes (8 layers so K = 2 leaves 6 pruned layers, hidden 512) on a Mistral decoder
    # with the real vocabulary: the cost of LLaVA-NeXT's up to 2928 vision tokens on a 2-core CPU.
    "llava-next-bench": RandomPreset(
        "random-weight LLaVA-NeXT for CPU benchmarks (llava-bench sizes, Mistral decoder, anyres)",
        vision={"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 4},
        text={"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": REAL_VOCAB, "rope_theta": 1e6},
    ),
    # The sizes of llava-hf/llava-v1.6-mistral-7b-hf's config.json (CLIP ViT-L/14-336 + Mistral-7B).
    "llava-next-7b-shape": RandomPreset(
        "random weights at the real LLaVA-v1.6-Mistral-7B shapes (GPU benchmarks; 7.57e9 parameters)",
        vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "projection_dim": 768},
        text={"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": REAL_VOCAB, "rope_theta": 1e6,
              "max_position_embeddings": 32768},
    ),
}


def _text_config(p: RandomPreset):
    """MistralConfig (sliding_window None, as the llava-v1.6 checkpoint) or LlamaConfig."""
    from transformers import LlamaConfig, MistralConfig

    sizes = dict(p.text)
    rope = {"rope_type": "default", "rope_theta": sizes.pop("rope_theta")}
    common = {"max_position_embeddings": MAX_POSITIONS, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
              "rms_norm_eps": 1e-5, "rope_parameters": rope, **sizes}
    if p.text_model_type == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if p.text_model_type == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"text_model_type {p.text_model_type!r}: use 'mistral' or 'llama'")


def random_config(preset: str = "llava-next-tiny"):
    """LlavaNextConfig of a random-weight preset (image token: the tiny tokenizer's <image>)."""
    from transformers import CLIPVisionConfig, LlavaNextConfig

    p = RANDOM_PRESETS[preset]
    vision = CLIPVisionConfig(**{"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "projection_dim": 32,
                                 **p.vision})
    return LlavaNextConfig(
        vision_config=vision, text_config=_text_config(p), image_token_id=TINY_IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_grid_pinpoints=[list(pin) for pin in PINPOINTS], image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )


def build_random_model(preset: str, seed: int = 0, dtype=None, device=None):
    """A random-weight preset, seeded, built directly on `device` in `dtype` (default fp32, CPU).

    Weights of 2-D non-embedding, non-norm parameters are multiplied by the preset's weight_scale
    (export.families.build_seeded), then those of the vision tower and projector brought to
    vision_weight_scale (image_newline is 1-D: unscaled)."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from export.families import build_seeded

    p = RANDOM_PRESETS[preset]
    model = build_seeded(lambda: LlavaNextForConditionalGeneration(random_config(preset)), seed, dtype, device,
                         p.weight_scale)
    vision_scale = p.weight_scale if p.vision_weight_scale is None else p.vision_weight_scale
    if vision_scale != p.weight_scale:
        with torch.no_grad():
            for part in (model.model.vision_tower, model.model.multi_modal_projector):
                for name, w in part.named_parameters():
                    if w.dim() == 2 and "embed" not in name and "norm" not in name:  # build_seeded's rule
                        w.mul_(vision_scale / p.weight_scale)
    return model


def tiny_image_processor():
    """LlavaNextImageProcessorPil configured as the llava-v1.6 checkpoints' preprocessor_config.json
    (the PIL backend named explicitly: transformers prefers torchvision's when it imports, and only
    PIL's is reproduced exactly; notes/families.md pitfall 6)."""
    from transformers import LlavaNextImageProcessorPil
    from transformers.image_utils import PILImageResampling

    return LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD, image_grid_pinpoints=[list(pin) for pin in PINPOINTS],
        resample=PILImageResampling.BICUBIC, do_pad=True, do_center_crop=True, do_convert_rgb=True,
    )


def tiny_processor(preset: str = "llava-next-tiny"):
    """LlavaNextProcessor of a random-weight preset: the PIL image processor, the tiny tokenizer with
    <image>, the preset's chat template, and the real processor_config.json's token settings
    (patch 14, strategy "default", num_additional_image_tokens 1: the CLS the strategy drops)."""
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast

    template = CHAT_TEMPLATES[RANDOM_PRESETS[preset].chat_template]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_TOKENIZER), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=template,
    )
    return LlavaNextProcessor(
        image_processor=tiny_image_processor(), tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
        chat_template=template,
    )

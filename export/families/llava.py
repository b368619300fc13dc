"""LLaVA-1.5 family: LlavaForConditionalGeneration (CLIP ViT-L/14-336 tower, feature layer -2
without CLS, MLP projector, Llama/Vicuna decoder)."""

from __future__ import annotations

IMAGE_SIZE = 336
PATCH_SIZE = 14
TINY_VOCAB = 1024
TINY_IMAGE_TOKEN_ID = TINY_VOCAB - 1


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
        num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=2048,
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

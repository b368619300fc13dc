"""Qwen2-VL / Qwen2.5-VL random-weight presets, their tiny tokenizer and processor (export side).

Presets (seeded random weights, no download):
    qwen2-vl-tiny        Qwen2VLForConditionalGeneration: 3 vision blocks (32 wide), 4 text layers
                         (hidden 64, GQA 4/2, M-RoPE section [2, 3, 3]); tests, quick start
    qwen2.5-vl-tiny      Qwen2_5_VLForConditionalGeneration: 4 vision blocks with 112 px windows and
                         block 1 full attention, the same text stack
    qwen2.5-vl-bench     Qwen2.5-VL-3B proportions sized for a 2-core CPU benchmark (hidden 512,
                         8 layers, the real vocabulary)
    qwen2.5-vl-3b-shape  the real Qwen2.5-VL-3B-Instruct shapes (GPU benchmarks without weights;
                         3.75e9 parameters, never instantiate it on a small machine)

Every preset uses the committed tiny byte-level BPE tokenizer (data/qwen_tiny_tokenizer.json):
1017 BPE entries, then Qwen's special tokens <|endoftext|> .. <|video_pad|> at ids 1017 .. 1023,
so the config's image/video/vision_start/vision_end ids are the tokenizer's; ids above 1023 (the
bench and 3b-shape vocabularies are larger) decode to nothing. The prompt format is the
Qwen2-VL-2B-Instruct chat template (Qwen2.5-VL-3B-Instruct ships the same one).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).parent / "data"
TINY_TOKENIZER = DATA / "qwen_tiny_tokenizer.json"
LLAVA_TINY_TOKENIZER = DATA / "llava_tiny_tokenizer.json"  # the BPE merges this tokenizer reuses
TINY_BPE = 1017  # BPE entries of the tiny tokenizer (256 byte symbols + 761 merges)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
TOKEN_IDS = {tok: TINY_BPE + i for i, tok in enumerate(SPECIAL_TOKENS)}  # "<|image_pad|>" -> 1022
TINY_VOCAB = TINY_BPE + len(SPECIAL_TOKENS)  # 1024
REAL_VOCAB = 151936  # Qwen2-VL / Qwen2.5-VL checkpoints

PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MIN_PIXELS = 56 * 56  # Qwen2VLImageProcessor's defaults (4 .. 1280 vision tokens)
MAX_PIXELS = 28 * 28 * 1280
TINY_MAX_PIXELS = 28 * 28 * 256  # tiny processors: at most 256 vision tokens (fast tests)

# Pre-tokenization of Qwen2's tokenizer.json (Split, Isolated), then byte-level without a regex.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# chat_template of Qwen/Qwen2-VL-2B-Instruct, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
    "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value "
    "= image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif "
    "%}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content "
    "%}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value "
    "}}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ "
    "content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class RandomPreset:
    """A Qwen2-VL (model_type "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") model with seeded random
    weights: patch 14, temporal patch 2, merge 2, a Qwen2 text stack with M-RoPE."""

    description: str
    model_type: str  # "qwen2_vl" or "qwen2_5_vl"
    vision: dict  # the vision config's sizes (out width = the text hidden size, added by random_config)
    text: dict  # the text config's sizes
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2
    tie_word_embeddings: bool = False
    weight_scale: float = 1.0  # > 1 peaks the logits so greedy output varies (tiny presets)
    max_pixels: int = 0  # the processor's cap (0: TINY_MAX_PIXELS, 256 tokens, fast tests)


_TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": TINY_VOCAB}

RANDOM_PRESETS = {
    "qwen2-vl-tiny": RandomPreset(
        "random-weight tiny Qwen2-VL (3 vision blocks, 4 text layers, M-RoPE; no download; tests)",
        "qwen2_vl",
        vision={"depth": 3, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2},
        text=_TINY_TEXT, mrope_section=(2, 3, 3), weight_scale=8.0,
    ),
    "qwen2.5-vl-tiny": RandomPreset(
        "random-weight tiny Qwen2.5-VL (4 vision blocks, 112 px windows, 4 text layers; no download; tests)",
        "qwen2_5_vl",
        vision={"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "window_size": 112,
                "fullatt_block_indexes": [1]},
        text=_TINY_TEXT, mrope_section=(2, 3, 3), weight_scale=8.0,
    ),
    # Qwen2.5-VL-3B proportions scaled to a 2-core CPU: head_dim 64 with the 3B's M-RoPE split
    # (16, 24, 24) / 2, GQA 4:1, the 3B MLP ratio (11008 / 2048), 8 layers so K = 2 leaves 6 pruned
    # layers, the real vocabulary with tied embeddings (as the 3B).
    "qwen2.5-vl-bench": RandomPreset(
        "random-weight Qwen2.5-VL-3B proportions for CPU benchmarks (8 layers, hidden 512)",
        "qwen2_5_vl",
        vision={"depth": 4, "hidden_size": 256, "intermediate_size": 684, "num_heads": 4, "window_size": 112,
                "fullatt_block_indexes": [1, 3]},
        text={"hidden_size": 512, "intermediate_size": 2752, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 2, "vocab_size": REAL_VOCAB},
        mrope_section=(8, 12, 12), tie_word_embeddings=True, max_pixels=MAX_PIXELS,
    ),
    # The sizes of Qwen/Qwen2.5-VL-3B-Instruct's config.json.
    "qwen2.5-vl-3b-shape": RandomPreset(
        "random weights at the real Qwen2.5-VL-3B-Instruct shapes (GPU benchmarks; 3.75e9 parameters)",
        "qwen2_5_vl",
        vision={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2},
        text={"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
              "num_key_value_heads": 2, "vocab_size": REAL_VOCAB, "max_position_embeddings": 128000},
        mrope_section=(16, 24, 24), tie_word_embeddings=True, max_pixels=MAX_PIXELS,
    ),
}


def _classes(model_type: str):
    """(config class, model class) of a model_type."""
    import transformers as tf

    if model_type == "qwen2_vl":
        return tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
    return tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration


def random_config(preset: str = "qwen2-vl-tiny"):
    """Qwen2VLConfig / Qwen2_5_VLConfig of a random-weight preset (token ids: the tiny tokenizer's)."""
    p = RANDOM_PRESETS[preset]
    config_cls, _ = _classes(p.model_type)
    hidden = p.text["hidden_size"]
    head_dim = hidden // p.text["num_attention_heads"]
    if 2 * sum(p.mrope_section) != head_dim:
        raise ValueError(f"{preset}: mrope_section {p.mrope_section} must sum to head_dim / 2 = {head_dim // 2}")
    out = "hidden_size" if p.model_type == "qwen2_vl" else "out_hidden_size"  # the merger's output width
    vision = {"patch_size": PATCH_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE,
              "spatial_merge_size": MERGE_SIZE, out: hidden, **p.vision}
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(p.mrope_section)}
    text = {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "bos_token_id": TOKEN_IDS["<|endoftext|>"], "eos_token_id": TOKEN_IDS["<|im_end|>"],
            "pad_token_id": TOKEN_IDS["<|endoftext|>"], "tie_word_embeddings": p.tie_word_embeddings,
            "rope_parameters": rope}
    text.update(p.text)
    return config_cls(
        vision_config=vision, text_config=text, tie_word_embeddings=p.tie_word_embeddings,
        image_token_id=TOKEN_IDS["<|image_pad|>"], video_token_id=TOKEN_IDS["<|video_pad|>"],
        vision_start_token_id=TOKEN_IDS["<|vision_start|>"], vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
    )


def build_random_model(preset: str, seed: int = 0, dtype=None, device=None):
    """A random-weight preset, seeded, built directly on `device` in `dtype` (default fp32, CPU).

    Weights of 2-D non-embedding, non-norm parameters are multiplied by the preset's weight_scale
    (as llava.build_random_model does)."""
    from export.families import build_seeded

    p = RANDOM_PRESETS[preset]
    _, model_cls = _classes(p.model_type)
    return build_seeded(lambda: model_cls(random_config(preset)), seed, dtype, device, p.weight_scale)


# --- tokenizer and processor -----------------------------------------------------------------------


def make_tiny_tokenizer():
    """The tiny tokenizer (a tokenizers.Tokenizer), deterministically: the first 1017 entries of
    llava-tiny's trained byte-level BPE (its 256 byte symbols and first 761 merges, without
    <pad>/<s>/</s>) in the layout of Qwen2's tokenizer.json (NFC, the Qwen2 split regex, byte-level,
    no BOS), then SPECIAL_TOKENS as added special tokens at ids 1017 .. 1023."""
    from tokenizers import AddedToken, Tokenizer

    src = json.loads(LLAVA_TINY_TOKENIZER.read_text())["model"]
    by_id = sorted(src["vocab"].items(), key=lambda kv: kv[1])
    skip = 3  # <pad>, <s>, </s>
    vocab = {tok: i - skip for tok, i in by_id[skip:skip + TINY_BPE]}
    merges = src["merges"][:TINY_BPE - 256]  # merge m makes BPE entry 256 + m
    if any(a not in vocab or b not in vocab or a + b not in vocab for a, b in merges) or len(vocab) != TINY_BPE:
        raise ValueError(f"{LLAVA_TINY_TOKENIZER} is not the BPE this tokenizer is derived from")
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", **byte_level}]},
        "post_processor": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    tok = Tokenizer.from_str(json.dumps(doc))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if {t: tok.token_to_id(t) for t in SPECIAL_TOKENS} != TOKEN_IDS:
        raise ValueError("special tokens did not land at ids 1017 .. 1023")
    return tok


def write_tiny_tokenizer(path: Path = TINY_TOKENIZER) -> Path:
    """Regenerate data/qwen_tiny_tokenizer.json (committed, so ids never drift)."""
    path.write_text(make_tiny_tokenizer().to_str(pretty=True) + "\n")
    return path


def tiny_tokenizer():
    """PreTrainedTokenizerFast over the committed tiny tokenizer, with Qwen2-VL-Instruct's roles:
    eos <|im_end|>, pad <|endoftext|>, no BOS."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_TOKENIZER), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
        chat_template=CHAT_TEMPLATE,
    )


def tiny_image_processor(min_pixels: int = MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS):
    """Qwen2VLImageProcessorPil (the PIL backend, named explicitly: transformers picks torchvision's
    when it imports, and only PIL's is reproduced exactly; families.md pitfall 6)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )


_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}  # PIL's codes the runtime reproduces


def preprocess_spec(ip) -> dict:
    """The manifest's Qwen preprocess object (runtime.qwen_preprocess.QwenPreprocessSpec.to_json())
    read from a checkpoint's Qwen2VLImageProcessor(Pil). ValueError, one line, for a behaviour the
    runtime cannot reproduce."""
    from runtime.qwen_preprocess import QwenPreprocessSpec

    name = type(ip).__name__
    if getattr(ip, "do_convert_rgb", True) is False or not getattr(ip, "do_resize", True):
        raise ValueError(f"{name}: do_convert_rgb / do_resize off; the runtime always converts and resizes")
    resample = _RESAMPLE_NAMES.get(2 if ip.resample is None else int(ip.resample))
    if resample is None:
        raise ValueError(f"{name}: resample {ip.resample!r}; the runtime has bicubic and bilinear")
    size = ip.size
    normalize = getattr(ip, "do_normalize", True)
    mean, std = (ip.image_mean, ip.image_std) if normalize else (0.0, 1.0)
    mean, std = (tuple([float(x)] * 3 if isinstance(x, (int, float)) else (float(v) for v in x)) for x in (mean, std))
    spec = QwenPreprocessSpec(
        patch=int(ip.patch_size), merge=int(ip.merge_size), temporal=int(ip.temporal_patch_size),
        min_pixels=int(size["shortest_edge"]), max_pixels=int(size["longest_edge"]), mean=mean, std=std,
        rescale=float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else 1.0, resample=resample,
    )
    return spec.to_json()


def tiny_processor(preset: str = "qwen2-vl-tiny", min_pixels: int = MIN_PIXELS, max_pixels: int | None = None):
    """The image + text processor of a random-weight preset (image_text_processor's class): the PIL
    image processor, the tiny tokenizer and the Qwen2-VL chat template. max_pixels: the preset's
    (tiny: 256 tokens; bench and 3b-shape: the checkpoints' 1280) unless given."""
    p = RANDOM_PRESETS[preset]
    max_pixels = max_pixels or p.max_pixels or TINY_MAX_PIXELS
    cls = image_text_processor(p.model_type)
    return cls(image_processor=tiny_image_processor(min_pixels, max_pixels), tokenizer=tiny_tokenizer(),
               chat_template=CHAT_TEMPLATE)


@functools.cache
def image_text_processor(model_type: str):
    """Qwen2VLProcessor (model_type "qwen2_vl") or Qwen2_5_VLProcessor ("qwen2_5_vl") without its
    video processor: a subclass whose sub-processors are the image processor and the tokenizer.

    Why: transformers 5.24 cannot build either processor without torchvision (the video processor's
    class check needs `VideoProcessorMixin`, exported only when torchvision imports: "type object
    'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'"), and torchvision does not install
    with torch 2.13+cpu here (families.md pitfall 6). Images and text go through the parent class
    unchanged. from_pretrained also loads a real Qwen2-VL / Qwen2.5-VL checkpoint directory (its video
    config is ignored) and always returns the PIL image processor."""
    import transformers

    base = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor}[model_type]

    class ImageTextProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # base.__init__ passes (image_processor, tokenizer, video_processor=None) positionally;
            # ProcessorMixin pairs them with this signature's two sub-processors and drops the third.
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             **kwargs)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
            processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
            if not isinstance(processor.image_processor, transformers.Qwen2VLImageProcessorPil):
                processor.image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(
                    pretrained_model_name_or_path, **kwargs)  # torchvision's was picked (it imports)
            return processor

    ImageTextProcessor.__name__ = ImageTextProcessor.__qualname__ = f"{base.__name__}ImageText"
    return ImageTextProcessor


if __name__ == "__main__":
    print(f"wrote {write_tiny_tokenizer()}")

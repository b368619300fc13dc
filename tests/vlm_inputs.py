"""Inputs the family tests share: a smooth synthetic image, and what the checkpoint's own processor
and chat template make of one user turn (the reference the runtime's ids and pixels must equal)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def smooth_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A w x h image of seeded random colours upsampled bilinearly (smooth, not noise)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR).convert(mode)


def hf_chat_inputs(processor, image, text: str):
    """processor(text=apply_chat_template(one user turn: the image, if any, then `text`), images=...)."""
    content = [{"type": "image"}, {"type": "text", "text": text}] if image is not None else \
        [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    return processor(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")

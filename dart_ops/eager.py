"""Eager PyTorch DART for Hugging Face LLaVA-style models: the eager baseline.

Prefill runs layers < K on all S tokens, selects the kept tokens with the reference (through
`torch.ops.dart.prune` inside `DartDecoder`), runs layers >= K on S' tokens at their original
positions; the KV cache stays ragged (layers < K hold S + t entries, layers >= K hold S' + t) and
decode continues at position S.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dart_ops.decoder import DartDecoder
from dart_ops.spec import DartConfig


@dataclass
class EagerOutput:
    token_ids: list[int]  # generated tokens only
    kept_positions: list[int]  # positions the decoder kept in prefill (first batch row)
    first_logits: torch.Tensor  # (B, V) logits that chose the first new token
    timings: dict = field(default_factory=dict)


def find_image_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[int, int]:
    """(start, length) of the one contiguous run of image tokens in every row of (B, S) ids;
    (0, 0) when there is none. Rows must agree (one graph input serves the batch)."""
    spans = set()
    for row in input_ids.tolist():
        where = [i for i, t in enumerate(row) if t == image_token_id]
        if where and where[-1] - where[0] + 1 != len(where):
            raise ValueError("image tokens must form one contiguous span (one image per prompt)")
        spans.add((where[0], len(where)) if where else (0, 0))
    if len(spans) != 1:
        raise ValueError(f"all prompts in a batch must share the image span, got {sorted(spans)}")
    return spans.pop()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scalar(x: int) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)


class EagerDart:
    """Greedy generation with DART for a LlavaForConditionalGeneration-like model.

    The model must expose `.model.language_model` (Llama-family stack), `.lm_head`,
    `.get_input_embeddings()`, `.model.get_image_features(...)` and `config.image_token_id`.
    """

    def __init__(self, model, config: DartConfig):
        self.model = model
        self.config = config
        self.decoder = DartDecoder(
            model.model.language_model,
            model.lm_head,
            layer=config.layer,
            pivots_image=config.pivots_image,
            pivots_text=config.pivots_text,
        )

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """(B, S) ids (+ images) -> (B, S, D) embeddings with image features in the image span."""
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, S, D)
        if pixel_values is None:
            return embeds
        cfg = self.model.config
        feats = self.model.model.get_image_features(
            pixel_values=pixel_values.to(embeds.dtype),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output
        feats = torch.cat(list(feats), dim=0)  # (B * N, D)
        mask = (input_ids == cfg.image_token_id).unsqueeze(-1)  # (B, S, 1)
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(
                f"prompt has {int(mask.sum())} image tokens but the images give {feats.shape[0]} features"
            )
        return embeds.masked_scatter(mask, feats.to(embeds.dtype))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        *,
        keep_ratio: float | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        streamer=None,
    ) -> EagerOutput:
        """Greedy decoding. `keep_ratio` overrides the config's (1.0 = no pruning). `streamer`
        follows Hugging Face's protocol: put(prompt ids), put(each new token, shape (B,)), end().
        Timings synchronise CUDA before reading the clock."""
        cfg = self.config
        if keep_ratio is not None:
            cfg = DartConfig(cfg.layer, cfg.pivots_image, cfg.pivots_text, keep_ratio=keep_ratio)
        B, S = input_ids.shape
        a, L = find_image_span(input_ids, self.model.config.image_token_id)
        if pixel_values is None:
            a, L = 0, 0
        counts = cfg.counts(L, S - a - L)
        span_len = L if counts.prune else 0  # span length 0 = nothing to prune

        if streamer is not None:
            streamer.put(input_ids)
        _sync(input_ids.device)
        t0 = time.perf_counter()
        embeds = self.embed(input_ids, pixel_values)
        dtype = embeds.dtype
        past_low, past_high = self.decoder.empty_past(B, dtype, embeds.device)
        positions = torch.arange(S, device=embeds.device).expand(B, S)
        logits, past_low, past_high, kept = self.decoder(
            embeds, positions, _scalar(a), _scalar(span_len), _scalar(counts.quota), past_low, past_high
        )
        first_logits = logits
        kv_bytes = sum(t.numel() * t.element_size() for kv in (*past_low, *past_high) for t in kv)
        _sync(embeds.device)
        t1 = time.perf_counter()

        tokens: list[int] = []
        embed_tokens = self.model.get_input_embeddings()
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)  # (B,)
            tokens.append(int(nxt[0]))
            if streamer is not None:
                streamer.put(nxt)
            if eos_token_id is not None and tokens[-1] == eos_token_id:
                break
            if step == max_new_tokens - 1:
                break
            pos = torch.full((B, 1), S + step, dtype=torch.long, device=embeds.device)
            logits, past_low, past_high, _ = self.decoder(
                embed_tokens(nxt[:, None]), pos, _scalar(0), _scalar(0), _scalar(0), past_low, past_high
            )
        if streamer is not None:
            streamer.end()
        _sync(embeds.device)
        t2 = time.perf_counter()
        return EagerOutput(
            token_ids=tokens,
            kept_positions=kept[0].tolist(),
            first_logits=first_logits,
            timings={"prefill_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3, "kv_bytes": kv_bytes},
        )

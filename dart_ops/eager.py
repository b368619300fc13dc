"""Eager PyTorch DART for Hugging Face vision-language models: the eager baseline.

Prefill runs layers < K on all S tokens, selects the kept tokens with the reference (through
`torch.ops.dart.prune` inside `DartDecoder`), runs layers >= K on S' tokens at their original
positions; the KV cache stays ragged (layers < K hold S + t entries, layers >= K hold S' + t) and
decode continues at position S (+ the family's rope delta). The decoder stack is reached only
through its TextAdapter (dart_ops/text_adapter.py), the images only through HF's generic
get_image_features, so any family with an adapter runs here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dart_ops.decoder import DartDecoder
from dart_ops.spec import DartConfig, find_span
from dart_ops.text_adapter import TextAdapter, for_model


@dataclass
class EagerOutput:
    token_ids: list[int]  # generated tokens only
    kept_positions: list[int]  # the decoder's kept_positions in prefill (first batch row)
    first_logits: torch.Tensor  # (B, V) logits that chose the first new token
    timings: dict = field(default_factory=dict)


def find_image_span(input_ids: torch.Tensor, image_token_id: int | None) -> tuple[int, int]:
    """(start, length) of the one contiguous run of image tokens in every row of (B, S) ids;
    (0, 0) when there is none (or no image token id). Rows must agree (one graph input serves
    the batch). The rule for one row is dart_ops.spec.find_span, which the runtime uses too."""
    if image_token_id is None:
        return 0, 0
    spans = {find_span(row, image_token_id) for row in input_ids.tolist()}
    if len(spans) != 1:
        raise ValueError(f"all prompts in a batch must share the image span, got {sorted(spans)}")
    return spans.pop()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scalar(x: int) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)


class EagerDart:
    """Greedy generation with DART for a Hugging Face vision-language model.

    model: anything with Hugging Face's generic VLM methods: `get_input_embeddings()`,
           `get_image_features(pixel_values=..., **image_kwargs).pooler_output` (per-image
           features, as LLaVA and Qwen2-VL return them) and `config.image_token_id` (no image
           token id: text-only, e.g. a bare causal LM).
    text:  the TextAdapter of its decoder, which the family supplies; by default the one of
           `model.get_decoder()` and `model.get_output_embeddings()`, chosen by model_type.
    """

    def __init__(self, model, config: DartConfig, text: TextAdapter | None = None):
        self.model = model
        self.config = config
        self.text = text or for_model(model.get_decoder(), model.get_output_embeddings())
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.decoder = DartDecoder(
            self.text, layer=config.layer, pivots_image=config.pivots_image, pivots_text=config.pivots_text,
        )

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_kwargs: dict | None = None) -> torch.Tensor:
        """(B, S) ids (+ images) -> (B, S, D) embeddings with image features in the image span."""
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, S, D)
        if pixel_values is None:
            return embeds
        feats = self.model.get_image_features(
            pixel_values=pixel_values.to(embeds.dtype), **(image_kwargs or {})
        ).pooler_output
        feats = torch.cat(list(feats), dim=0)  # (B * N, D)
        mask = (input_ids == self.image_token_id).unsqueeze(-1)  # (B, S, 1)
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(
                f"prompt has {int(mask.sum())} image tokens but the images give {feats.shape[0]} features"
            )
        return embeds.masked_scatter(mask, feats.to(embeds.dtype))

    def _check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        """DartDecoder's causal mask has no attention window: refuse contexts past the model's."""
        window = self.text.sliding_window
        if window is not None and prompt_len + max_new_tokens > window:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's sliding window ({window}); DART here supports contexts within it")

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
        position_ids: torch.Tensor | None = None,
        rope_delta: int = 0,
        image_kwargs: dict | None = None,
    ) -> EagerOutput:
        """Greedy decoding. `keep_ratio` overrides the config's (1.0 = no pruning). `streamer`
        follows Hugging Face's protocol: put(prompt ids), put(each new token, shape (B,)), end().
        Timings synchronise CUDA before reading the clock.

        Positions (the family's rule): `position_ids` of the prompt in the adapter's layout,
        default arange(S); decode step t runs at S + t + `rope_delta` (Qwen2-VL's M-RoPE: the
        family passes the 3-row ids and their delta, which it computes from the image grid).
        `image_kwargs` go to get_image_features (e.g. Qwen2-VL's image_grid_thw)."""
        cfg = self.config
        if keep_ratio is not None:
            cfg = cfg.with_ratio(keep_ratio)
        B, S = input_ids.shape
        self._check_context(S, max_new_tokens)
        a, L = find_image_span(input_ids, self.image_token_id)
        if pixel_values is None:
            a, L = 0, 0
        elif position_ids is None and self.text.mrope:
            raise ValueError("M-RoPE position ids depend on the image grid: pass the prompt's position_ids "
                             "(and rope_delta) computed by the family")
        counts = cfg.counts(L, S - a - L)
        span_len = L if counts.prune else 0  # span length 0 = nothing to prune

        if streamer is not None:
            streamer.put(input_ids)
        _sync(input_ids.device)
        t0 = time.perf_counter()
        embeds = self.embed(input_ids, pixel_values, image_kwargs)
        dtype = embeds.dtype
        past_low, past_high = self.decoder.empty_past(B, dtype, embeds.device)
        if position_ids is None:
            position_ids = self.text.positions(torch.arange(S, device=embeds.device).expand(B, S))
        logits, past_low, past_high, kept, _ = self.decoder(
            embeds, position_ids, _scalar(a), _scalar(span_len), _scalar(counts.quota), past_low, past_high
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
            pos = torch.full((B, 1), S + step + rope_delta, dtype=torch.long, device=embeds.device)
            logits, past_low, past_high, *_ = self.decoder(
                embed_tokens(nxt[:, None]), self.text.positions(pos), _scalar(0), _scalar(0), _scalar(0),
                past_low, past_high,
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

"""Prompt building with the engine's tokenizer.json (HF `tokenizers`, no transformers).

    text = template.format(prompt=...)  (template_text_only without an image)
    ids  = tokenizer.encode(text, add_special_tokens=...)      # one image token
    ids  = expand_image_tokens(ids)                             # image_seq_len image tokens
    a, L = find_span(ids, image_token_id)                       # where vision features go

User-given input_ids may hold one image token (expanded here) or an already expanded run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from dart_ops import spec
from runtime.errors import EngineError, InputError
from runtime.manifest import PromptSpec, TokenSpec, check_template


def find_span(ids: Sequence[int], image_token_id: int) -> tuple[int, int]:
    """(start, length) of the run of image tokens in `ids`; (0, 0) when there is none
    (dart_ops.spec.find_span, the rule the eager baseline uses too). InputError when the image
    tokens are not one contiguous run (two images, or text between vision tokens)."""
    try:
        return spec.find_span(ids, image_token_id)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def expand_image_tokens(ids: Sequence[int], image_token_id: int, image_seq_len: int) -> list[int]:
    """Replace a single image token by `image_seq_len` copies; an already expanded run of exactly
    `image_seq_len` tokens is kept as is. Anything else raises InputError."""
    ids = [int(i) for i in ids]
    start, length = find_span(ids, image_token_id)
    if length == 0 or length == image_seq_len:
        return ids
    if length == 1:
        return ids[:start] + [image_token_id] * image_seq_len + ids[start + 1:]
    raise InputError(f"the prompt has {length} image tokens (id {image_token_id}); give one image token "
                     f"or a run of exactly {image_seq_len} (this engine's vision tokens per image)")


class PromptBuilder:
    """Chat template + tokenizer of one engine."""

    def __init__(self, tokenizer: str | Path | Tokenizer, prompt: PromptSpec, tokens: TokenSpec):
        """`tokenizer`: the engine's tokenizer.json, or an already loaded `tokenizers.Tokenizer`."""
        if isinstance(tokenizer, Tokenizer):
            self.tokenizer = tokenizer
        else:
            try:
                self.tokenizer = Tokenizer.from_file(str(tokenizer))
            except Exception as exc:  # tokenizers raises a plain Exception on bad files
                raise EngineError(f"{Path(tokenizer).name}: cannot load the tokenizer ({exc}); "
                                  "re-export the engine") from exc
        self.spec = prompt
        self.tokens = tokens
        check_template(prompt.template, "template")
        check_template(prompt.template_text_only, "template_text_only")
        found = self.tokenizer.token_to_id(tokens.image_token)
        if found != tokens.image_token_id:
            raise EngineError(f"tokenizer.json maps the image token {tokens.image_token!r} to {found}, but the "
                              f"manifest says {tokens.image_token_id}; re-export the engine")
        for name, template, want in (("template", prompt.template, 1), ("template_text_only",
                                                                      prompt.template_text_only, 0)):
            n = self._count_image_tokens(self._tokenize(template.format(prompt="")))
            if n != want:
                raise EngineError(f"manifest.json: prompt.{name} holds {n} image tokens "
                                  f"({tokens.image_token!r}), it must hold {want}; re-export the engine")

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.spec.add_special_tokens).ids

    def _count_image_tokens(self, ids: list[int]) -> int:
        return sum(1 for i in ids if i == self.tokens.image_token_id)

    def encode(self, prompt: str, with_image: bool) -> list[int]:
        """Token ids of the templated prompt, image token expanded (with_image) or absent."""
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: the tokenizer would raise a bare TypeError
            raise InputError(f"prompt is not valid Unicode text ({exc.reason} at character {exc.start}, "
                             f"{prompt[exc.start]!r})") from None
        template = self.spec.template if with_image else self.spec.template_text_only
        text = template.format(prompt=prompt)  # a single {prompt} field: checked at load
        ids = self._tokenize(text)
        if self._count_image_tokens(ids) != (1 if with_image else 0):
            raise InputError(f"the prompt text must not contain {self.tokens.image_token!r}: the template adds "
                             "the image token itself (pass the image separately)")
        return self.expand(ids)

    def expand(self, ids: Sequence[int]) -> list[int]:
        """One image token -> image_seq_len copies; unchanged when the count varies per image
        (image_seq_len None: the family expands it once it knows the image)."""
        if self.tokens.image_seq_len is None:
            return list(ids)
        return expand_image_tokens(ids, self.tokens.image_token_id, self.tokens.image_seq_len)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

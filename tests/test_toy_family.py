"""A family is self-contained: a test-only toy family, defined and registered here (no core file
knows it), exports with `export.build`, validates, loads in the torch-free runtime and generates
the toy's own eager tokens and kept indices.

The toy differs from LLaVA-1.5 where the core claims to be generic:
    vision     a conv patchifier (no CLIP, no CLS token): 112 px / patch 14 -> 64 vision tokens,
               its own mean/std, pad to square and no center crop
    text       a random Qwen2 decoder (q/k/v biases), not Llama
    prompt     its own template and image token ("<|vision|>" added to the tiny BPE tokenizer),
               the image FIRST in the prompt (span start 0, no BOS)
    positions  its own rule: text after the image is shifted by GAP positions, so prefill ids have a
               gap and decode step t runs at S + GAP + t (a 1-D analogue of Qwen2-VL's rope_delta)
The families are registered inside a fixture and removed afterwards, so the registry-parametrized
tests elsewhere never see the toy.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

import runtime
import runtime.families as rt_families
from dart_ops.spec import DartConfig
from export import families as ex_families
from export.families.llava import TINY_TOKENIZER
from runtime.families.llava import LlavaRules
from runtime.steps import Request

NAME, PRESET = "toy", "toy-tiny"
IMAGE_SIZE, PATCH = 112, 14
N_VISION = (IMAGE_SIZE // PATCH) ** 2  # 64
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
IMAGE_TOKEN = "<|vision|>"
TEMPLATE = IMAGE_TOKEN + "Question: {prompt}\nAnswer:"
TEMPLATE_TEXT_ONLY = "Question: {prompt}\nAnswer:"
GAP = 5  # positions skipped after the image (the toy's decode-position rule)
VOCAB = 1040
N_NEW = 12
QUESTION = "What is in the picture?"


# --- the toy model (torch) ----------------------------------------------------------------------------

class ToyVLM(torch.nn.Module):
    """Conv patchifier + MLP projector + Qwen2ForCausalLM, with HF's generic VLM methods
    (get_input_embeddings, get_decoder, get_output_embeddings, get_image_features)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(seed)
        text = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
        self.patch = torch.nn.Conv2d(3, 24, kernel_size=PATCH, stride=PATCH)
        self.projector = torch.nn.Sequential(torch.nn.LayerNorm(24), torch.nn.Linear(24, 64), torch.nn.GELU(),
                                             torch.nn.Linear(64, 64))
        self.lm = Qwen2ForCausalLM(text)
        with torch.no_grad():  # peaked logits, so greedy output varies with the prompt and the ratio
            for name, w in self.lm.named_parameters():
                if w.dim() == 2 and "embed" not in name:
                    w.mul_(6.0)
        # What the exporter reads of an HF config: text_config, sub_configs, _attn_implementation.
        self.config = SimpleNamespace(text_config=text, sub_configs={"text_config": None},
                                      _attn_implementation="eager", image_token_id=VOCAB - 16)
        self.eval()

    def vision(self, pixel_values):
        x = self.patch(pixel_values)  # (B, 24, 8, 8)
        return self.projector(x.flatten(2).transpose(1, 2))  # (B, 64, D)

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def get_decoder(self):
        return self.lm.model

    def get_output_embeddings(self):
        return self.lm.lm_head

    def get_image_features(self, pixel_values):
        return SimpleNamespace(pooler_output=self.vision(pixel_values))  # per image: (B, N, D)


class _Vision(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.vision(pixel_values)  # (B, 3, H, W) -> (B, N, D)


class _Embed(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)  # (B, S) -> (B, S, D)


def toy_tokenizer_json() -> tuple[str, int]:
    """The tiny BPE tokenizer with the toy's image token added; (json, image token id)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TINY_TOKENIZER))
    tok.add_special_tokens([IMAGE_TOKEN])
    return tok.to_str(), tok.token_to_id(IMAGE_TOKEN)


# --- the toy family (export side) ---------------------------------------------------------------------

class ToyFamily(ex_families.Family):
    name = NAME
    presets: ClassVar[dict[str, str]] = {PRESET: "test-only toy VLM (conv patchifier + Qwen2)"}

    def accepts_checkpoint(self, config: dict) -> bool:
        return False

    def vision_tokens(self, model: str) -> int:
        return N_VISION

    def load(self, model: str, dtype, device=None) -> ex_families.Loaded:
        hf = ToyVLM().to(dtype)
        tokenizer_json, image_id = toy_tokenizer_json()
        hf.config.image_token_id = image_id
        return ex_families.Loaded(
            family=self, name=model, model=hf, tokenizer_json=tokenizer_json,
            preprocess={"image_size": IMAGE_SIZE, "pad_to_square": True, "resample": "bilinear",
                        "rescale": 1 / 255, "mean": MEAN, "std": STD, "shortest_edge": IMAGE_SIZE,
                        "center_crop": False},
            prompt={"template": TEMPLATE, "template_text_only": TEMPLATE_TEXT_ONLY, "add_special_tokens": False},
            tokens={"image_token": IMAGE_TOKEN, "image_token_id": image_id, "image_seq_len": N_VISION,
                    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
            image_seq_len=N_VISION,
        )

    def text_adapter(self, hf):
        from dart_ops.text_adapter import for_model

        return for_model(hf.lm.model, hf.lm.lm_head)

    def eager(self, hf, dart):
        from dart_ops.eager import EagerDart

        return EagerDart(hf, dart, text=self.text_adapter(hf))

    def stage_modules(self, loaded, dart) -> dict:
        from dart_ops.decoder import DartDecoder, FlatDecoder

        hf = loaded.model
        decoder = DartDecoder(self.text_adapter(hf), layer=dart.layer, pivots_image=dart.pivots_image,
                              pivots_text=dart.pivots_text)
        return {"vision_encoder": _Vision(hf).eval(), "embed_tokens": _Embed(hf).eval(),
                "decoder": FlatDecoder(decoder).eval()}

    def stage_decls(self, loaded, flat, dims: dict, dtype: str) -> dict:
        # The text stages are DartDecoder's, declared once for every family (export.declare.text_decls);
        # the vision stage is the toy's own.
        from export.declare import StageDecl, text_decls
        from export.declare import TensorDecl as T

        decls = text_decls(flat, dims, dtype)
        decls["vision_encoder"] = StageDecl(
            "vision_encoder", "vision_encoder.onnx",
            inputs=(T("pixel_values", dtype, ("batch", 3, IMAGE_SIZE, IMAGE_SIZE)),),
            outputs=(T("image_features", dtype, ("batch", N_VISION, dims["hidden_size"])),))
        return decls


# --- the toy family (run-time side) -------------------------------------------------------------------

def toy_positions(S: int, spans) -> np.ndarray:
    """(1, S): arange(S), with every token after the (first) image shifted by GAP."""
    pos = np.arange(S, dtype=np.int64)
    if spans:
        a, L = spans[0]
        pos[a + L:] += GAP
    return pos[None]


class ToyRules(LlavaRules):
    """LLaVA's preprocessing and template handling (driven by the manifest), the toy's positions."""

    @staticmethod
    def positions(ids, spans, vision):
        return rt_families.Positions(toy_positions(len(ids), spans), len(ids) + (GAP if spans else 0))


@pytest.fixture(scope="module")
def toy_registered():
    fam = ex_families.register(ToyFamily())
    rt_families.register(NAME)(ToyRules)
    try:
        yield fam
    finally:
        ex_families.unregister(NAME)
        rt_families.unregister(NAME)
    assert PRESET not in ex_families.presets() and NAME not in rt_families.families()


@pytest.fixture(scope="module")
def toy_engine(toy_registered, tmp_path_factory) -> Path:
    from export.build import BuildConfig, build

    out = tmp_path_factory.mktemp("toy") / "engine"
    build(BuildConfig(model=PRESET, out=out, dart=DartConfig(keep_ratio=0.25), max_seq=256, max_context=512))
    return out


@pytest.fixture(scope="module")
def toy_pipe(toy_engine):
    return runtime.load(toy_engine)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8))  # not square: padded


# --- eager references ---------------------------------------------------------------------------------

@torch.no_grad()
def hf_greedy(model: ToyVLM, ids: list[int], pixels: np.ndarray, positions: np.ndarray, decode_start: int,
              n: int) -> list[int]:
    """Greedy decoding with the toy's own torch modules and HF's Qwen2ForCausalLM (DynamicCache),
    the toy's positions: no DART code involved."""
    from transformers import DynamicCache

    input_ids = torch.tensor([ids])
    embeds = model.get_input_embeddings()(input_ids)  # (1, S, D)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, model.vision(torch.from_numpy(pixels))[0])
    cache = DynamicCache()
    out = model.lm(inputs_embeds=embeds, position_ids=torch.from_numpy(positions), cache=cache, use_cache=True)
    tokens = []
    for t in range(n):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        out = model.lm(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[decode_start + t]]),
                       cache=cache, use_cache=True)
    return tokens


# --- tests --------------------------------------------------------------------------------------------

def test_toy_is_registered_only_inside_the_fixture(toy_registered):
    assert ex_families.resolve(PRESET) is toy_registered
    assert rt_families.rules_class(NAME) is ToyRules


def test_toy_manifest(toy_pipe):
    m = toy_pipe.manifest
    assert m.family == NAME and m.model == PRESET
    assert m.tokens.image_seq_len == N_VISION and m.tokens.image_token == IMAGE_TOKEN
    assert m.preprocess.image_size == IMAGE_SIZE and not m.preprocess.center_crop
    assert m.decoder.num_layers == 4 and m.decoder.vocab_size == VOCAB
    assert isinstance(toy_pipe.rules, ToyRules)


def test_toy_prompt_and_positions(toy_pipe, image):
    p = toy_pipe.prepare(Request(QUESTION, image=image, max_new_tokens=N_NEW))
    assert p.ids[:N_VISION] == [toy_pipe.manifest.tokens.image_token_id] * N_VISION  # image first, no BOS
    assert p.spans == ((0, N_VISION),)
    S = len(p.ids)
    want = np.concatenate([np.arange(N_VISION), np.arange(N_VISION, S) + GAP])
    np.testing.assert_array_equal(p.positions.prefill, want[None])
    assert p.positions.decode_start == S + GAP
    assert p.vision.feeds["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def _eager_inputs(pipe, image):
    p = pipe.prepare(Request(QUESTION, image=image, max_new_tokens=N_NEW))
    return p, p.vision.feeds["pixel_values"]


def test_toy_ratio_one_equals_hf_greedy(toy_pipe, toy_registered, image):
    p, pixels = _eager_inputs(toy_pipe, image)
    out = toy_pipe.generate(QUESTION, image=image, keep_ratio=1.0, max_new_tokens=N_NEW, ignore_eos=True)
    model = toy_registered.load(PRESET, torch.float32).model
    want = hf_greedy(model, p.ids, pixels, p.positions.prefill, p.positions.decode_start, N_NEW)
    assert out.token_ids == want
    assert out.kept_positions == list(range(len(p.ids)))  # nothing pruned at ratio 1.0
    assert len(set(want)) > 1  # the toy's logits are peaked enough to vary


def test_toy_pruned_equals_eager_dart(toy_pipe, toy_registered, image):
    ratio = 0.25
    p, pixels = _eager_inputs(toy_pipe, image)
    out = toy_pipe.generate(QUESTION, image=image, keep_ratio=ratio, max_new_tokens=N_NEW, ignore_eos=True)
    model = toy_registered.load(PRESET, torch.float32).model
    eager = toy_registered.eager(model, DartConfig(keep_ratio=ratio))
    ref = eager.generate(torch.tensor([p.ids]), torch.from_numpy(pixels), max_new_tokens=N_NEW,
                         position_ids=torch.from_numpy(p.positions.prefill), rope_delta=GAP)
    # eager's kept_positions are position ids (with the toy's gap): back to sequence indices
    kept = np.searchsorted(p.positions.prefill[0], ref.kept_positions).tolist()
    c = DartConfig(keep_ratio=ratio).counts(N_VISION, len(p.ids) - N_VISION)
    assert len(out.kept_positions) == len(p.ids) - N_VISION + c.kept_vision  # 20 of 64 vision tokens
    assert out.kept_positions == kept
    assert out.token_ids == ref.token_ids


def test_toy_text_only_equals_hf_greedy(toy_pipe, toy_registered):
    """No image: the toy's template without the image token, positions arange(S) with no gap."""
    p = toy_pipe.prepare(Request(QUESTION, max_new_tokens=N_NEW))
    assert p.spans == () and p.positions.decode_start == len(p.ids)
    out = toy_pipe.generate(QUESTION, max_new_tokens=N_NEW, ignore_eos=True)
    model = toy_registered.load(PRESET, torch.float32).model
    pixels = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)  # unused: no image token in the ids
    want = hf_greedy(model, p.ids, pixels, p.positions.prefill, p.positions.decode_start, N_NEW)
    assert out.token_ids == want and out.kept_positions == list(range(len(p.ids)))

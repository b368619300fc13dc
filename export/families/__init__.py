"""Model families, one module each, registered by name. Dispatch is a dict lookup.

A family knows how to load its models (presets and local Hugging Face checkpoints), which torch
modules form the three stages (vision_encoder, embed_tokens, decoder), and what the torch-free
runtime needs to feed them (preprocessing, prompt template, token ids). LLaVA-NeXT (variable
vision-token counts) and Qwen2-VL (M-RoPE positions) plug in as further modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

_FAMILIES: dict[str, "Family"] = {}


class UnknownModel(ValueError):
    """--model names no preset of any family and no checkpoint directory."""


class ModelNotAvailable(RuntimeError):
    """The weights of a hub preset or checkpoint are not on this machine (or not readable)."""


@dataclass
class Loaded:
    """A model ready to export: the HF model, and what the runtime needs alongside the graphs."""

    family: "Family"
    name: str  # preset name or checkpoint directory
    model: Any  # torch.nn.Module (eval mode)
    tokenizer_json: str  # contents of tokenizer.json
    preprocess: dict
    prompt: dict
    tokens: dict
    image_seq_len: int
    save_checkpoint: Callable[[Path], None] | None = None  # for weights that exist nowhere else
    extra: dict = field(default_factory=dict)


@dataclass
class VisionExamples:
    """The vision stage's tracing inputs, its validation inputs (other sizes than traced) and the
    vision tokens per image the validation prompt uses."""

    trace: list
    validate: list[list]
    tokens: int


class Family:
    """Interface of a model family. Subclasses register one instance with `register`."""

    name: str = ""
    presets: dict[str, str] = {}  # preset name -> description
    # Random-weight presets the parity tests run on (default: "<name>-tiny").
    tiny_presets: tuple[str, ...] = ()
    # True: every image becomes the same vision-token count and the vision graph takes
    # pixel_values [images, 3, H, W] (tests/test_end_to_end.py's parity tests apply); False:
    # dynamic resolution (Qwen2-VL), whose parity tests live in the family's own test file.
    fixed_resolution: bool = True
    # export.build's --max-seq when not given: room for the longest image's tokens plus text.
    default_max_seq: int = 2048

    def tiny(self) -> tuple[str, ...]:
        return self.tiny_presets or (f"{self.name}-tiny",)

    def accepts_checkpoint(self, config: dict) -> bool:  # config.json of a local checkpoint
        raise NotImplementedError

    # Random-weight presets (name -> anything; `random_model` builds them) and hub presets (name ->
    # Hugging Face id, loaded from a local path or the HF cache only).
    random_presets: dict = {}
    hub_ids: dict[str, str] = {}

    def load(self, model: str, dtype, device=None) -> Loaded:
        """The model on `device` (default CPU) in `dtype`, with what the runtime needs: a random-weight
        preset (`random_model`; its checkpoint is saved with the engine, the weights exist nowhere
        else), a hub preset (`hub_ids`, local files only) or a checkpoint directory (`from_pretrained`),
        then the family's `loaded` record."""
        if model in self.random_presets:
            hf, processor = self.random_model(model, dtype, device)
            loaded = self.loaded(model, hf, processor)
            loaded.save_checkpoint = lambda d: (hf.save_pretrained(d), processor.save_pretrained(d))
            return loaded
        source = self.hub_ids.get(model, model)
        try:
            hf, processor = self.from_pretrained(source, dtype, local_only=model in self.hub_ids)
        except OSError as e:
            hub = source if not Path(source).is_dir() else next(iter(self.hub_ids.values()), "<hub id>")
            raise ModelNotAvailable(
                f"cannot load {source} ({str(e).splitlines()[0]}); point --model at a local checkpoint directory "
                f"(e.g. from `hf download {hub} --local-dir DIR`), or use --model {self.tiny()[0]}, which needs "
                "no download") from None
        return self.loaded(model, hf.to(device) if device else hf, processor)

    def random_model(self, model: str, dtype, device) -> tuple:
        """(HF model, HF processor) of a random-weight preset (seeded)."""
        raise NotImplementedError

    def from_pretrained(self, source: str, dtype, local_only: bool) -> tuple:
        """(HF model in eval mode, HF processor) from a checkpoint directory or hub id (local files only
        when `local_only`); an OSError (files missing) becomes load's one-line ModelNotAvailable."""
        raise NotImplementedError

    def loaded(self, name: str, hf, processor) -> Loaded:
        """The Loaded record of an HF model and its processor (preprocess, prompt, token ids)."""
        raise NotImplementedError

    def vision_tokens(self, model: str) -> int:
        """Vision tokens per image, without loading weights (for --dry-run)."""
        raise NotImplementedError

    def stage_modules(self, loaded: Loaded, dart) -> dict:
        """{"vision_encoder": module, "embed_tokens": module, "decoder": FlatDecoder}. Default: the
        family's `vision_stage(hf)` and the text stages of `text_stages`."""
        return {"vision_encoder": self.vision_stage(loaded.model).eval(), **self.text_stages(loaded.model, dart)}

    def vision_stage(self, hf):
        """The vision stage's torch module (what the default stage_modules exports)."""
        raise NotImplementedError

    def text_stages(self, hf, dart) -> dict:
        """embed_tokens (the input embedding) and decoder (FlatDecoder: DartDecoder on the family's
        text adapter with DART's layer and pivots), the same for every family."""
        from dart_ops.decoder import DartDecoder, FlatDecoder
        from export.stages import EmbedTokens

        decoder = DartDecoder(self.text_adapter(hf), layer=dart.layer, pivots_image=dart.pivots_image,
                              pivots_text=dart.pivots_text)
        return {"embed_tokens": EmbedTokens(hf).eval(), "decoder": FlatDecoder(decoder).eval()}

    def apply_limits(self, loaded: Loaded, cfg) -> None:
        """Apply the export's size limits (export.build.BuildConfig) to what `load` recorded. Default:
        fixed-size images, so --max-pixels does not apply."""
        if getattr(cfg, "max_pixels", None) is not None:
            raise ValueError(f"--max-pixels applies to dynamic-resolution families (qwen2_vl); {self.name} "
                             "images are resized to one size")

    def vision_axes(self, loaded: Loaded, max_batch: int) -> dict:
        """{name: runtime.manifest.Axis} of the vision side: "vision_tokens" (vision tokens per image,
        min/opt/max) and the axes the vision stage declares beyond the text axes (images, crops,
        patches, windows). Default: a fixed count, loaded.image_seq_len, and no axes of its own."""
        from runtime.manifest import Axis

        n = loaded.image_seq_len
        return {"vision_tokens": Axis(n, n, n, "vision_tokens")}

    def vision_examples(self, loaded: Loaded, decl) -> "VisionExamples":
        """Inputs of the vision stage for tracing and for validation on other sizes (torch tensors in
        the declaration's order). Default: random values with every dynamic dim 2 for tracing (1
        would be specialised away) and 1 for validation; families whose vision inputs carry
        structure (index tables, grids) override it."""
        from export.declare import example_inputs

        axes = {d for t in decl.inputs for d in t.dims if isinstance(d, str)}
        return VisionExamples(trace=example_inputs(decl, dict.fromkeys(axes, 2)),
                              validate=[example_inputs(decl, dict.fromkeys(axes, 1), seed=1)],
                              tokens=loaded.image_seq_len)

    def stage_decls(self, loaded: Loaded, flat, dims: dict, dtype: str) -> dict:
        """{stage: export.declare.StageDecl}: names, dtypes and dims over named axes of each stage's
        inputs and outputs (the manifest's signatures, example inputs and dynamic shapes derive
        from it). flat: the FlatDecoder; dims: the decoder sizes; dtype: "float32" or "float16"."""
        raise NotImplementedError

    def text_adapter(self, hf):
        """dart_ops.text_adapter.TextAdapter of the HF model's language model (DartDecoder's view).
        Default: an HF VLM's `model.language_model` and `lm_head`, adapted by the stack's model_type
        (llama, mistral, qwen2, the Qwen2-VL M-RoPE stacks)."""
        from dart_ops.text_adapter import for_model

        return for_model(hf.model.language_model, hf.lm_head)

    def eager(self, hf, dart):
        """The eager DART baseline (dart_ops.eager.EagerDart) for the HF model, on text_adapter."""
        from dart_ops.eager import EagerDart

        return EagerDart(hf, dart, text=self.text_adapter(hf))

    def flop_shape(self, config: dict):
        """dart_ops.flops.ModelShape from the checkpoint's config.json (the benchmark's FLOP model)."""
        raise NotImplementedError


def build_seeded(make: Callable[[], Any], seed: int, dtype, device, weight_scale: float = 1.0):
    """A random-weight model: `make()` run after torch.manual_seed(seed) with `dtype` as the default
    dtype on `device` (default CPU), then 2-D non-embedding, non-norm weights multiplied by
    weight_scale (> 1 peaks the logits so greedy output varies). Parameters are built in `dtype`;
    buffers that HF computes in fp32 on purpose (the rotary inv_freq) stay fp32, as from_pretrained
    leaves them: an fp16 inv_freq shifts RoPE phases by up to ~0.3 rad at position 600. Eval mode."""
    import torch

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device or "cpu"):
            model = make()
    finally:
        torch.set_default_dtype(old)
    if weight_scale != 1.0:
        with torch.no_grad():
            for name, w in model.named_parameters():
                if w.dim() == 2 and "embed" not in name and "norm" not in name:
                    w.mul_(weight_scale)
    return model.eval()


def register(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family (tests that register a family of their own clean up with this)."""
    _FAMILIES.pop(name, None)


def families() -> dict[str, Family]:
    _import_all()
    return dict(_FAMILIES)


def presets() -> dict[str, Family]:
    """Every preset name -> its family."""
    return {p: f for f in families().values() for p in f.presets}


def resolve(model: str) -> Family:
    """The family of a preset name or a local checkpoint directory (by its config.json)."""
    table = presets()
    if model in table:
        return table[model]
    path = Path(model)
    if path.is_dir():
        import json

        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise UnknownModel(f"{model} has no config.json: not a Hugging Face checkpoint directory")
        cfg = json.loads(cfg_path.read_text())
        for fam in families().values():
            if fam.accepts_checkpoint(cfg):
                return fam
        raise UnknownModel(f"{model}: model_type {cfg.get('model_type')!r} is not supported "
                           f"(families: {', '.join(sorted(families()))})")
    raise UnknownModel(f"unknown model {model!r}: use a preset ({', '.join(sorted(table))}) "
                       "or a local Hugging Face checkpoint directory")


def _import_all() -> None:
    from export.families import llava, llava_next, qwen2_vl  # noqa: F401  (register themselves)

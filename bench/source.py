"""What every row of a run shares: the engine (exported through export.build when missing), the
eager torch model, the model's HF config (for the FLOP model), tokenizer, template, token ids and
preprocessing, and the inputs (prompt ids, image span, pixels: bench.families, by family)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from bench.config import BenchConfig
from bench.families import Inputs, for_family, load_image
from bench.probes import BenchError
from dart_ops.spec import DartConfig
from export import families

log = logging.getLogger(__name__)


@dataclass
class Source:
    """What the rows share: the model's config, tokenizer, template, token ids and preprocessing."""

    model: str
    config: dict  # the HF config as a dict (for the family's FLOP shape)
    tokenizer_json: str
    prompt: object  # runtime.manifest.PromptSpec
    tokens: object  # runtime.manifest.TokenSpec
    preprocess: object  # the manifest's preprocess spec (runtime.manifest.PreprocessSpec, or its family's)
    dart: DartConfig
    family: str  # the manifest's family name (bench.families.FAMILIES key)


def make_inputs(src: Source, cfg: BenchConfig) -> Inputs:
    """The run's inputs (prompt ids with the image tokens expanded, span, pixels), built by the
    family's bench.families entry from the runtime's own PromptBuilder and preprocessing."""
    from tokenizers import Tokenizer

    from runtime.prompt import PromptBuilder

    fam = for_family(src.family)
    builder = PromptBuilder(Tokenizer.from_str(src.tokenizer_json), src.prompt, src.tokens)
    return fam.inputs(builder, src.preprocess, load_image(cfg.image, cfg.image_size, fam), cfg.prompt)


def ensure_engine(cfg: BenchConfig) -> Path:
    """cfg.engine_dir (or engines/<model>) holding an exported engine of cfg.model; exported now
    (export.build's defaults: fp32, opset 18, validated) when the directory has none."""
    from export.build import BuildConfig, build

    out = cfg.engine_dir or Path("engines") / Path(cfg.model.rstrip("/")).name
    manifest = out / "manifest.json"
    if manifest.is_file():
        model = json.loads(manifest.read_text()).get("model")
        if model != cfg.model:
            raise BenchError(f"{out} holds an engine of {model!r}, not {cfg.model!r}; pass --engine-dir "
                             "alone to benchmark it, or another --engine-dir")
        return out
    log.info("bench: no engine at %s; exporting %s first", out, cfg.model)
    if not log.isEnabledFor(logging.DEBUG):
        from export.build import _quiet_exporter

        _quiet_exporter()
    dart = cfg.dart if cfg.dart.keep_ratio else cfg.dart.with_ratio(0.111)
    build(BuildConfig(model=cfg.model, out=out, dart=dart))
    return out


def quantized_dir(engine_dir: Path, bits: int) -> Path:
    """Where the engine's int`bits` copy lives: the sibling directory <engine-dir>-int<bits>."""
    engine_dir = Path(engine_dir)
    return engine_dir.with_name(f"{engine_dir.name}-int{bits}")


def ensure_quantized(engine_dir: Path, bits: int) -> Path:
    """The weight-only int`bits` copy of the engine in `engine_dir` (quantized_dir), made now with
    export.quantize's defaults (--target ort: MatMulNBits on the decoder's linears, LM head in
    float; validated against the source) when the directory has no engine."""
    from export.quantize import QuantizeConfig, quantize
    from runtime.manifest import read_manifest

    out = quantized_dir(engine_dir, bits)
    if (out / "manifest.json").is_file():
        src, got = read_manifest(engine_dir, verify=False), read_manifest(out, verify=False)
        quant = got.stages["decoder"].quantization
        if got.model != src.model or quant is None or quant.bits != bits:
            what = f"int{quant.bits}" if quant else "a float"
            raise BenchError(f"{out} holds {what} engine of {got.model!r}, not an int{bits} copy of {src.model!r}; "
                             "move it away (the bench quantizes the engine into it)")
        return out
    log.info("bench: no int%d engine at %s; quantizing %s first", bits, out, engine_dir)
    quantize(QuantizeConfig(engine_dir=Path(engine_dir), out=out, bits=bits))
    return out


def engine_bytes(engine_dir: Path) -> dict[str, int]:
    """Bytes on disk per stage of an engine: its graph plus external data, from the manifest's files."""
    from export.quantize import stage_bytes
    from runtime.manifest import read_manifest

    m = read_manifest(engine_dir, verify=False)
    return {stage: stage_bytes(m, stage) for stage in m.stages}


def load_eager(model: str, engine_dir: Path | None, device: str, dtype: str):
    """(torch model, Loaded) by the family's loader: from the engine's saved checkpoint when there is
    one (the exact weights that were exported), else from `model` (presets build on `device`)."""
    import torch

    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    ckpt = engine_dir / "checkpoint" if engine_dir else None
    source = str(ckpt) if ckpt is not None and (ckpt / "config.json").is_file() else model
    loaded = families.resolve(source).load(source, torch_dtype, device=device)
    return loaded.model.eval(), loaded


def make_source(cfg: BenchConfig, engine_dir: Path | None, eager_model, loaded) -> Source:
    import runtime.families  # noqa: F401  (registers the families' preprocess kinds)
    from runtime.manifest import parse_any_preprocess, parse_prompt, parse_tokens, read_manifest

    if engine_dir is not None:
        m = read_manifest(engine_dir, verify=False)
        config = eager_model.config.to_dict() if eager_model is not None else config_dict(cfg.model, engine_dir)
        return Source(cfg.model, config, (engine_dir / "tokenizer.json").read_text(), m.prompt, m.tokens,
                      m.preprocess, m.dart.config(), m.family)
    return Source(cfg.model, eager_model.config.to_dict(), loaded.tokenizer_json, parse_prompt(loaded.prompt),
                  parse_tokens(loaded.tokens), parse_any_preprocess(loaded.preprocess), cfg.dart,
                  loaded.family.name)


def config_dict(model: str, engine_dir: Path) -> dict:
    """The model's HF config.json without the eager model: the engine's checkpoint, the checkpoint
    directory, else the family's model built on the meta device (no weights in memory; a hub
    checkpoint is read once: a Family.hf_config(model) would avoid that)."""
    for path in (engine_dir / "checkpoint" / "config.json", Path(model) / "config.json"):
        if path.is_file():
            return json.loads(path.read_text())
    import torch

    return families.resolve(model).load(model, torch.float32, device="meta").model.config.to_dict()

"""Export a vision-language model with DART inside into an engine directory.

    python -m export.build --model llava-tiny --ratio 0.111
    python -m export.build --model llava --ratio 0.111 --out engines/llava
    python -m export.build --model /path/to/llava-checkpoint --dry-run
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dart_ops.spec import DartConfig
from export.cli import EXIT_USAGE, Parser, dataclass_defaults, handle_sigterm, report
from export.outdir import Staging
from runtime.manifest import CHECKPOINT_DIR, Manifest

log = logging.getLogger("export.build")

EPILOG = """examples:
  python -m export.build --model llava-tiny --ratio 0.111        # tiny random model, no download
  python -m export.build --model llava --out engines/llava        # llava-hf/llava-1.5-7b-hf from the HF cache
  python -m export.build --model ./my-llava-checkpoint --dry-run  # print what would be exported
  python -m export.build --model llava-tiny --target trt          # + TensorRT engines (on the target GPU)
"""


# Opsets an export may target: DartPruneSlots' body needs 17; TensorRT 10.3's ONNX parser reads up to 20.
OPSETS = (17, 20)
QUANTIZE = {"none": None, "int8": 8, "int4": 4}  # --quantize -> weight bits
FLOAT_DIR = "float"  # --quantize: the float export, inside the staging directory, removed before publishing


class BuildError(RuntimeError):
    """A failure the user can act on (reported as one line, exit 1)."""


@dataclass(frozen=True)
class BuildConfig:
    model: str
    out: Path
    dart: DartConfig
    dtype: str = "fp32"
    opset: int = 18
    max_seq: int | None = None  # None: the family's default_max_seq (2048; LLaVA-NeXT 3584)
    max_context: int = 4096
    max_batch: int = 4
    validate: bool = True
    dry_run: bool = False
    verbose: bool = False
    target: str = "onnx"  # "trt": also build TensorRT engines here (python -m export.trt)
    max_pixels: int | None = None  # dynamic-resolution families: cap on an image's resized area
    quantize: str = "none"  # "int8" / "int4": weight-only quantization after export (export/quantize.py, ort)


def parse_args(argv=None) -> BuildConfig:
    d, dart_d = dataclass_defaults(BuildConfig), DartConfig()  # dart_d: the DART defaults
    p = Parser(prog="python -m export.build", description="Export a VLM with DART token pruning to ONNX.",
               epilog=EPILOG)
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True,
                   help="preset (llava, llava-tiny, qwen2-vl-tiny, qwen2.5-vl, ...) or a local Hugging Face "
                        "checkpoint directory")
    m.add_argument("--dtype", choices=["fp32", "fp16"], default=d["dtype"], help="weights and activations")
    g = p.add_argument_group("DART")
    g.add_argument("--ratio", type=float, default=dart_d.keep_ratio,
                   help="default keep ratio of vision tokens, in (0, 1]; the runtime can override it")
    g.add_argument("--layer", type=int, default=dart_d.layer, help="prune at the input of decoder layer K")
    g.add_argument("--pivots-image", type=int, default=dart_d.pivots_image, help="image pivot tokens")
    g.add_argument("--pivots-text", type=int, default=dart_d.pivots_text, help="text pivot tokens")
    o = p.add_argument_group("output")
    o.add_argument("--out", "--engine-dir", dest="out", type=Path, default=None,
                   help="engine directory to write (default: engines/<model>)")
    o.add_argument("--opset", type=int, default=d["opset"], help=f"ONNX opset, {OPSETS[0]}..{OPSETS[1]}")
    o.add_argument("--max-seq", type=int, default=d["max_seq"],
                   help="longest prompt in tokens (default: the family's, 2048; LLaVA-NeXT 3584 for its up to "
                        "2928 vision tokens per image)")
    o.add_argument("--max-context", type=int, default=d["max_context"], help="prompt + generated tokens")
    o.add_argument("--max-batch", type=int, default=d["max_batch"], help="largest batch")
    o.add_argument("--max-pixels", type=int, default=d["max_pixels"],
                   help="Qwen2-VL / Qwen2.5-VL: largest image area after resizing, in pixels (default: the "
                        "checkpoint's max_pixels, capped so one image's tokens fit DartPruneSlots and --max-seq)")
    o.add_argument("--target", choices=["onnx", "trt"], default=d["target"],
                   help="onnx: the ONNX graphs; trt: also build TensorRT engines on this machine "
                        "(same as python -m export.trt --engine-dir OUT afterwards; needs TensorRT)")
    o.add_argument("--quantize", choices=list(QUANTIZE), default=d["quantize"],
                   help="quantize the decoder's linear layers after export (ONNX Runtime MatMulNBits, the "
                        "defaults of python -m export.quantize; validated against the float export)")
    o.add_argument("--no-validate", dest="validate", action="store_false", default=d["validate"],
                   help="skip the comparison with eager PyTorch (and the quantized engine's with the float)")
    o.add_argument("--dry-run", action="store_true", default=d["dry_run"],
                   help="print the resolved configuration and exit")
    o.add_argument("-v", "--verbose", action="store_true", default=d["verbose"],
                   help="debug logging and tracebacks")
    a = p.parse_args(argv)
    try:
        dart = DartConfig(layer=a.layer, pivots_image=a.pivots_image, pivots_text=a.pivots_text, keep_ratio=a.ratio)
    except ValueError as e:
        p.error(str(e))
    if not OPSETS[0] <= a.opset <= OPSETS[1]:
        p.error(f"--opset must be in [{OPSETS[0]}, {OPSETS[1]}] (17: DartPruneSlots' body needs it; {OPSETS[1]}: the "
                f"newest the exporter and TensorRT 10.3's parser both take), got {a.opset}")
    for flag, value in (("--max-seq", a.max_seq or 1), ("--max-context", a.max_context), ("--max-batch", a.max_batch),
                        ("--max-pixels", a.max_pixels or 1)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if a.max_seq is not None and a.max_seq > a.max_context:
        p.error(f"--max-seq {a.max_seq} exceeds --max-context {a.max_context}")
    if a.quantize != "none" and a.target == "trt":
        p.error("--quantize writes ONNX Runtime's MatMulNBits, which TensorRT does not parse; for TensorRT "
                "export first, then: python -m export.quantize --target trt --engine-dir OUT --out OUT-int4")
    out = a.out if a.out is not None else Path("engines") / Path(a.model.rstrip("/")).name
    return BuildConfig(a.model, out, dart, a.dtype, a.opset, a.max_seq, a.max_context, a.max_batch,
                       a.validate, a.dry_run, a.verbose, a.target, a.max_pixels, a.quantize)


def with_family_defaults(cfg: BuildConfig, family) -> BuildConfig:
    """`cfg` with what the user left to the family filled in (--max-seq); BuildError when the family's
    default does not fit the --max-context given."""
    if cfg.max_seq is not None:
        return cfg
    if family.default_max_seq > cfg.max_context:
        raise BuildError(f"{family.name}'s default --max-seq {family.default_max_seq} exceeds --max-context "
                         f"{cfg.max_context}; raise --max-context or give a smaller --max-seq")
    return dataclasses.replace(cfg, max_seq=family.default_max_seq)


def check_sizes(cfg: BuildConfig, n_vision: int) -> None:
    """Refuse sizes the export would fail on only after minutes of tracing."""
    from export.axes import min_seq

    need = min_seq(n_vision)
    if cfg.max_seq < need:
        raise BuildError(f"--max-seq {cfg.max_seq} is too short for this model: a prompt with its {n_vision} vision "
                         f"tokens needs --max-seq >= {need}")


def build(cfg: BuildConfig) -> Manifest | None:
    """Export `cfg.model` into `cfg.out`; returns its manifest (None with dry_run). Raises BuildError,
    ValueError, export.families.UnknownModel, export.validate.ValidationError."""
    from export import families

    family = families.resolve(cfg.model)
    cfg = with_family_defaults(cfg, family)
    check_sizes(cfg, family.vision_tokens(cfg.model))
    if cfg.dry_run:
        return None
    import torch
    from tqdm import tqdm

    from export import stages
    from export.axes import declare
    from export.declare import check_graph
    from export.validate import validate

    dtype = torch.float16 if cfg.dtype == "fp16" else torch.float32
    t_start = time.perf_counter()
    with Staging(cfg.out) as staging:
        tmp = staging.tmp if QUANTIZE[cfg.quantize] is None else staging.tmp / FLOAT_DIR
        tmp.mkdir(exist_ok=True)
        steps = tqdm(total=6 + (QUANTIZE[cfg.quantize] is not None), desc="export", unit="step",
                     file=sys.stderr, disable=not sys.stderr.isatty())
        steps.set_postfix_str("loading model")
        loaded = family.load(cfg.model, dtype)
        family.apply_limits(loaded, cfg)
        n_layers = family.text_adapter(loaded.model).dims.layers
        if not 1 <= cfg.dart.layer < n_layers:
            raise BuildError(f"--layer {cfg.dart.layer} must be in [1, {n_layers - 1}] for this {n_layers}-layer decoder")
        modules = loaded.family.stage_modules(loaded, cfg.dart)
        window = modules["decoder"].decoder.text.sliding_window
        if window is not None and cfg.max_context > window:
            raise BuildError(f"--max-context {cfg.max_context} exceeds this decoder's sliding attention window "
                             f"{window}; the exported attention has no window, so use --max-context <= {window}")
        dims = stages.decoder_dims(modules["decoder"])
        vision_axes = family.vision_axes(loaded, cfg.max_batch)
        sizes = stages.dart_sizes(modules["decoder"], vision_axes["vision_tokens"].max)
        axes = declare(cfg.max_batch, cfg.max_seq, cfg.max_context, vision_axes, sizes["max_span"], cfg.dart)
        decls = family.stage_decls(loaded, modules["decoder"], dims, _dtype_name(cfg.dtype))
        examples = family.vision_examples(loaded, decls["vision_encoder"])
        steps.update()
        files: list[str] = []
        with stages.eager_attention(loaded.model), torch.no_grad():
            exporters = {"vision_encoder": functools.partial(stages.export_vision_encoder, example=examples.trace),
                         "embed_tokens": stages.export_embed_tokens,
                         "decoder": functools.partial(stages.export_decoder, sizes=sizes)}
            for stage, fn in exporters.items():
                steps.set_postfix_str(stage)
                files += stages.timed(stage, fn, modules[stage], decls[stage], axes, cfg.opset, tmp)
                check_graph(decls[stage], tmp / decls[stage].file)  # every declared dynamic axis still dynamic
                steps.update()
            (tmp / "tokenizer.json").write_text(loaded.tokenizer_json)
            files.append("tokenizer.json")
            if cfg.validate:
                steps.set_postfix_str("validating")
                validate(tmp, modules, decls, examples, dims, lambda L, after: cfg.dart.counts(L, after), dtype,
                         tol=1e-4 if dtype == torch.float32 else 2e-2)
            steps.update()
        checkpoint = None
        if loaded.save_checkpoint is not None:
            loaded.save_checkpoint(tmp / CHECKPOINT_DIR)
            checkpoint = sorted(p.relative_to(tmp / CHECKPOINT_DIR).as_posix()
                                for p in (tmp / CHECKPOINT_DIR).rglob("*") if p.is_file())
        steps.update()
        result = _write_manifest(cfg, loaded, tmp, files, checkpoint, decls, dims, axes, sizes["max_span"])
        steps.update()
        if QUANTIZE[cfg.quantize] is not None:
            steps.set_postfix_str(f"quantizing ({cfg.quantize})")
            result = _quantize(cfg, tmp, staging.tmp)
            steps.update()
        steps.close()
        staging.publish()
    log.info("export: %s done in %.1f s -> %s", cfg.model, time.perf_counter() - t_start, staging.out)
    return result


def _write_manifest(cfg: BuildConfig, loaded, tmp: Path, files: list[str], checkpoint: list[str] | None,
                    decls: dict, dims: dict, axes: dict, max_span: int) -> Manifest:
    """Build the engine's Manifest (runtime/manifest.py's schema) and write it into `tmp`."""
    from export import manifest as writer
    from export.declare import signature
    from runtime import manifest as schema

    decoder = schema.DecoderSpec(**dims)
    m = schema.Manifest(
        directory=tmp,
        format_version=schema.FORMAT_VERSION,
        family=loaded.family.name,
        model=cfg.model,
        dtype=_dtype_name(cfg.dtype),
        opset=cfg.opset,
        dart=schema.DartSpec(layer=cfg.dart.layer, pivots_image=cfg.dart.pivots_image,
                             pivots_text=cfg.dart.pivots_text, keep_ratio=cfg.dart.keep_ratio, max_span=max_span),
        stages={name: signature(decl) for name, decl in decls.items()},
        decoder=decoder,
        dynamic_axes=dict(axes),
        max_context=cfg.max_context,
        tokens=schema.parse_tokens(loaded.tokens, decoder.vocab_size),
        preprocess=schema.parse_any_preprocess(loaded.preprocess),
        prompt=schema.parse_prompt(loaded.prompt),
        checkpoint=tuple(checkpoint or ()),
        files={name: writer.file_entry(tmp / name) for name in files},
        tools=writer.tool_versions(),
    )
    return writer.write(m)


def _quantize(cfg: BuildConfig, float_dir: Path, out: Path) -> Manifest:
    """Quantize the float export in `float_dir` (inside the staging directory) into `out` (the staging
    directory itself) with python -m export.quantize's defaults, then remove the float export."""
    import shutil

    from export.quantize import QuantizeConfig, quantize_into

    qcfg = QuantizeConfig(engine_dir=float_dir, out=out, bits=QUANTIZE[cfg.quantize], validate=cfg.validate,
                          verbose=cfg.verbose)
    result = quantize_into(float_dir, out, qcfg, link=True, progress=False)
    shutil.rmtree(float_dir)
    return result


def _dtype_name(dtype: str) -> str:
    """--dtype (fp32, fp16) -> the manifest's numpy-style name."""
    return "float16" if dtype == "fp16" else "float32"


def _quiet_exporter() -> None:
    """torch.onnx and onnxscript warn about things that are fine for our graphs (torchvision ops not
    registered, axis renames, deprecations). torch configures its own loggers on import, so this
    runs after importing it; -v keeps everything."""
    import warnings

    import torch  # noqa: F401  (its logging setup must run first)

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
    warnings.filterwarnings("ignore", message=r".*torchvision.*")
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. "CLIPImageProcessor requires torchvision": we do not use it


def main(argv=None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    if not cfg.verbose:
        # Hugging Face's own bars (loading/saving weights) would interleave with ours.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # runtime: its load / generate lines when --quantize checks the quantized engine
        for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx", "runtime"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    from export import families

    handle_sigterm()
    try:
        family = families.resolve(cfg.model)
        cfg = with_family_defaults(cfg, family)
        n_vision = family.vision_tokens(cfg.model)
        check_sizes(cfg, n_vision)
        log.info("%s (%s): K=%d, pivots %d+%d, keep ratio %g: %s; %s, opset %d, max seq %d, context %d -> %s",
                 cfg.model, family.name, cfg.dart.layer, cfg.dart.pivots_image, cfg.dart.pivots_text,
                 cfg.dart.keep_ratio, cfg.dart.describe(n_vision, 40) + ("" if family.fixed_resolution else
                 " for a typical image (the count varies with the image's size)"), cfg.dtype, cfg.opset, cfg.max_seq,
                 cfg.max_context, cfg.out)
        if cfg.dry_run:
            return 0
        if cfg.target == "trt":
            from export import trt

            trt._import_trt()  # fail before exporting, not after
        if not cfg.verbose:
            _quiet_exporter()
        build(cfg)
        if cfg.target == "trt":
            trt.build_engines(trt.TrtConfig(engine_dir=cfg.out, verbose=cfg.verbose))
    except families.UnknownModel as e:
        return report(e, False, "", EXIT_USAGE)
    except (Exception, KeyboardInterrupt) as e:  # one line for the user, the traceback with -v
        kinds = {"BuildError": "build", "TrtBuildError": "trt", "OutDirError": "out",
                 "QuantizeError": "quantize"}
        return report(e, cfg.verbose, kinds.get(type(e).__name__))
    return 0


if __name__ == "__main__":
    sys.exit(main())

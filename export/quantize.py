"""Weight-only int4 / int8 quantization of an exported engine directory, torch-free (onnx, onnxruntime,
numpy; tqdm when installed).

    python -m export.quantize --engine-dir engines/llava --out engines/llava-int4 --bits 4
    python -m export.quantize --engine-dir engines/llava --out engines/llava-int8 --bits 8
    python -m export.quantize --engine-dir engines/llava-fp16 --out engines/llava-trt4 --bits 4 --target trt

What is quantized: the weights of the decoder's linear layers (every MatMul of the main graph whose
weight is a constant: q/k/v/o, gate/up/down), with ONNX Runtime's own
`onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` (its default algorithm:
round-to-nearest per block of `--block-size` input rows, one scale per block). Activations stay in
the engine's dtype. Left in float by default: the LM head (`--lm-head` includes it), the embeddings
(the embed_tokens stage; `--embeddings`: int4 GatherBlockQuantized), the vision stage (`--vision`
quantizes its linear layers) and anything matched by `--exclude`. The quantizer never enters ONNX
functions, so `dart::DartPruneSlots`'s body, and the activations it reads (layer K-1's keys and hidden
states), stay float; the graph's inputs, outputs, metadata (dart.layer, ...) and functions are
checked to be unchanged afterwards. A Gemm (the exporter writes the LM head and Qwen's vision
linears as Gemm) is rewritten as the equal MatMul (+ Add for a bias) first, so the quantizer sees it.

Formats (recorded per stage in the manifest's `stages.<name>.quantization`, runtime/manifest.py
QuantSpec):
- `--target ort` (default): com.microsoft.MatMulNBits (ONNX Runtime's CPU / CUDA kernels), block 32,
  asymmetric (ORT's own class default; more accurate than symmetric on every engine measured, e.g.
  llava-tiny int4 logits cosine 0.985 vs 0.969), `accuracy_level` 4 (int8 compute on CPU:
  onnxruntime/mobius PR #402 measured 2.3x faster decode than without it on a Qwen2.5-0.5B Q4).
- `--target trt`: standard ONNX DequantizeLinear(int4 weight, block scales) -> MatMul (QDQ; the
  quantizer raises the opset to 21, where blocked DequantizeLinear exists, and the functions'
  imports follow). TensorRT's INT4 is weight-only, symmetric, with per-block scales of block size
  64 or 128 along one of the last two dims ("Quantization Schemes", docs.nvidia.com/deeplearning/
  tensorrt/latest/inference-library/quantized-types-schemes.html; INT4 weight-only block
  quantization since TensorRT 10.0, release notes of NVIDIA/TensorRT v10.0.0), so asymmetric
  weights, other block sizes and 8 bits (ORT's QDQ writer is 4-bit only) are refused, and the
  scales are made positive as onnx-tensorrt requires (export/quantize_graph.py positive_scales).
  `python -m export.check_trt` accepts the result; no TensorRT build of it has been run.

The source directory is never written: the new one is built in export.outdir.Staging (the same
rules as export.build's --out) and published only after validation. Unchanged files (the other
stages, tokenizer.json, checkpoint/) are copied, so it is self-contained; TensorRT engines of the
source are not (they hold the float weights): build new ones from the quantized graphs.

Validation (default; --no-validate skips it): the source and the quantized engine answer the same
prompt and image (examples/sample.png) with runtime.load, at keep ratio 1.0 and at the manifest's
ratio; export/quantize_check.py computes first-step logits cosine, max relative error, greedy
agreement over 32 tokens and DART kept-index overlap, prints them and checks the thresholds it
documents (with the measurements behind them). A failure is one line (ValidationError), exit 1,
nothing published.

Memory and time. The quantizer holds a stage graph with all its weights (onnx.load) plus the
quantized copy. Measured peak RSS (resource.getrusage, quantization alone) above the ~115 MiB the
libraries take: llava-bench's decoder (160 MiB of fp32 weights; 80 MiB as fp16) 1.5-1.8x the source
decoder's bytes, int4 or int8; --lm-head adds about 3x the LM head's bytes (its MatMul copy); 1.7-2.5 s.
Extrapolated to LLaVA-1.5-7B (an estimate, not measured: no 7B export fits this machine): from an
fp16 export (13.2 GB decoder) about 21-24 GB (+1 GB with --lm-head) and a few minutes; from fp32
twice that. Validation then runs both engines on ONNX Runtime CPU (about the source's plus the
quantized engine's bytes, ~19 GB for 7B fp16 -> int4; slow on a CPU: use --no-validate there and
compare on the target). Quantize 7B on a host with >= 32 GB of RAM, not on a Jetson.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from export.cli import Parser, dataclass_defaults, handle_sigterm, report
from export.outdir import Staging
from export.quantize_graph import (  # noqa: F401  (QuantizeError, lm_head: part of this module's API)
    FORMATS,
    QuantizeError,
    Scheme,
    StagePlan,
    lm_head,
    plan_graph,
    quantize_graph,
)
from runtime.manifest import CHECKPOINT_DIR, STAGE_NAMES, TOKENIZER_NAME, Manifest, QuantSpec, read_manifest

log = logging.getLogger("export.quantize")

EPILOG = """examples:
  python -m export.quantize --engine-dir engines/llava --out engines/llava-int4 --bits 4
  python -m export.quantize --engine-dir engines/llava --out engines/llava-int8 --bits 8 --lm-head
  python -m export.quantize --engine-dir engines/llava-fp16 --out engines/llava-int4-trt --bits 4 --target trt
  python -m export.quantize --engine-dir engines/llava --out engines/x --bits 4 --exclude 'node_linear_2*'

exit codes: 0 written; 1 failed (source engine, --out not ours, validation; one line, nothing
written); 2 usage error (a bad flag or combination, found before any work).
"""

BLOCK_SIZES = (32, 64, 128)
TRT_BLOCK_SIZES = (64, 128)  # TensorRT's INT4 block sizes (docs page in the module docstring)
DEFAULT_BLOCK = {"ort": 32, "trt": 128}
DEFAULT_ACCURACY_LEVEL = 4  # MatMulNBits: int8 compute on CPU (ignored by kernels that lack it)


@dataclass(frozen=True)
class QuantizeConfig:
    engine_dir: Path
    out: Path
    bits: int = 4
    block_size: int | None = None  # None: DEFAULT_BLOCK[target]
    symmetric: bool | None = None  # None: asymmetric for ort (more accurate, measured), symmetric for trt
    target: str = "ort"  # "ort": MatMulNBits; "trt": QDQ (DequantizeLinear int4 -> MatMul)
    exclude: tuple[str, ...] = ()  # node (or weight) names / fnmatch patterns left in float
    lm_head: bool = False
    embeddings: bool = False
    vision: bool = False
    accuracy_level: int | None = None  # None: DEFAULT_ACCURACY_LEVEL for ort; not used by trt
    validate: bool = True
    verbose: bool = False

    @property
    def block(self) -> int:
        return self.block_size if self.block_size is not None else DEFAULT_BLOCK[self.target]

    @property
    def sym(self) -> bool:
        return self.target == "trt" if self.symmetric is None else self.symmetric

    @property
    def level(self) -> int | None:
        if self.target != "ort":
            return None
        return DEFAULT_ACCURACY_LEVEL if self.accuracy_level is None else self.accuracy_level

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.block, self.sym, self.target, self.level)


def config_problem(cfg: QuantizeConfig) -> str | None:
    """Why this combination of options cannot be honoured (one line), or None."""
    if cfg.bits not in (4, 8):
        return f"--bits must be 4 or 8, got {cfg.bits}"
    if cfg.block not in BLOCK_SIZES:
        return f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {cfg.block}"
    if cfg.target == "trt":
        if not cfg.sym:
            return ("--target trt needs symmetric weights: TensorRT's INT4 has no zero points "
                    "(drop --asymmetric)")
        if cfg.block not in TRT_BLOCK_SIZES:
            return f"--target trt takes --block-size 64 or 128 (TensorRT's INT4 block sizes), got {cfg.block}"
        if cfg.bits != 4:
            return ("--target trt quantizes to int4 only (ONNX Runtime's QDQ writer is 4-bit); "
                    "use --target ort")
        if cfg.embeddings:
            return "--embeddings needs --target ort (ONNX Runtime writes no QDQ form for Gather)"
        if cfg.accuracy_level is not None:
            return "--accuracy-level is a MatMulNBits attribute: it applies to --target ort only"
    if cfg.embeddings and cfg.bits != 4:
        return "--embeddings needs --bits 4 (ONNX Runtime's GatherBlockQuantized writer is 4-bit only)"
    return path_problem(cfg.engine_dir, cfg.out)


def path_problem(engine_dir: Path, out: Path) -> str | None:
    """--out must be another directory than --engine-dir, neither inside the other."""
    src, dst = Path(os.path.realpath(engine_dir)), Path(os.path.realpath(out))
    if src == dst:
        return f"--out {out} is the source engine directory; write the quantized engine to another directory"
    if src in dst.parents:
        return f"--out {out} lies inside --engine-dir {engine_dir}; choose a directory outside it"
    if dst in src.parents:
        return f"--out {out} contains --engine-dir {engine_dir}; choose a directory outside it"
    return None


def parse_args(argv=None) -> QuantizeConfig:
    d = dataclass_defaults(QuantizeConfig)
    p = Parser(prog="python -m export.quantize", epilog=EPILOG,
               description="Quantize an engine directory's weights to int4 / int8 (weight-only) into a new "
                           "one.")
    io = p.add_argument_group("engine directories")
    io.add_argument("--engine-dir", type=Path, required=True, help="source engine directory (never written)")
    io.add_argument("--out", type=Path, required=True, help="quantized engine directory to write")
    q = p.add_argument_group("quantization")
    q.add_argument("--bits", type=int, choices=(4, 8), required=True, help="weight bits")
    q.add_argument("--block-size", type=int, choices=BLOCK_SIZES, default=d["block_size"],
                   help=f"weights per scale along the input dim (default: {DEFAULT_BLOCK['ort']} for ort, "
                        f"{DEFAULT_BLOCK['trt']} for trt)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_const", const=True,
                     default=d["symmetric"], help="no zero points (default with --target trt)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_const", const=False,
                     help="a zero point per block (default with --target ort: more accurate, see README)")
    q.add_argument("--target", choices=tuple(FORMATS), default=d["target"],
                   help="ort: com.microsoft.MatMulNBits for ONNX Runtime; trt: DequantizeLinear(int4) -> "
                        "MatMul for TensorRT (symmetric, block 64 or 128)")
    q.add_argument("--accuracy-level", type=int, choices=range(5), default=d["accuracy_level"], metavar="N",
                   help=f"MatMulNBits compute type, 0-4 (4: int8 compute on CPU; default "
                        f"{DEFAULT_ACCURACY_LEVEL} with --target ort)")
    w = p.add_argument_group("what to quantize (default: the decoder's linear layers, not the LM head)")
    w.add_argument("--lm-head", action="store_true", default=d["lm_head"], help="also the LM head")
    w.add_argument("--embeddings", action="store_true", default=d["embeddings"],
                   help="also the embed_tokens table (int4 GatherBlockQuantized, --target ort)")
    w.add_argument("--vision", action="store_true", default=d["vision"],
                   help="also the vision stage's linear layers")
    w.add_argument("--exclude", nargs="+", action="extend", default=None, metavar="NODE_OR_PATTERN",
                   help="leave these nodes in float: node or weight names, or fnmatch patterns "
                        "('node_linear_1*')")
    o = p.add_argument_group("output")
    o.add_argument("--no-validate", dest="validate", action="store_false", default=d["validate"],
                   help="skip the comparison with the source engine")
    o.add_argument("-v", "--verbose", action="store_true", default=d["verbose"],
                   help="debug logging (the quantizer's too) and tracebacks")
    a = p.parse_args(argv)
    cfg = QuantizeConfig(a.engine_dir, a.out, a.bits, a.block_size, a.symmetric, a.target,
                         tuple(a.exclude or ()), a.lm_head, a.embeddings, a.vision, a.accuracy_level,
                         a.validate, a.verbose)
    problem = config_problem(cfg)
    if problem:
        p.error(problem)
    return cfg


# --- plans ---------------------------------------------------------------------------------------


def stages_to_quantize(cfg: QuantizeConfig) -> tuple[str, ...]:
    wanted = {"decoder": True, "vision_encoder": cfg.vision, "embed_tokens": cfg.embeddings}
    return tuple(s for s in STAGE_NAMES if wanted[s])


def make_plans(src: Manifest, cfg: QuantizeConfig) -> dict[str, StagePlan]:
    """Plans for the stages to quantize, from the graphs' structure (weights not loaded)."""
    import onnx

    used: set[str] = set()
    plans = {}
    for stage in stages_to_quantize(cfg):
        done = src.stages[stage].quantization
        if done is not None:
            raise QuantizeError(f"{stage} of {src.directory} is already int{done.bits}; quantize the float "
                                "engine it was made from instead")
        model = onnx.load(str(src.path(src.stages[stage].file)), load_external_data=False)
        plans[stage] = plan_graph(model, stage, not cfg.lm_head, cfg.exclude, used)
    unused = [p for p in cfg.exclude if p not in used]
    if unused:
        raise QuantizeError(f"--exclude {unused[0]!r} matches no linear layer of the stages being quantized "
                            f"({', '.join(plans)}); -v lists their node names")
    return plans


# --- the engine directory --------------------------------------------------------------------------


def _stage_files(m: Manifest, stage: str) -> list[str]:
    """A stage's graph and the external-data files it references (engine-relative names)."""
    from runtime.onnx_refs import external_data_locations

    graph = m.stages[stage].file
    folder = Path(graph).parent
    return [graph] + [(folder / loc).as_posix() for loc in external_data_locations(m.path(graph))]


def _copy(src: Path, dst: Path, link: bool) -> None:
    """Copy a file (link=True: hardlink when the source is a throwaway directory, e.g. export.build's
    float export; a hardlink to a user's engine would share its modes, which Staging.publish sets)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def copy_unchanged(src: Manifest, tmp: Path, skip: set[str], link: bool) -> list[str]:
    """Copy every file of the source engine except `skip` (quantized stages) and TensorRT engines;
    returns the names copied (checkpoint/ files not included: the manifest lists them apart)."""
    engines = set(src.tensorrt.engines.values()) if src.tensorrt else set()
    if engines:
        log.info("quantize: not copying the source's TensorRT engines (%s): they hold the float weights; "
                 "build new ones from the quantized graphs with python -m export.trt",
                 ", ".join(sorted(engines)))
    names = [n for n in src.files if n not in skip and n not in engines]
    if TOKENIZER_NAME not in names:
        names.append(TOKENIZER_NAME)
    for name in names:
        _copy(src.path(name), tmp / name, link)
    for name in src.checkpoint:
        _copy(src.path(f"{CHECKPOINT_DIR}/{name}"), tmp / CHECKPOINT_DIR / name, link)
    return names


def write_manifest(src: Manifest, tmp: Path, specs: dict[str, QuantSpec], files: list[str]) -> Manifest:
    """The source's manifest with the quantized stages' QuantSpec, fresh file hashes, no TensorRT section."""
    import onnxruntime

    from export import manifest as writer

    stages = {name: dataclasses.replace(spec, quantization=specs.get(name, spec.quantization))
              for name, spec in src.stages.items()}
    ordered = [n for n in src.files if n in files] + [n for n in files if n not in src.files]
    m = dataclasses.replace(
        src, directory=tmp, stages=stages, tensorrt=None,
        files={name: writer.file_entry(tmp / name) for name in ordered},
        tools={**src.tools, "onnxruntime_quantizer": onnxruntime.__version__},
    )
    return writer.write(m)


def _progress(total: int):
    """A tqdm bar on a terminal (tqdm comes with the export extra); log lines alone without it."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="quantize", unit="step", file=sys.stderr, disable=not sys.stderr.isatty())


def quantize_into(src_dir: Path, dst: Path, cfg: QuantizeConfig, link: bool = False,
                  progress: bool = True) -> Manifest:
    """Quantize the engine in `src_dir` into the existing directory `dst` (a staging directory: nothing
    here publishes it) and validate it unless cfg.validate is False. Returns dst's Manifest. `link`:
    hardlink the unchanged files (the source is a throwaway, export.build --quantize); `progress`: a
    tqdm bar on a terminal (off when the caller has its own). Raises QuantizeError, ValidationError
    (export.quantize_check), runtime EngineError."""
    t0 = time.perf_counter()
    src = read_manifest(src_dir)  # every file's sha256: never quantize a corrupt engine
    plans = make_plans(src, cfg)
    bar = _progress(len(plans) + 2 + int(cfg.validate)) if progress else None
    try:
        specs, files, skip = {}, [], set()
        for stage, plan in plans.items():
            _step(bar, stage)
            t = time.perf_counter()
            graph = src.path(src.stages[stage].file)
            spec, written = quantize_graph(graph, dst / src.stages[stage].file, plan, cfg.scheme, cfg.verbose)
            specs[stage], files = spec, files + written
            skip.update(_stage_files(src, stage))
            log.info("%s: %d nodes -> int%d %s (block %d, %s%s), %d left in float, in %.1f s", stage,
                     spec.nodes, spec.bits, _op_name(spec, plan), spec.block_size,
                     "symmetric" if spec.symmetric else "asymmetric",
                     f", accuracy level {spec.accuracy_level}" if spec.accuracy_level is not None else "",
                     len(spec.excluded), time.perf_counter() - t)
        _step(bar, "copying")
        files += copy_unchanged(src, dst, skip, link)
        _step(bar, "manifest")
        result = write_manifest(src, dst, specs, files)
        log.info("quantize: %s -> int%d in %.1f s, peak RSS %.0f MiB, decoder %s", src_dir, cfg.bits,
                 time.perf_counter() - t0, peak_rss_mib(), _size_change(src, result, "decoder"))
        if cfg.validate:
            from export import quantize_check

            _step(bar, "validating")
            quantize_check.validate(src.directory, dst, cfg.bits)
        _step(bar, "done")
    finally:
        if bar:
            bar.close()
    return result


def _op_name(spec: QuantSpec, plan: StagePlan) -> str:
    """What the quantized nodes are (QuantSpec.format "MatMulNBits" stands for ONNX Runtime's contrib-op
    form, GatherBlockQuantized included: the schema has no separate name for it)."""
    if plan.op_types == ("Gather",):
        return "com.microsoft.GatherBlockQuantized"
    return "com.microsoft.MatMulNBits" if spec.format == "MatMulNBits" else "DequantizeLinear -> MatMul (QDQ)"


def _step(bar, what: str) -> None:
    """Count the previous step done (none before the first) and name the next one on the bar."""
    if bar:
        if getattr(bar, "postfix", None):  # (a disabled tqdm has no postfix until one is set)
            bar.update()
        bar.set_postfix_str(what)


def stage_bytes(m: Manifest, stage: str) -> int:
    """Bytes of a stage's graph and its external data, from the manifest's `files`."""
    return sum(m.files[n].bytes or 0 for n in _stage_files(m, stage))


def _size_change(src: Manifest, dst: Manifest, stage: str) -> str:
    a, b = stage_bytes(src, stage), stage_bytes(dst, stage)
    return f"{a / 1e6:.1f} MB -> {b / 1e6:.1f} MB ({b / max(a, 1):.2f}x)"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quantize(cfg: QuantizeConfig) -> Manifest:
    """Quantize cfg.engine_dir into cfg.out (staged, validated, then published). Returns the new
    directory's Manifest. Raises QuantizeError, ValidationError, OutDirError, runtime EngineError."""
    problem = config_problem(cfg)
    if problem:
        raise QuantizeError(problem)
    with Staging(cfg.out) as staging:
        quantize_into(Path(cfg.engine_dir), staging.tmp, cfg)
        staging.publish()
    log.info("quantize: published %s", staging.out)
    return read_manifest(staging.out, verify=False)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    if not cfg.verbose:
        logging.getLogger("runtime").setLevel(logging.WARNING)  # its load / generate lines, once per engine
    handle_sigterm()
    try:
        quantize(cfg)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001  one line for the user, the traceback with -v
        kinds = {"QuantizeError": "quantize", "ValidationError": "validation", "OutDirError": "out",
                 "EngineError": "engine"}
        return report(e, cfg.verbose, kinds.get(type(e).__name__))
    return 0


if __name__ == "__main__":
    sys.exit(main())

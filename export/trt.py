"""Build TensorRT engines from an exported engine directory: the Jetson workflow is to export the
ONNX graphs on a host (`python -m export.build`) and build the engines on the device itself,
because a TensorRT plan only runs on the TensorRT version and GPU it was built for.

    python -m export.trt --engine-dir engines/llava-tiny                  # on the target device
    python -m export.trt --engine-dir engines/llava-tiny --dry-run        # print the profiles (no TensorRT needed)
    python -m export.build --model llava-tiny --target trt                # export + build on this machine

Writes vision_encoder.engine, embed_tokens.engine, decoder.engine next to the ONNX files and a
"tensorrt" section in manifest.json (TensorRT version, engine files, profiles, precision); the
runtime refuses engines built by another TensorRT version.

Optimization profiles come from the manifest's tensor signatures and dynamic_axes (declared once
at export, export/declare.py); int64 scalars whose values set shapes inside DartPrune (Slice, Range,
ConstantOfShape) name a value axis and become shape-tensor value ranges. The decoder gets two
profiles, so its weights are stored once in one engine:
    0 prefill  seq 1..max_seq, past_full = past_kept = 0, span/quota values over their axes
    1 decode   seq 1, past_full and past_kept 1..max_context, span_start = span_len = quota = 0
Written against the TensorRT 10.3 Python API (JetPack 6) through polygraphy (>= 0.49):
network_from_onnx_path, CreateConfig, Profile, engine_from_network, save_engine. TensorRT is
imported only when building; it is not installable on the development machines, so the build
itself is not run in CI (docs/JETSON.md says what is verified where).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from export.cli import EXIT_OK, Parser, dataclass_defaults, handle_sigterm, report
from runtime.manifest import Manifest

log = logging.getLogger("export.trt")

STAGES = ("vision_encoder", "embed_tokens", "decoder")
INSTALL_HINT = ("TensorRT is not installed: on Jetson it comes with JetPack 6 (TensorRT 10.3, "
                "`sudo apt install python3-libnvinfer`); on x86 servers `pip install tensorrt-cu12==10.3.*`; "
                "and `pip install polygraphy`")

EPILOG = """examples:
  python -m export.trt --engine-dir engines/llava-tiny                       # fp32 ONNX -> fp32 engines
  python -m export.trt --engine-dir engines/llava --workspace-mib 2048 --timing-cache ~/.cache/llava.cache
  python -m export.trt --engine-dir engines/llava-fp16                        # an --dtype fp16 export: fp16 engines
  python -m export.trt --engine-dir engines/llava-tiny --dry-run              # profiles only, no TensorRT needed
"""


class TrtBuildError(RuntimeError):
    """A failure the user can act on (reported as one line, exit 1)."""


@dataclass(frozen=True)
class TrtConfig:
    engine_dir: Path
    strongly_typed: bool = True  # precision from the ONNX types (export --dtype fp16 for fp16)
    fp16: bool = False  # builder FP16 flag; only for weakly typed networks
    workspace_mib: int | None = None  # memory-pool limit while building (edge boards run out)
    max_batch: int | None = None  # tighter than the export's axes, never wider
    max_seq: int | None = None
    max_context: int | None = None
    max_vision_tokens: int | None = None  # longest vision span DartPrune must take (<= dart.max_span)
    timing_cache: Path | None = None
    dry_run: bool = False
    verbose: bool = False


# --- profiles (pure: from the manifest, no TensorRT) --------------------------------------------


def _axes(manifest: dict, cfg: TrtConfig) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each dynamic axis, optionally tightened by the build flags (value axes
    follow: span_start below the prompt length, span_len and quota within --max-vision-tokens)."""
    axes = {n: (a["min"], a["opt"], a["max"]) for n, a in manifest["dynamic_axes"].items()}
    max_span = manifest["dart"]["max_span"]
    if cfg.max_vision_tokens is not None and cfg.max_vision_tokens > max_span:
        raise TrtBuildError(f"--max-vision-tokens {cfg.max_vision_tokens} exceeds the exported DartPrune's "
                            f"max_span {max_span}; re-export")
    seq_limit = None if cfg.max_seq is None else cfg.max_seq - 1
    limits = {"batch": ("--max-batch", cfg.max_batch), "seq": ("--max-seq", cfg.max_seq),
              "past_full": ("--max-context", cfg.max_context), "past_kept": ("--max-context", cfg.max_context),
              "span_start": ("--max-seq", seq_limit), "span_len": ("--max-vision-tokens", cfg.max_vision_tokens),
              "quota": ("--max-vision-tokens", cfg.max_vision_tokens)}
    for name, (flag, limit) in limits.items():
        if limit is None or name not in axes:
            continue
        lo, opt, hi = axes[name]
        if limit > hi:
            raise TrtBuildError(f"{flag} {limit} exceeds the exported axis '{name}' (max {hi}); re-export "
                                "with a larger limit")
        axes[name] = (lo, min(opt, limit), limit)
    return axes


def _shape(dims: list, axes: dict[str, tuple[int, int, int]], fixed: dict[str, tuple[int, int, int]]):
    """(min, opt, max) shapes of one input from its manifest dims."""
    out = ([], [], [])
    for d in dims:
        rng = fixed.get(d) or axes[d] if isinstance(d, str) else (d, d, d)
        for i in range(3):
            out[i].append(rng[i])
    return tuple(tuple(s) for s in out)


def profile_specs(manifest: dict, stage: str, cfg: TrtConfig | None = None) -> list[dict]:
    """Optimization profiles of one stage as plain data, from the manifest's tensor signatures and
    dynamic_axes only: [{"name": ..., "inputs": {input: {"min", "opt", "max", "kind": "shape"|"values"}}}].
    Inputs with a "values" axis (the decoder's span_start, span_len, quota) get that axis as a value
    range (TensorRT shape tensors). A stage with past_* inputs (the decoder) gets two profiles:
    prefill (empty past) and decode (one token, past 1..max_context, every value axis 0)."""
    cfg = cfg or TrtConfig(engine_dir=Path("."))
    axes = _axes(manifest, cfg)
    inputs = manifest["stages"][stage]["inputs"]

    def spec(name: str, fixed: dict) -> dict:
        table = {}
        for t in inputs:
            if t.get("values"):
                lo, opt, hi = fixed.get(t["values"]) or axes[t["values"]]
                table[t["name"]] = {"min": [lo], "opt": [opt], "max": [hi], "kind": "values"}
            else:
                lo, opt, hi = _shape(t["shape"], axes, fixed)
                table[t["name"]] = {"min": list(lo), "opt": list(opt), "max": list(hi), "kind": "shape"}
        return {"name": name, "inputs": table}

    used = {d for t in inputs for d in t["shape"] if isinstance(d, str)}
    if not {"past_full", "past_kept"} & used:
        return [spec("default", {})]
    prefill = spec("prefill", {"past_full": (0, 0, 0), "past_kept": (0, 0, 0)})
    ctx_full, ctx_kept = axes["past_full"], axes["past_kept"]
    decode = spec("decode", {"seq": (1, 1, 1), "past_full": (1, max(ctx_full[1], 1), ctx_full[2]),
                             "past_kept": (1, max(ctx_kept[1], 1), ctx_kept[2]),
                             **{t["values"]: (0, 0, 0) for t in inputs if t.get("values")}})
    return [prefill, decode]


def to_polygraphy(specs: list[dict], shape_tensors: set[str] | None = None) -> list:
    """polygraphy Profile objects. `shape_tensors`: the inputs TensorRT parsed as shape tensors
    (from the network at build time); a scalar that is not one gets the 0-d shape () instead of a
    value range. None: trust the specs' "kind"."""
    from polygraphy.backend.trt import Profile

    profiles = []
    for s in specs:
        p = Profile()
        for name, r in s["inputs"].items():
            if r["kind"] == "values" and shape_tensors is not None and name not in shape_tensors:
                p.add(name, (), (), ())
            elif r["kind"] != "values" and shape_tensors and name in shape_tensors:
                raise TrtBuildError(f"TensorRT parses input {name} as a shape tensor, but the manifest gives it no "
                                    "value range ('values'); re-export with this version of export.build")
            else:
                p.add(name, tuple(r["min"]), tuple(r["opt"]), tuple(r["max"]))
        profiles.append(p)
    return profiles


# --- build (needs TensorRT) ----------------------------------------------------------------------


def _import_trt():
    try:
        import tensorrt as trt
        from polygraphy.backend import trt as pg  # noqa: F401
    except ImportError as e:
        raise TrtBuildError(f"{INSTALL_HINT} ({e})") from None
    return trt


def build_engines(cfg: TrtConfig) -> dict:
    """Build the three engines into cfg.engine_dir and add the "tensorrt" section to its manifest.
    Returns that section."""
    from runtime.manifest import read_manifest

    if not (cfg.engine_dir / "manifest.json").is_file():
        raise TrtBuildError(f"{cfg.engine_dir} has no manifest.json: export it first with python -m export.build")
    schema = read_manifest(cfg.engine_dir, verify=False)  # EngineError: not ours, old version, bad values
    manifest = schema.to_json()
    specs = {stage: profile_specs(manifest, stage, cfg) for stage in STAGES}
    if cfg.dry_run:
        return {"profiles": specs}
    if cfg.fp16 and cfg.strongly_typed:
        raise TrtBuildError("--fp16 applies to weakly typed networks only (--no-strongly-typed); a strongly "
                            "typed network takes its precision from the ONNX graph: export with --dtype fp16")
    trt = _import_trt()
    from polygraphy.backend.trt import CreateConfig, engine_from_network, network_from_onnx_path, save_engine

    strongly = cfg.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if cfg.strongly_typed and not strongly:
        log.warning("tensorrt: this TensorRT (%s) has no strongly typed networks; building weakly typed",
                    trt.__version__)
    pools = {trt.MemoryPoolType.WORKSPACE: cfg.workspace_mib << 20} if cfg.workspace_mib else None
    engines = {}
    for stage in STAGES:
        onnx_path = cfg.engine_dir / schema.stages[stage].file
        out = cfg.engine_dir / f"{stage}.engine"
        t0 = time.perf_counter()
        log.info("%s: building TensorRT engine from %s (%s)...", stage, onnx_path.name,
                 "strongly typed" if strongly else ("fp16 allowed" if cfg.fp16 else "fp32"))
        network = network_from_onnx_path(str(onnx_path), strongly_typed=strongly or None)
        builder, net, _parser = network()
        shape_tensors = {net.get_input(i).name for i in range(net.num_inputs) if net.get_input(i).is_shape_tensor}
        config = CreateConfig(
            fp16=cfg.fp16 or None, profiles=to_polygraphy(specs[stage], shape_tensors),
            memory_pool_limits=pools,
            load_timing_cache=str(cfg.timing_cache) if cfg.timing_cache and cfg.timing_cache.is_file() else None,
        )
        engine = engine_from_network((builder, net, _parser), config=config,
                                     save_timing_cache=str(cfg.timing_cache) if cfg.timing_cache else None)
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        try:
            save_engine(engine, str(tmp))
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)  # interrupted: no debris in the engine directory
        engines[stage] = out.name
        log.info("%s: built in %.1f s -> %s (%.1f MiB; shape tensors: %s)", stage, time.perf_counter() - t0,
                 out.name, out.stat().st_size / 2**20, ", ".join(sorted(shape_tensors)) or "none")
    section = {
        "version": trt.__version__, "engines": engines, "strongly_typed": strongly, "fp16": cfg.fp16,
        "workspace_mib": cfg.workspace_mib, "profiles": specs,
    }
    _update_manifest(schema, section)
    return section


def _update_manifest(manifest: Manifest, section: dict) -> Manifest:
    """Add the engines (with sha256) and the "tensorrt" section; atomic replace of manifest.json."""
    from dataclasses import replace

    from runtime.manifest import FileEntry, TrtSpec, write_manifest

    files = dict(manifest.files)
    for name in section["engines"].values():
        files[name] = FileEntry.of(manifest.directory / name)
    trt = TrtSpec(version=section["version"], engines=dict(section["engines"]),
                  strongly_typed=section["strongly_typed"], fp16=section["fp16"],
                  workspace_mib=section["workspace_mib"], profiles=section["profiles"])
    manifest = replace(manifest, files=files, tensorrt=trt)
    write_manifest(manifest)
    return manifest


# --- CLI -----------------------------------------------------------------------------------------


def parse_args(argv=None) -> TrtConfig:
    d = dataclass_defaults(TrtConfig)
    p = Parser(prog="python -m export.trt", epilog=EPILOG,
               description="Build TensorRT engines from an exported engine directory (run it on the target "
                           "device).")
    p.add_argument("--engine-dir", type=Path, required=True,
                   help="directory written by python -m export.build")
    b = p.add_argument_group("build")
    b.add_argument("--no-strongly-typed", dest="strongly_typed", action="store_false",
                   default=d["strongly_typed"],
                   help="weakly typed network (TensorRT picks precisions; needed for --fp16)")
    b.add_argument("--fp16", action="store_true", default=d["fp16"],
                   help="allow fp16 kernels in a weakly typed network (DART's fp32 scoring may then run in "
                        "fp16 and pick other tokens; prefer exporting with --dtype fp16)")
    b.add_argument("--workspace-mib", type=int, default=d["workspace_mib"],
                   help="builder workspace memory-pool limit in MiB (default: TensorRT's, all free memory)")
    b.add_argument("--max-batch", type=int, default=d["max_batch"],
                   help="largest batch (default: the export's)")
    b.add_argument("--max-seq", type=int, default=d["max_seq"], help="longest prompt (default: the export's)")
    b.add_argument("--max-context", type=int, default=d["max_context"],
                   help="prompt + generated tokens (default: the export's)")
    b.add_argument("--max-vision-tokens", type=int, default=d["max_vision_tokens"],
                   help="longest vision span to prune (default: the manifest's dart.max_span)")
    b.add_argument("--timing-cache", type=Path, default=d["timing_cache"],
                   help="load and save the builder timing cache here")
    p.add_argument("--dry-run", action="store_true", default=d["dry_run"],
                   help="print the optimization profiles and exit")
    p.add_argument("-v", "--verbose", action="store_true", default=d["verbose"],
                   help="debug logging and tracebacks")
    a = p.parse_args(argv)
    for flag in ("workspace_mib", "max_batch", "max_seq", "max_context", "max_vision_tokens"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if not (a.engine_dir / "manifest.json").is_file():
        p.error(f"--engine-dir {a.engine_dir} has no manifest.json (export it first: python -m export.build)")
    return TrtConfig(a.engine_dir, a.strongly_typed, a.fp16, a.workspace_mib, a.max_batch, a.max_seq,
                     a.max_context, a.max_vision_tokens, a.timing_cache, a.dry_run, a.verbose)


def format_profiles(specs: dict[str, list[dict]]) -> str:
    lines = []
    for stage, profiles in specs.items():
        for i, prof in enumerate(profiles):
            lines.append(f"{stage} profile {i} ({prof['name']}):")
            for name, r in prof["inputs"].items():
                what = "values" if r["kind"] == "values" else "shape"
                lines.append(f"  {name:16s} {what:6s} min {r['min']}  opt {r['opt']}  max {r['max']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    handle_sigterm()
    try:
        result = build_engines(cfg)
        if cfg.dry_run:
            print(format_profiles(result["profiles"]))
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001  one line for the user, the traceback with -v
        return report(e, cfg.verbose, "trt" if isinstance(e, TrtBuildError) else None)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

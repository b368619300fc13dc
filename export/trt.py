"""Build TensorRT engines from an exported engine directory: the Jetson workflow is to export the
ONNX graphs on a host (`python -m export.build`) and build the engines on the device itself,
because a TensorRT plan only runs on the TensorRT version and GPU it was built for.

    python -m export.trt --engine-dir engines/llava-tiny                  # on the target device
    python -m export.trt --engine-dir engines/llava-tiny --dry-run        # print the profiles (no TensorRT needed)
    python -m export.build --model llava-tiny --target trt                # export + build on this machine

Writes vision_encoder.engine, embed_tokens.engine, decoder.engine next to the ONNX files and a
"tensorrt" section in manifest.json (TensorRT version, engine files, profiles, precision); the
runtime refuses engines built by another TensorRT version.

Optimization profiles come from the manifest's tensor signatures and dynamic_axes only (declared
once at export, export/declare.py): every input gets a shape range from its dims, min/opt/max from
the axes; a 0-d input (the decoder's int32 span_start, span_len, quota) gets the shape () in every
profile. No input is a shape tensor: the decoder takes its pruned length S' from the last dim of
kept_slots [batch, kept] and uses the span and quota as data only. Shape-tensor inputs are what
TensorRT 10.3's Python API handles worst (profile values through the int32-only `set_shape_input`,
host memory at run time; int64 values only from 10.11: docs/TENSORRT_10.3.md, section 4), so a
network in which TensorRT finds one is refused before building. The decoder gets two profiles, so
its weights are stored once in one engine:
    0 prefill  seq and kept over their axes, past_full = past_kept = 0
    1 decode   seq = kept = 1, past_full and past_kept 1..max_context
Written against the TensorRT 10.3 Python API (JetPack 6) through polygraphy (>= 0.49):
network_from_onnx_path, CreateConfig, Profile, engine_from_network, save_engine, ITensor.is_shape_tensor.
TensorRT is imported only when building; it is not installable on the development machines, so the
build itself is not run in CI (docs/JETSON.md says what is verified where).
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
    timing_cache: Path | None = None
    dry_run: bool = False
    verbose: bool = False


# --- profiles (pure: from the manifest, no TensorRT) --------------------------------------------

Range = tuple[int, int, int]  # (min, opt, max)


def _tighten(axis: Range, limit: int) -> Range:
    lo, opt, _ = axis
    return lo, min(opt, limit), limit


def _axes(manifest: dict, cfg: TrtConfig) -> dict[str, Range]:
    """(min, opt, max) of each dynamic axis, optionally tightened by the build flags: --max-batch
    bounds batch, --max-seq the prompt (seq) and the pruned prompt (kept, never longer than seq),
    --max-context both KV lengths. A flag wider than the exported axis is an error."""
    axes = {n: (a["min"], a["opt"], a["max"]) for n, a in manifest["dynamic_axes"].items()}
    limits = {"batch": ("--max-batch", cfg.max_batch), "seq": ("--max-seq", cfg.max_seq),
              "past_full": ("--max-context", cfg.max_context), "past_kept": ("--max-context", cfg.max_context)}
    for name, (flag, limit) in limits.items():
        if limit is None or name not in axes:
            continue
        if limit > axes[name][2]:
            raise TrtBuildError(f"{flag} {limit} exceeds the exported axis '{name}' (max {axes[name][2]}); "
                                "re-export with a larger limit")
        axes[name] = _tighten(axes[name], limit)
    if cfg.max_seq is not None and "kept" in axes:
        axes["kept"] = _tighten(axes["kept"], min(cfg.max_seq, axes["kept"][2]))
    if "seq" in axes and "past_full" in axes and axes["seq"][2] > axes["past_full"][2]:
        raise TrtBuildError(f"the longest prompt ({axes['seq'][2]} tokens) exceeds the longest context "
                            f"({axes['past_full'][2]}); lower --max-seq or raise --max-context")
    return axes


def _shape(name: str, dims: list, axes: dict[str, Range]) -> tuple[list[int], list[int], list[int]]:
    """min, opt and max shape of input `name` from its manifest dims (ints or axis names)."""
    out = ([], [], [])
    for d in dims:
        if isinstance(d, str) and d not in axes:
            raise TrtBuildError(f"input {name} has the dim '{d}', which manifest.json's dynamic_axes does not "
                                "declare; re-export with this version of export.build")
        rng = axes[d] if isinstance(d, str) else (d, d, d)
        for i in range(3):
            out[i].append(int(rng[i]))
    return out


def profile_specs(manifest: dict, stage: str, cfg: TrtConfig | None = None) -> list[dict]:
    """Optimization profiles of one stage as plain data, from the manifest's tensor signatures and
    dynamic_axes only: [{"name": ..., "inputs": {input: {"min": shape, "opt": shape, "max": shape}}}].
    Every input is an ordinary (execution) tensor; a 0-d one gets the shape () everywhere. A stage
    with past_* inputs (the decoder) gets two profiles: prefill (empty past; seq and kept over their
    axes) and decode (seq = kept = 1, past 1..max_context, opt from the axes)."""
    cfg = cfg or TrtConfig(engine_dir=Path("."))
    axes = _axes(manifest, cfg)
    inputs = manifest["stages"][stage]["inputs"]

    def spec(name: str, fixed: dict[str, Range]) -> dict:
        table = {}
        for t in inputs:
            lo, opt, hi = _shape(t["name"], t["shape"], {**axes, **fixed})
            table[t["name"]] = {"min": lo, "opt": opt, "max": hi}
        return {"name": name, "inputs": table}

    used = {d for t in inputs for d in t["shape"] if isinstance(d, str)}
    if not {"past_full", "past_kept"} & used:
        return [spec("default", {})]
    prefill = spec("prefill", {"past_full": (0, 0, 0), "past_kept": (0, 0, 0)})
    step = {name: (1, max(axes[name][1], 1), axes[name][2]) for name in ("past_full", "past_kept") if name in axes}
    decode = spec("decode", {"seq": (1, 1, 1), "kept": (1, 1, 1), **step})
    return [prefill, decode]


def to_polygraphy(specs: list[dict]) -> list:
    """polygraphy Profile objects: one shape range per input, never shape-tensor values."""
    from polygraphy.backend.trt import Profile

    profiles = []
    for s in specs:
        p = Profile()
        for name, r in s["inputs"].items():
            p.add(name, tuple(r["min"]), tuple(r["opt"]), tuple(r["max"]))
        profiles.append(p)
    return profiles


def check_network(network, stage: str) -> None:
    """Refuse a parsed network in which TensorRT made an input a shape tensor (its values set a
    shape). ITensor.is_shape_tensor is reliable once the network is complete, i.e. after parsing
    (docs/TENSORRT_10.3.md, section 4, [H] NvInfer.h 457)."""
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.is_shape_tensor:
            raise TrtBuildError(f"{stage}: TensorRT parses input {t.name} as a shape tensor, which this project's "
                                "graphs never have; re-export with this version of export.build "
                                "(python -m export.check_trt names it)")


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
    Returns that section. The plans are written under temporary names and renamed once all three
    have built, so a failed stage (a refused network, an interrupt) leaves the directory as it was."""
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
    strongly = cfg.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if cfg.strongly_typed and not strongly:
        log.warning("tensorrt: this TensorRT (%s) has no strongly typed networks; building weakly typed",
                    trt.__version__)
    pools = {trt.MemoryPoolType.WORKSPACE: cfg.workspace_mib << 20} if cfg.workspace_mib else None
    built: dict[str, Path] = {}  # stage -> its plan under a temporary name
    try:
        for stage in STAGES:
            onnx_path = cfg.engine_dir / schema.stages[stage].file
            tmp = cfg.engine_dir / f".{stage}.engine.partial-{os.getpid()}"
            t0 = time.perf_counter()
            log.info("%s: building TensorRT engine from %s (%s)...", stage, onnx_path.name,
                     "strongly typed" if strongly else ("fp16 allowed" if cfg.fp16 else "fp32"))
            build_stage(stage, onnx_path, tmp, specs[stage], cfg, strongly, pools)
            built[stage] = tmp
            log.info("%s: built in %.1f s (%.1f MiB, %d profiles)", stage, time.perf_counter() - t0,
                     tmp.stat().st_size / 2**20, len(specs[stage]))
        for stage, tmp in built.items():
            tmp.replace(cfg.engine_dir / f"{stage}.engine")
    finally:
        for tmp in built.values():
            tmp.unlink(missing_ok=True)  # failed or interrupted: no debris in the engine directory
    section = {
        "version": trt.__version__, "engines": {stage: f"{stage}.engine" for stage in STAGES},
        "strongly_typed": strongly, "fp16": cfg.fp16, "workspace_mib": cfg.workspace_mib, "profiles": specs,
    }
    _update_manifest(schema, section)
    return section


def build_stage(stage: str, onnx_path: Path, out: Path, specs: list[dict], cfg: TrtConfig, strongly: bool,
                pools: dict | None) -> None:
    """Parse one ONNX graph, refuse shape-tensor inputs (check_network), build it with `specs`'
    profiles and write the plan to `out` (removed again if writing fails)."""
    from polygraphy.backend.trt import CreateConfig, engine_from_network, network_from_onnx_path, save_engine

    # the lower-case polygraphy loaders are immediately evaluated: this returns the parsed network
    builder, network, parser = network_from_onnx_path(str(onnx_path), strongly_typed=strongly or None)
    check_network(network, stage)
    config = CreateConfig(
        fp16=cfg.fp16 or None, profiles=to_polygraphy(specs), memory_pool_limits=pools,
        load_timing_cache=str(cfg.timing_cache) if cfg.timing_cache and cfg.timing_cache.is_file() else None,
    )
    engine = engine_from_network((builder, network, parser), config=config,
                                 save_timing_cache=str(cfg.timing_cache) if cfg.timing_cache else None)
    try:
        save_engine(engine, str(out))
    except BaseException:
        out.unlink(missing_ok=True)
        raise


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
    b.add_argument("--max-seq", type=int, default=d["max_seq"],
                   help="longest prompt, before and after pruning (default: the export's)")
    b.add_argument("--max-context", type=int, default=d["max_context"],
                   help="prompt + generated tokens (default: the export's)")
    b.add_argument("--timing-cache", type=Path, default=d["timing_cache"],
                   help="load and save the builder timing cache here")
    p.add_argument("--dry-run", action="store_true", default=d["dry_run"],
                   help="print the optimization profiles and exit")
    p.add_argument("-v", "--verbose", action="store_true", default=d["verbose"],
                   help="debug logging and tracebacks")
    a = p.parse_args(argv)
    for flag in ("workspace_mib", "max_batch", "max_seq", "max_context"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if not (a.engine_dir / "manifest.json").is_file():
        p.error(f"--engine-dir {a.engine_dir} has no manifest.json (export it first: python -m export.build)")
    return TrtConfig(a.engine_dir, a.strongly_typed, a.fp16, a.workspace_mib, a.max_batch, a.max_seq,
                     a.max_context, a.timing_cache, a.dry_run, a.verbose)


def format_profiles(specs: dict[str, list[dict]]) -> str:
    lines = []
    for stage, profiles in specs.items():
        for i, prof in enumerate(profiles):
            lines.append(f"{stage} profile {i} ({prof['name']}):")
            for name, r in prof["inputs"].items():
                rng = f"min {r['min']}  opt {r['opt']}  max {r['max']}" if r["min"] else "shape () (0-d)"
                lines.append(f"  {name:16s} {rng}")
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

"""Engine vs eager latency, side by side in one process: the measurements behind scripts/bench.py.

Runtimes (rows), each run on the same prompt ids and pixel values, generating exactly N tokens:
    eager-hf     Hugging Face `generate` without pruning (keep ratio 1.0 only)
    eager-dart   eager PyTorch with DART (dart_ops.eager.EagerDart), every keep ratio
    ort          the exported engine through the torch-free runtime on ONNX Runtime, every ratio
    trt          the same runtime on the TensorRT engines of `python -m export.trt` (opt-in:
                 --runtimes ...,trt; needs TensorRT and a GPU)

Figures per row (median over `repeats` runs after `warmup` runs, with min and max):
    vision_ms    vision tower + projector
    prefill_ms   time to first token from tokenised ids and preprocessed pixels (vision + embed
                 + decoder prefill + choosing the token)
    decode_tok_s new tokens after the first per second
    e2e_ms       whole call for N new tokens
    kv_bytes     KV cache after prefill; peak_rss_bytes / rss_delta_bytes: process peak RSS during
                 the row and its rise over the RSS at the row's start; peak_gpu_bytes on CUDA.
Speed-ups: prefill_ms at 1.0 / prefill_ms at r within a runtime, next to the FLOP-model limit
(dart_ops.flops.speedup_limit) and their quotient.

kv_binding_ab (BenchConfig.kv_binding_ab, or called alone): decode tokens/s of the engine with the
KV cache kept with the decoder between decode steps and with the numpy round trip, interleaved on
one loaded engine.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dart_ops import flops
from dart_ops.spec import DartConfig
from export.bench_probes import BenchError, PeakRSS, environment, gpu_peak, matmul_rate
from export import families
from export.bench_runners import EagerRunner, OrtRunner, Run

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("eager-hf", "eager-dart", "ort", "trt")
DEFAULT_RUNTIMES = ("eager-hf", "eager-dart", "ort")  # + "trt" on a machine with TensorRT engines
# A LLaVA-bench-like question: with the template, about 60 text tokens around the 576 vision tokens.
DEFAULT_PROMPT = ("Describe the image in detail, including the objects, their colours, and where "
                  "they are placed relative to each other.")
DEFAULT_IMAGE = ROOT / "examples" / "sample.png"
TIMING_FIGURES = ("vision_ms", "prefill_ms", "decode_tok_s", "e2e_ms")


@dataclass(frozen=True)
class BenchConfig:
    model: str = "llava-bench"
    engine_dir: Path | None = None  # default engines/<model>; exported there when missing
    ratios: tuple[float, ...] = (1.0, 0.333, 0.222, 0.111)
    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES
    new_tokens: int = 32
    repeats: int = 10
    warmup: int = 1
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)  # torch and ORT, the same
    device: str = "cpu"  # eager rows; the ort rows use ort_provider
    dtype: str = "fp32"  # eager rows
    ort_provider: str = "cpu"
    ort_spin: bool = False  # ORT's idle threads spin (runtime.load(spin=True))
    prompt: str = DEFAULT_PROMPT
    image: Path = DEFAULT_IMAGE
    profile: bool = True  # DartPrune's share of ORT prefill (ORT profiler), per pruned ratio
    kv_binding: bool = True  # engine rows: KV stays with the decoder between decode steps (runtime.load)
    kv_binding_ab: bool = False  # also time decode with and without kv_binding, interleaved (kv_binding_ab)
    dart: DartConfig = field(default_factory=lambda: DartConfig(keep_ratio=0.111))


@dataclass
class Row:
    runtime: str
    keep_ratio: float
    device: str
    prompt_tokens: int
    vision_tokens: int
    kept_tokens: int
    kept_vision_tokens: int
    new_tokens: int
    runs: int
    vision_ms: float
    prefill_ms: float
    decode_tok_s: float
    e2e_ms: float
    kv_bytes: int
    peak_rss_bytes: int
    rss_delta_bytes: int
    peak_gpu_bytes: int | None
    spread: dict[str, list[float]]  # figure -> [min, max]
    flop_limit_speedup: float = 1.0
    prefill_speedup: float = 1.0  # vs the same runtime at keep ratio 1.0
    speedup_vs_limit: float = 1.0
    prefill_gflop_s: float = 0.0  # FLOP model's prefill FLOPs at this row's S' / prefill_ms
    # ort rows, pruned, with profiling: DartPrune's fraction of the decoder prefill's node time
    # (ONNX Runtime profiler), that fraction of the measured decoder prefill ms, and its share of
    # prefill_ms (time to first token).
    dart_prune_decoder_share: float | None = None
    dart_prune_ms: float | None = None
    dart_prune_share: float | None = None


def _summarise(runs: list[Run]) -> tuple[dict, dict]:
    med, spread = {}, {}
    for name in TIMING_FIGURES:
        values = [getattr(r, name) for r in runs]
        med[name] = statistics.median(values)
        spread[name] = [min(values), max(values)]
    return med, spread


def plan(cfg: BenchConfig) -> list[tuple[str, float]]:
    """(runtime, keep_ratio) rows in run order."""
    rows = []
    for rt in cfg.runtimes:
        for r in ([1.0] if rt == "eager-hf" else cfg.ratios):
            rows.append((rt, r))
    return rows


def add_speedups(rows: list[Row]) -> None:
    """prefill_speedup within each runtime (vs its own keep-ratio-1.0 row) and / FLOP limit."""
    base = {r.runtime: r.prefill_ms for r in rows if r.keep_ratio == 1.0}
    for r in rows:
        if r.runtime in base:
            r.prefill_speedup = base[r.runtime] / r.prefill_ms
            r.speedup_vs_limit = r.prefill_speedup / r.flop_limit_speedup


def targets(rows: list[Row]) -> list[dict]:
    """The issue's targets, evaluated on these rows (at the smallest ratio measured)."""
    ort = {r.keep_ratio: r for r in rows if r.runtime == "ort"}
    eager = {r.keep_ratio: r for r in rows if r.runtime == "eager-dart"}
    pruned = sorted(r for r in ort if r < 1.0)
    out = []
    if 1.0 in ort and pruned:
        low = ort[pruned[0]]
        out.append({"target": f"ort prefill speed-up at {low.keep_ratio:g} >= 90% of the FLOP limit",
                    "value": low.speedup_vs_limit, "threshold": 0.9, "met": low.speedup_vs_limit >= 0.9})
    common = sorted(set(ort) & set(eager))
    if common:
        r = min(common)
        ratio = eager[r].prefill_ms / ort[r].prefill_ms
        out.append({"target": f"ort prefill >= 2x faster than eager-dart at {r:g}", "value": ratio,
                    "threshold": 2.0, "met": ratio >= 2.0})
    if pruned and ort[pruned[0]].dart_prune_share is not None:
        share = ort[pruned[0]].dart_prune_share
        out.append({"target": f"DartPrune < 2% of ort prefill (time to first token) at {pruned[0]:g}",
                    "value": share, "threshold": 0.02, "met": share < 0.02})
    return out


def to_json(rows: list[Row], meta: dict) -> dict:
    return {"schema": "dart-vlm-bench/1", "meta": meta, "rows": [asdict(r) for r in rows],
            "targets": targets(rows)}


@dataclass
class Source:
    """What the rows share: the model's config, tokenizer, template, token ids and preprocessing."""

    model: str
    config: dict  # the HF LlavaConfig as a dict (for the FLOP model)
    tokenizer_json: str
    prompt: dict
    tokens: dict
    preprocess: dict
    dart: DartConfig


def prompt_ids(src: Source, prompt: str) -> list[int]:
    """The templated prompt's ids with the image token expanded, by the runtime's own PromptBuilder."""
    from tokenizers import Tokenizer

    from runtime.manifest import parse_prompt, parse_tokens
    from runtime.prompt import PromptBuilder

    builder = PromptBuilder(Tokenizer.from_str(src.tokenizer_json), parse_prompt(src.prompt), parse_tokens(src.tokens))
    return builder.encode(prompt, with_image=True)


def ensure_engine(cfg: BenchConfig) -> Path:
    """cfg.engine_dir (or engines/<model>) holding an exported engine of cfg.model; exported now
    (fp32, opset 18, validated) when the directory has none."""
    from export.build import build, parse_args

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
    d = cfg.dart
    build(parse_args(["--model", cfg.model, "--out", str(out), "--ratio", str(d.keep_ratio or 0.111),
                      "--layer", str(d.layer), "--pivots-image", str(d.pivots_image),
                      "--pivots-text", str(d.pivots_text)]))
    return out


def load_eager(model: str, engine_dir: Path | None, device: str, dtype: str):
    """The torch model: the engine's saved checkpoint when there is one (the exact weights that
    were exported), else the family's loader (presets build on `device` directly)."""
    import torch

    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    ckpt = engine_dir / "checkpoint" if engine_dir else None
    if ckpt is not None and (ckpt / "config.json").is_file():
        from transformers import LlavaForConditionalGeneration

        hf = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch_dtype)
        return hf.to(device).eval(), None
    loaded = families.resolve(model).load(model, torch_dtype, device=device)
    return loaded.model.eval(), loaded


def _source(cfg: BenchConfig, model: str, engine_dir: Path | None, eager_model, loaded) -> Source:
    if engine_dir is not None:
        m = json.loads((engine_dir / "manifest.json").read_text())
        d = m["dart"]
        dart = DartConfig(d["layer"], d["pivots_image"], d["pivots_text"], keep_ratio=d["keep_ratio"])
        config = _config_dict(model, engine_dir, eager_model)
        return Source(model, config, (engine_dir / "tokenizer.json").read_text(), m["prompt"], m["tokens"],
                      m["preprocess"], dart)
    return Source(model, eager_model.config.to_dict(), loaded.tokenizer_json, loaded.prompt, loaded.tokens,
                  loaded.preprocess, cfg.dart)


def _config_dict(model: str, engine_dir: Path, eager_model) -> dict:
    if eager_model is not None:
        return eager_model.config.to_dict()
    for path in (engine_dir / "checkpoint" / "config.json", Path(model) / "config.json"):
        if path.is_file():
            return json.loads(path.read_text())
    from export.families.llava import RANDOM_PRESETS, random_config

    if model in RANDOM_PRESETS:
        return random_config(model).to_dict()
    from transformers import AutoConfig

    try:
        from export.families.llava import HUB_ID

        return AutoConfig.from_pretrained(HUB_ID if model == "llava" else model, local_files_only=True).to_dict()
    except OSError as e:
        raise BenchError(f"cannot find {model}'s config.json for the FLOP model ({str(e).splitlines()[0]})") from None


def run(cfg: BenchConfig, progress=None) -> tuple[list[Row], dict]:
    """Export the engine if needed, load the eager model, run every row. Returns (rows, meta).
    `progress(n)` is called after each run (for a progress bar over total_runs(cfg))."""
    import gc

    bad = [r for r in cfg.runtimes if r not in RUNTIMES]
    if bad:
        raise BenchError(f"unknown runtime(s) {bad}; choose from {', '.join(RUNTIMES)}")
    eager_rows = [rt for rt in cfg.runtimes if rt.startswith("eager")]
    engine_dir = ensure_engine(cfg) if {"ort", "trt"} & set(cfg.runtimes) else cfg.engine_dir
    if "trt" in cfg.runtimes:  # fail before any row runs, not after the others
        from runtime.manifest import read_manifest
        from runtime.pipeline import check_trt_engines

        check_trt_engines(read_manifest(engine_dir, verify=False))
    eager_model = loaded = None
    if eager_rows:
        import torch

        torch.set_num_threads(cfg.threads)
        eager_model, loaded = load_eager(cfg.model, engine_dir, cfg.device, cfg.dtype)
    src = _source(cfg, cfg.model, engine_dir, eager_model, loaded)
    family = families.resolve(cfg.model)
    shape = family.flop_shape(src.config)
    ids = prompt_ids(src, cfg.prompt)
    from runtime.preprocess import preprocess
    from runtime.prompt import find_span

    pixels = preprocess(cfg.image, src.preprocess)  # (1, 3, H, W) float32
    S = len(ids)
    a, L = find_span(ids, src.tokens["image_token_id"])
    if {"ort", "trt"} & set(cfg.runtimes):  # the runtime would cap the run short of --new-tokens
        from runtime.manifest import read_manifest

        limit = read_manifest(engine_dir, verify=False).max_context
        if S + cfg.new_tokens > limit:
            raise BenchError(f"--new-tokens {cfg.new_tokens} after the {S}-token prompt exceeds the engine's "
                             f"max_context {limit}; lower --new-tokens or re-export with a larger --max-context")
    log.info("bench: %s, S=%d tokens (%d vision at %d), %d new tokens, %d threads, %d+%d runs per row",
             cfg.model, S, L, a, cfg.new_tokens, cfg.threads, cfg.warmup, cfg.repeats)

    rows: list[Row] = []
    rss_per_row = True
    eager = None
    engine_runners: dict[str, OrtRunner] = {}
    order = plan(cfg)
    for i, (rt, ratio) in enumerate(order):
        dart = src.dart.with_ratio(ratio)
        counts = dart.counts(L, S - a - L)
        if rt.startswith("eager"):
            if eager is None:
                eager = _eager_inputs(EagerRunner(eager_model, src.dart, cfg.device, family), ids, pixels, cfg)
            runner, inputs = eager
            call = lambda rt=rt, ratio=ratio: runner.run(rt, *inputs, ratio, cfg.new_tokens)  # noqa: E731
        else:
            if rt not in engine_runners:
                if eager is not None and not any(r.startswith("eager") for r, _ in order[i:]):
                    eager = eager_model = None  # the torch model is not needed any more
                    gc.collect()
                provider = "tensorrt" if rt == "trt" else cfg.ort_provider
                engine_runners[rt] = OrtRunner(engine_dir, provider, cfg.threads, cfg.ort_spin, cfg.kv_binding)
            ort_runner = engine_runners[rt]
            call = lambda runner=ort_runner, ratio=ratio: runner.run(ids, pixels, ratio, cfg.new_tokens)  # noqa: E731
        runs = []
        gpu = gpu_peak(cfg.device) if rt.startswith("eager") else None
        with PeakRSS() as mem:
            if gpu:
                gpu.reset()
            for k in range(cfg.warmup + cfg.repeats):
                result = call()
                if k >= cfg.warmup:
                    runs.append(result)
                if progress:
                    progress(1)
        rss_per_row = rss_per_row and mem.resettable
        med, spread = _summarise(runs)
        last = runs[-1]
        row = Row(
            runtime=rt, keep_ratio=ratio,
            device=cfg.device if rt.startswith("eager") else "tensorrt" if rt == "trt" else cfg.ort_provider,
            prompt_tokens=S, vision_tokens=L, kept_tokens=last.kept_tokens,
            kept_vision_tokens=counts.kept_vision if rt != "eager-hf" else L, new_tokens=last.new_tokens,
            runs=len(runs), **med, kv_bytes=last.kv_bytes, peak_rss_bytes=mem.peak,
            rss_delta_bytes=max(0, mem.peak - mem.start), peak_gpu_bytes=gpu.peak() if gpu else None,
            spread=spread, flop_limit_speedup=flops.speedup_limit(shape, S, a, L, dart),
        )
        kept = counts.kept_len(S) if rt != "eager-hf" else S
        pivots = counts.pivots_image + counts.pivots_text
        row.prefill_gflop_s = flops.prefill_flops(shape, S, kept, dart.layer, L, pivots)["total"] / row.prefill_ms / 1e6
        if rt == "ort" and cfg.profile and counts.prune:
            # The profiler gives DartPrune's fraction of the decoder's node time (profiling slows
            # small nodes most, so this overstates it); scaled by the unprofiled decoder time.
            _, feeds = ort_runner.run(ids, pixels, ratio, 1, record=True)
            _, row.dart_prune_decoder_share = ort_runner.profile_dart(feeds, cfg.repeats)
            decoder_ms = statistics.median(r.decoder_ms for r in runs)
            row.dart_prune_ms = row.dart_prune_decoder_share * decoder_ms
            row.dart_prune_share = row.dart_prune_ms / row.prefill_ms
        rows.append(row)
        log.debug("bench: %s @ %g: prefill %.1f ms", rt, ratio, row.prefill_ms)
    add_speedups(rows)
    meta = environment(cfg.threads, cfg.device)
    if cfg.device == "cpu" or "ort" in cfg.runtimes and cfg.ort_provider == "cpu":
        t = shape.text
        # The machine's matmul rate at the model's MLP shape, with all S rows and with the fewest
        # kept rows: the ceiling for any runtime, and how much smaller GEMMs lose.
        kept_min = min(r.kept_tokens for r in rows)
        meta["matmul"] = [
            {"shape": [m, t.hidden, t.intermediate],
             "gflop_s": matmul_rate(m, t.hidden, t.intermediate, cfg.threads,
                                    use_torch=bool(eager_rows) and cfg.device == "cpu")}
            for m in sorted({S, kept_min}, reverse=True)
        ]
    meta.update(model=cfg.model, engine_dir=str(engine_dir) if engine_dir else None, dtype=cfg.dtype,
                prompt_tokens=S, vision_tokens=L, span_start=a, new_tokens=cfg.new_tokens,
                repeats=cfg.repeats, warmup=cfg.warmup, dart=asdict(src.dart), shape=asdict(shape),
                flops_full=flops.prefill_flops(shape, S, None, src.dart.layer)["total"],
                peak_rss_scope="row" if rss_per_row else "process", ort_spin=cfg.ort_spin,
                kv_binding=cfg.kv_binding)
    if cfg.kv_binding_ab and engine_runners:
        runner = engine_runners.get("trt") or engine_runners["ort"]
        meta["kv_binding_ab"] = kv_binding_ab(cfg, runner=runner, progress=progress)
    return rows, meta


def total_runs(cfg: BenchConfig) -> int:
    ab = 2 * len(cfg.ratios) * (cfg.warmup + cfg.repeats) if cfg.kv_binding_ab else 0
    return len(plan(cfg)) * (cfg.warmup + cfg.repeats) + ab


def kv_binding_ab(cfg: BenchConfig, runner: OrtRunner | None = None, progress=None) -> dict:
    """Decode tokens/s with the KV cache kept with the decoder between decode steps (ONNX Runtime
    IOBinding, TensorRT device buffers: Pipeline.kv_binding) and with the numpy round trip, on ONE
    loaded engine (the same sessions) in one process. Per keep ratio in cfg.ratios, cfg.warmup +
    cfg.repeats pairs of generate calls of cfg.new_tokens tokens (eos ignored), the two variants
    alternating and their order swapped every pair, so other load on the machine and drift hit
    both alike. `runner`: the engine rows' runner (default: a new one on cfg.ort_provider, the
    engine exported first when missing). Raises BenchError when the variants' tokens differ.

    Returns {"runtime", "provider", "new_tokens", "pairs", "rows": [per ratio: keep_ratio,
    prompt_tokens, kept_tokens, kv_bytes, decode_tok_s {"bound", "numpy"} medians with
    spread [min, max], speedup (median / median), pair_speedup (median of the per-pair ratios) with
    pair_spread]}."""
    from runtime.preprocess import preprocess

    if runner is None:
        runner = OrtRunner(ensure_engine(cfg), cfg.ort_provider, cfg.threads, cfg.ort_spin)
    pipe = runner.pipe
    ids = pipe.prompt.encode(cfg.prompt, with_image=True)
    pixels = preprocess(cfg.image, pipe.manifest.preprocess)
    rows = []
    try:
        for ratio in cfg.ratios:
            rows.append(_ab_ratio(cfg, pipe, ids, pixels, ratio, progress))
    finally:
        pipe.kv_binding = cfg.kv_binding
    result = {"runtime": "trt" if runner.provider == "tensorrt" else "ort", "provider": runner.provider,
              "new_tokens": cfg.new_tokens, "pairs": cfg.repeats, "warmup_pairs": cfg.warmup, "rows": rows}
    for r in rows:
        d = r["decode_tok_s"]
        log.info("bench: decode at keep %g: %.1f tok/s with the KV bound, %.1f through numpy (x%.3f, per pair "
                 "x%.3f)", r["keep_ratio"], d["bound"], d["numpy"], r["speedup"], r["pair_speedup"])
    return result


def _ab_ratio(cfg: BenchConfig, pipe, ids: list[int], pixels: np.ndarray, ratio: float, progress) -> dict:
    rates: dict[bool, list[float]] = {True: [], False: []}
    pairs, first = [], None
    for k in range(cfg.warmup + cfg.repeats):
        got = {}
        for bound in ((True, False) if k % 2 == 0 else (False, True)):
            pipe.kv_binding = bound
            out = pipe.generate(input_ids=ids, pixel_values=pixels, keep_ratio=ratio,
                                max_new_tokens=cfg.new_tokens, ignore_eos=True)
            first = first or out
            if out.token_ids != first.token_ids or out.kept_positions != first.kept_positions:
                raise BenchError(f"keep {ratio:g}: kv_binding={bound} generated other tokens or kept other "
                                 "positions than the first run; the two KV paths must agree exactly")
            got[bound] = out.timings["tokens_per_s"]
            if progress:
                progress(1)
        if k >= cfg.warmup:
            for bound, rate in got.items():
                rates[bound].append(rate)
            pairs.append(got[True] / got[False])
    med = {"bound": statistics.median(rates[True]), "numpy": statistics.median(rates[False])}
    t = first.timings
    return {"keep_ratio": ratio, "prompt_tokens": int(t["prompt_tokens"]), "kept_tokens": int(t["kept_tokens"]),
            "kv_bytes": int(t["kv_bytes"]), "decode_tok_s": med,
            "spread": {name: [min(rates[b]), max(rates[b])] for name, b in (("bound", True), ("numpy", False))},
            "speedup": med["bound"] / med["numpy"], "pair_speedup": statistics.median(pairs),
            "pair_spread": [min(pairs), max(pairs)]}


def _eager_inputs(runner: EagerRunner, ids: list[int], pixels: np.ndarray, cfg: BenchConfig):
    torch = runner.torch
    dtype = torch.float16 if cfg.dtype == "fp16" else torch.float32
    t_ids = torch.tensor([ids], dtype=torch.long, device=runner.device)
    t_pix = torch.from_numpy(pixels).to(device=runner.device, dtype=dtype)
    return runner, (t_ids, t_pix)


__all__ = ["BenchConfig", "BenchError", "Row", "kv_binding_ab", "run", "targets", "to_json", "total_runs"]

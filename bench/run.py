"""Engine vs eager latency, side by side in one process: the measurements behind scripts/bench.py.

Rows: one per (runtime, keep ratio), each run on the same prompt ids and the same image (its pixel
values preprocessed once; the engine's own preprocessing checked equal to them), generating exactly
N tokens; the runtimes are bench.runners.RUNNERS (eager-hf, eager-dart, ort, ort-int8, ort-int4, trt). What differs per
model family (the inputs, Qwen's grid and M-RoPE positions, the FLOP shape bound to the image) is
bench.families.FAMILIES[manifest family].

Figures per row (median over `repeats` runs after `warmup` runs, with min and max):
    vision_ms    vision tower + projector
    prefill_ms   time to first token from tokenised ids and preprocessed pixels (eager: to the
                 first token chosen; engine: vision + embed + decoder prefill)
    decode_tok_s new tokens after the first per second
    e2e_ms       whole call for N new tokens
    kv_bytes     KV cache after prefill; peak_rss_bytes / rss_delta_bytes: process peak RSS during
                 the row and its rise over the RSS at the row's start; peak_gpu_bytes on CUDA.
    engine_bytes engine rows: bytes on disk per stage (graph + external data)
    logits_cosine, greedy_agreement
                 ort-int8 / ort-int4 rows vs the ort (fp32) row at the same keep ratio: cosine of the
                 first-step logits, fraction of equal greedy tokens (both runs' last timed run)
Speed-ups: prefill_ms at 1.0 / prefill_ms at r within a runtime, next to the FLOP-model limit
(dart_ops.flops.speedup_limit, on the family's flop_shape) and their quotient.

kv_binding_ab (BenchConfig.kv_binding_ab, or called alone): decode tokens/s of the engine with the
KV cache kept with the decoder between decode steps and with the numpy round trip, interleaved on
one loaded engine.
"""

from __future__ import annotations

import gc
import logging
import statistics
from dataclasses import asdict

import numpy as np

from bench.config import TIMING_FIGURES, BenchConfig, Row
from bench.families import Inputs, for_family, load_image
from bench.probes import BenchError, PeakRSS, environment, gpu_peak, matmul_rate
from bench.runners import RUNNERS, Context, EngineRunner, Run, Runner
from bench.source import (
    Source,
    engine_bytes,
    ensure_engine,
    ensure_quantized,
    load_eager,
    make_inputs,
    make_source,
)
from dart_ops import flops
from export import families

log = logging.getLogger(__name__)


def _summarise(runs: list[Run]) -> tuple[dict, dict]:
    med, spread = {}, {}
    for name in TIMING_FIGURES:
        values = [getattr(r, name) for r in runs]
        med[name] = statistics.median(values)
        spread[name] = [min(values), max(values)]
    return med, spread


def plan(cfg: BenchConfig) -> list[tuple[str, float]]:
    """(runtime, keep_ratio) rows in run order."""
    return [(rt, r) for rt in cfg.runtimes for r in (cfg.ratios if RUNNERS[rt].prunes else [1.0])]


def total_runs(cfg: BenchConfig) -> int:
    ab = 2 * len(cfg.ratios) * (cfg.warmup + cfg.repeats) if cfg.kv_binding_ab else 0
    return len(plan(cfg)) * (cfg.warmup + cfg.repeats) + ab


def add_speedups(rows: list[Row]) -> None:
    """prefill_speedup within each runtime (vs its own keep-ratio-1.0 row) and / FLOP limit."""
    base = {r.runtime: r.prefill_ms for r in rows if r.keep_ratio == 1.0}
    for r in rows:
        if r.runtime in base:
            r.prefill_speedup = base[r.runtime] / r.prefill_ms
            r.speedup_vs_limit = r.prefill_speedup / r.flop_limit_speedup


def cosine(a, b) -> float:
    """Cosine similarity of two vectors, in float64."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of positions where two greedy token sequences hold the same token."""
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


def compare_quantized(rows: list[Row], logits: dict[tuple[str, float], np.ndarray]) -> None:
    """Quantized rows: logits_cosine and greedy_agreement vs the ort row at the same keep ratio
    (`logits`: (runtime, ratio) -> the first-step logits of the row's last timed run)."""
    ref = {r.keep_ratio: r for r in rows if r.runtime == "ort"}
    for r in rows:
        base = ref.get(r.keep_ratio)
        if r.quant_bits is None or base is None:
            continue
        r.logits_cosine = cosine(logits[(r.runtime, r.keep_ratio)], logits[("ort", r.keep_ratio)])
        r.greedy_agreement = agreement(r.token_ids, base.token_ids)


def _check(cfg: BenchConfig) -> None:
    bad = [r for r in cfg.runtimes if r not in RUNNERS]
    if bad:
        raise BenchError(f"unknown runtime(s) {bad}; choose from {', '.join(RUNNERS)}")


def _check_context(engine_dir, S: int, new_tokens: int) -> None:
    """The runtime would cap the run short of --new-tokens: refuse instead of timing short runs."""
    from runtime.manifest import read_manifest

    limit = read_manifest(engine_dir, verify=False).max_context
    if S + new_tokens > limit:
        raise BenchError(f"--new-tokens {new_tokens} after the {S}-token prompt exceeds the engine's "
                         f"max_context {limit}; lower --new-tokens or re-export with a larger --max-context")


def _runner(rt: str, ctx: Context, runners: dict[str, Runner], rest: list[tuple[str, float]]) -> Runner:
    """The runner of `rt`, built on first use; the torch model is dropped before the first engine
    row that no eager row follows (`rest`: the rows from this one on)."""
    if rt not in runners:
        if RUNNERS[rt].engine and ctx.model is not None and all(RUNNERS[r].engine for r, _ in rest):
            ctx.model = None
            for name in [n for n in runners if not RUNNERS[n].engine]:
                del runners[name]
            gc.collect()
        runners[rt] = RUNNERS[rt].make(ctx)
    return runners[rt]


def _row(cfg: BenchConfig, rt: str, ratio: float, runner: Runner, inputs: Inputs, src: Source, shape,
         progress) -> tuple[Row, bool, Run]:
    """Warm-up + timed runs of one (runtime, ratio), summarised, with the FLOP model's figures
    (`shape`: bound to the image); whether its peak RSS is the row's own (PeakRSS.resettable); the
    last timed run."""
    kind, S, (a, L) = RUNNERS[rt], len(inputs.ids), inputs.span
    dart = src.dart.with_ratio(ratio)
    counts = dart.counts(L, S - a - L)
    runs = []
    gpu = None if kind.engine else gpu_peak(cfg.device)
    with PeakRSS() as mem:
        if gpu:
            gpu.reset()
        for k in range(cfg.warmup + cfg.repeats):
            result = runner.run(inputs, ratio, cfg.new_tokens)
            if k >= cfg.warmup:
                runs.append(result)
            if progress:
                progress(1)
    med, spread = _summarise(runs)
    last = runs[-1]
    row = Row(
        runtime=rt, keep_ratio=ratio, device=runner.device, prompt_tokens=S, vision_tokens=L,
        kept_tokens=last.kept_tokens, kept_vision_tokens=counts.kept_vision if kind.prunes else L,
        new_tokens=last.new_tokens, runs=len(runs), **med, kv_bytes=last.kv_bytes, peak_rss_bytes=mem.peak,
        rss_delta_bytes=max(0, mem.peak - mem.start), peak_gpu_bytes=gpu.peak() if gpu else None,
        spread=spread, flop_limit_speedup=flops.speedup_limit(shape, S, a, L, dart), token_ids=last.token_ids,
        engine_bytes=engine_bytes(runner.engine_dir) if kind.engine else None, quant_bits=kind.bits,
    )
    kept = counts.kept_len(S) if kind.prunes else S
    pivots = counts.pivots_image + counts.pivots_text
    row.prefill_gflop_s = flops.prefill_flops(shape, S, kept, dart.layer, L, pivots)["total"] / row.prefill_ms / 1e6
    if kind.profiles and cfg.profile and counts.prune:
        # The profiler gives DartPrune's fraction of the decoder's node time (profiling slows
        # small nodes most, so this overstates it); scaled by the unprofiled decoder time.
        _, feeds = runner.run(inputs, ratio, 1, record=True)
        _, row.dart_prune_decoder_share = runner.profile_dart(feeds, cfg.repeats)
        decoder_ms = statistics.median(r.decoder_ms for r in runs)
        row.dart_prune_ms = row.dart_prune_decoder_share * decoder_ms
        row.dart_prune_share = row.dart_prune_ms / row.prefill_ms
    return row, mem.resettable, last


def run(cfg: BenchConfig, progress=None) -> tuple[list[Row], dict]:
    """Export the engine if needed, load the eager model, run every row. Returns (rows, meta).
    `progress(n)` is called after each run (for a progress bar over total_runs(cfg))."""
    _check(cfg)
    kinds = [RUNNERS[rt] for rt in cfg.runtimes]
    uses_engine = any(k.engine for k in kinds)
    eager_rows = any(not k.engine for k in kinds)
    engine_dir = ensure_engine(cfg) if uses_engine else cfg.engine_dir
    quantized = {k.bits: ensure_quantized(engine_dir, k.bits) for k in kinds if k.bits}
    for kind in kinds:  # fail before any row runs, not after the others
        if kind.check:
            kind.check(engine_dir)
    eager_model = loaded = None
    if eager_rows:
        import torch

        torch.set_num_threads(cfg.threads)
        eager_model, loaded = load_eager(cfg.model, engine_dir, cfg.device, cfg.dtype)
    src = make_source(cfg, engine_dir, eager_model, loaded)
    family = families.resolve(cfg.model)
    inputs = make_inputs(src, cfg)  # the same ids and image for every row (untimed)
    shape = for_family(src.family).flop_shape(family.flop_shape(src.config), inputs)  # bound to the image
    S, (a, L) = len(inputs.ids), inputs.span
    if uses_engine:
        _check_context(engine_dir, S, cfg.new_tokens)
    crops = int(inputs.pixels.shape[0]) if getattr(inputs, "layout", None) is not None else None
    layout_note = (f", grid {inputs.grid[0]}x{inputs.grid[1]} patches" if inputs.grid else
                   f", {crops} crops" if crops else "")
    log.info("bench: %s, S=%d tokens (%d vision at %d; image %dx%d%s), %d new tokens, %d threads, %d+%d runs per "
             "row", cfg.model, S, L, a, *inputs.image.size, layout_note, cfg.new_tokens, cfg.threads, cfg.warmup,
             cfg.repeats)

    ctx = Context(cfg, family, src.dart, eager_model, engine_dir, for_family(src.family), quantized)
    del eager_model, loaded  # ctx.model holds it until the eager rows are done
    runners: dict[str, Runner] = {}
    rows: list[Row] = []
    logits: dict[tuple[str, float], np.ndarray] = {}
    rss_per_row = True
    order = plan(cfg)
    for i, (rt, ratio) in enumerate(order):
        runner = _runner(rt, ctx, runners, order[i:])
        row, resettable, last = _row(cfg, rt, ratio, runner, inputs, src, shape, progress)
        rows.append(row)
        if last.first_logits is not None:
            logits[(rt, ratio)] = last.first_logits
        rss_per_row = rss_per_row and resettable
        log.debug("bench: %s @ %g: prefill %.1f ms", rt, ratio, row.prefill_ms)
    add_speedups(rows)
    compare_quantized(rows, logits)
    meta = environment(cfg.threads, cfg.device)
    if cfg.device == "cpu" or "ort" in cfg.runtimes and cfg.ort_provider == "cpu":
        t = shape.text
        # The machine's matmul rate at the model's MLP shape, with all S rows and with the fewest
        # kept rows: the ceiling for any runtime, and how much smaller GEMMs lose.
        kept_min = min(r.kept_tokens for r in rows)
        meta["matmul"] = [
            {"shape": [m, t.hidden, t.intermediate],
             "gflop_s": matmul_rate(m, t.hidden, t.intermediate, cfg.threads,
                                    use_torch=eager_rows and cfg.device == "cpu")}
            for m in sorted({S, kept_min}, reverse=True)
        ]
    meta.update(model=cfg.model, engine_dir=str(engine_dir) if engine_dir else None, dtype=cfg.dtype,
                prompt_tokens=S, vision_tokens=L, span_start=a, image_size=list(inputs.image.size),
                grid=list(inputs.grid) if inputs.grid else None, crops=crops, new_tokens=cfg.new_tokens,
                repeats=cfg.repeats, warmup=cfg.warmup, dart=asdict(src.dart), shape=asdict(shape),
                flops_full=flops.prefill_flops(shape, S, None, src.dart.layer)["total"],
                peak_rss_scope="row" if rss_per_row else "process", ort_spin=cfg.ort_spin,
                kv_binding=cfg.kv_binding, quantized={f"int{b}": str(p) for b, p in quantized.items()})
    engine_runners = [runners[rt] for rt in ("trt", "ort") if rt in runners]
    if cfg.kv_binding_ab and engine_runners:
        meta["kv_binding_ab"] = kv_binding_ab(cfg, runner=engine_runners[0], progress=progress)
    return rows, meta


def kv_binding_ab(cfg: BenchConfig, runner: EngineRunner | None = None, progress=None) -> dict:
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
    if runner is None:
        runner = EngineRunner(ensure_engine(cfg), cfg.ort_provider, cfg.threads, cfg.ort_spin)
    pipe, fam = runner.pipe, runner.family
    inputs = fam.inputs(pipe.prompt, pipe.manifest.preprocess, load_image(cfg.image, cfg.image_size, fam), cfg.prompt)
    request = fam.engine_request(inputs)  # generate's ids and image (preprocessing inside generate, untimed there)
    rows = []
    try:
        for ratio in cfg.ratios:
            rows.append(_ab_ratio(cfg, pipe, request, ratio, progress))
    finally:
        pipe.kv_binding = cfg.kv_binding
    result = {"runtime": "trt" if runner.provider == "tensorrt" else "ort", "provider": runner.provider,
              "new_tokens": cfg.new_tokens, "pairs": cfg.repeats, "warmup_pairs": cfg.warmup, "rows": rows}
    for r in rows:
        d = r["decode_tok_s"]
        log.info("bench: decode at keep %g: %.1f tok/s with the KV bound, %.1f through numpy (x%.3f, per pair "
                 "x%.3f)", r["keep_ratio"], d["bound"], d["numpy"], r["speedup"], r["pair_speedup"])
    return result


def _ab_ratio(cfg: BenchConfig, pipe, request: dict, ratio: float, progress) -> dict:
    rates: dict[bool, list[float]] = {True: [], False: []}
    pairs, first = [], None
    for k in range(cfg.warmup + cfg.repeats):
        got = {}
        for bound in ((True, False) if k % 2 == 0 else (False, True)):
            pipe.kv_binding = bound
            out = pipe.generate(**request, keep_ratio=ratio, max_new_tokens=cfg.new_tokens, ignore_eos=True)
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


__all__ = ["BenchConfig", "BenchError", "Row", "kv_binding_ab", "run", "total_runs"]

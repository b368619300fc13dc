"""What a benchmark run measures (BenchConfig) and what one row of its result holds (Row).
No heavy imports: scripts/bench.py --help reads the defaults from here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dart_ops.spec import DartConfig

ROOT = Path(__file__).resolve().parents[1]
# the keys of bench.runners.RUNNERS, in row order; ort-int8 / ort-int4: the ort engine's weight-only quantized
# copies (export.quantize into <engine-dir>-int8 / -int4, made when missing)
RUNTIMES = ("eager-hf", "eager-dart", "ort", "ort-int8", "ort-int4", "trt")
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
    # (W, H) the image is resized to first (untimed); None: the family's default (bench.families:
    # qwen2_vl 1092x728 for ~1000 vision tokens, llava as given); bench.families.NATIVE: as given.
    image_size: tuple[int, int] | None = None
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
    token_ids: list[int] = field(default_factory=list)  # the new tokens of the last timed run
    # engine rows: bytes on disk per stage (its graph + external data, from the manifest's files)
    engine_bytes: dict[str, int] | None = None
    quant_bits: int | None = None  # ort-int8 / ort-int4 rows: the decoder's weight bits
    # quantized rows vs the fp32 ort row at the same keep ratio (None without one): cosine of the
    # first-step (prefill) logits, and the fraction of equal greedy tokens, position by position
    logits_cosine: float | None = None
    greedy_agreement: float | None = None

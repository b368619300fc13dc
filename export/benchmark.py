"""Engine vs eager latency, side by side in one process: the measurements behind scripts/bench.py.

Runtimes (rows), each run on the same prompt ids and pixel values, generating exactly N tokens:
    eager-hf     Hugging Face `generate` without pruning (keep ratio 1.0 only)
    eager-dart   eager PyTorch with DART (dart_ops.eager.EagerDart), every keep ratio
    ort          the exported engine through the torch-free runtime on ONNX Runtime, every ratio

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
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dart_ops import flops
from dart_ops.spec import DartConfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("eager-hf", "eager-dart", "ort")
# A LLaVA-bench-like question: with the template, about 60 text tokens around the 576 vision tokens.
DEFAULT_PROMPT = ("Describe the image in detail, including the objects, their colours, and where "
                  "they are placed relative to each other.")
DEFAULT_IMAGE = ROOT / "examples" / "sample.png"
TIMING_FIGURES = ("vision_ms", "prefill_ms", "decode_tok_s", "e2e_ms")


class BenchError(RuntimeError):
    """A benchmark the user asked for cannot run here (reported as one line)."""


@dataclass(frozen=True)
class BenchConfig:
    model: str = "llava-bench"
    engine_dir: Path | None = None  # default engines/<model>; exported there when missing
    ratios: tuple[float, ...] = (1.0, 0.333, 0.222, 0.111)
    runtimes: tuple[str, ...] = RUNTIMES
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    threads: int = 2
    device: str = "cpu"  # eager rows; the ort rows use ort_provider
    dtype: str = "fp32"  # eager rows
    ort_provider: str = "cpu"
    prompt: str = DEFAULT_PROMPT
    image: Path = DEFAULT_IMAGE
    profile: bool = True  # DartPrune's share of ORT prefill (ORT profiler), per pruned ratio
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
    dart_prune_ms: float | None = None  # ort rows with --profile: DartPrune nodes per prefill
    dart_prune_share: float | None = None  # ... as a fraction of the decoder prefill's node time


# --- memory ---------------------------------------------------------------------------------------


def _rss_field(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{name} not in /proc/self/status")


class PeakRSS:
    """Peak resident memory of this process over a block of work. Linux resets the high-water
    mark on writing 5 to /proc/self/clear_refs; without that, the figure is the process peak."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.start = self.current()
        return self

    def __exit__(self, *exc):
        self.peak = max(self.peak_now(), self.start)
        return False

    @staticmethod
    def current() -> int:
        try:
            return _rss_field("VmRSS")
        except OSError:
            return 0

    @staticmethod
    def peak_now() -> int:
        try:
            return _rss_field("VmHWM")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- clocks ---------------------------------------------------------------------------------------


class TokenClock:
    """A Hugging Face-style streamer that timestamps each new token (after syncing CUDA)."""

    def __init__(self, sync):
        self.sync = sync
        self.prompt_seen = False
        self.stamps: list[float] = []

    def put(self, value):
        if not self.prompt_seen:  # the first put is the prompt
            self.prompt_seen = True
            return
        self.sync()
        self.stamps.append(time.perf_counter())

    def end(self):
        pass


class VisionClock:
    """Times the vision tower + projector of a HF LLaVA model through forward hooks."""

    def __init__(self, model, sync):
        self.sync = sync
        self.ms: list[float] = []
        self._t0 = 0.0
        inner = model.model
        self.handles = [
            inner.vision_tower.register_forward_pre_hook(self._start),
            inner.multi_modal_projector.register_forward_hook(self._stop),
        ]

    def _start(self, *_):
        self.sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.sync()
        self.ms.append(1e3 * (time.perf_counter() - self._t0))

    def close(self):
        for h in self.handles:
            h.remove()


class PrefillKV:
    """Bytes of the HF KV cache right after prefill (first forward of the language model)."""

    def __init__(self, model):
        self.bytes: int | None = None
        self.handle = model.model.language_model.register_forward_hook(self._hook)

    def _hook(self, _module, _args, output):
        if self.bytes is None and getattr(output, "past_key_values", None) is not None:
            self.bytes = cache_nbytes(output.past_key_values)

    def close(self):
        self.handle.remove()


def cache_nbytes(cache) -> int:
    """Bytes held by a HF cache (DynamicCache in transformers 5: .layers[i].keys/.values)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    else:  # legacy tuple of (key, value) pairs
        tensors = [t for kv in cache for t in kv]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- one run per runtime --------------------------------------------------------------------------


@dataclass
class Run:
    vision_ms: float
    prefill_ms: float
    decode_tok_s: float
    e2e_ms: float
    kv_bytes: int
    kept_tokens: int
    new_tokens: int


def _decode_rate(first: float, last: float, n: int) -> float:
    return (n - 1) / (last - first) if n > 1 and last > first else 0.0


class EagerRunner:
    """eager-hf and eager-dart on one torch model."""

    def __init__(self, model, dart: DartConfig, device: str):
        import torch

        from dart_ops.eager import EagerDart

        self.torch = torch
        self.model = model
        self.device = torch.device(device)
        self.dart = EagerDart(model, dart)
        self.sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)

    def run(self, runtime: str, ids, pixels, ratio: float, n: int) -> Run:
        torch = self.torch
        vision = VisionClock(self.model, self.sync)
        clock = TokenClock(self.sync)
        kv = PrefillKV(self.model)
        try:
            with torch.inference_mode():
                self.sync()
                t0 = time.perf_counter()
                if runtime == "eager-hf":
                    out = self.model.generate(
                        input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                        max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                        pad_token_id=0, streamer=clock,
                    )
                    n_out, kv_bytes, kept = out.shape[1] - ids.shape[1], kv.bytes, ids.shape[1]
                else:
                    out = self.dart.generate(ids, pixels, keep_ratio=ratio, max_new_tokens=n, streamer=clock)
                    n_out, kv_bytes, kept = len(out.token_ids), out.timings["kv_bytes"], len(out.kept_positions)
                self.sync()
                t1 = time.perf_counter()
        finally:
            vision.close()
            kv.close()
        if n_out != n or len(clock.stamps) != n or len(vision.ms) != 1:
            raise BenchError(f"{runtime}: expected {n} new tokens and one vision pass, got {n_out} tokens, "
                             f"{len(clock.stamps)} stamps, {len(vision.ms)} vision passes")
        return Run(vision.ms[0], 1e3 * (clock.stamps[0] - t0), _decode_rate(clock.stamps[0], clock.stamps[-1], n),
                   1e3 * (t1 - t0), int(kv_bytes or 0), kept, n_out)


class _Recorder:
    """Wraps a Stage; keeps the feeds of its first call (the decoder prefill) for profiling."""

    def __init__(self, stage):
        self.stage = stage
        self.name, self.input_names, self.output_names = stage.name, stage.input_names, stage.output_names
        self.first: dict | None = None

    def run(self, feeds):
        if self.first is None:
            self.first = dict(feeds)
        return self.stage.run(feeds)


class OrtRunner:
    def __init__(self, engine_dir: Path, provider: str, threads: int):
        import runtime

        self.engine_dir = engine_dir
        self.threads = threads
        self.provider = provider
        self.pipe = runtime.load(engine_dir, providers=[provider], threads=threads)

    def run(self, ids, pixels, ratio: float, n: int, record: bool = False):
        recorder = None
        if record:
            recorder = self.pipe.decoder = _Recorder(self.pipe.decoder)
        try:
            t0 = time.perf_counter()
            out = self.pipe.generate(input_ids=ids, pixel_values=pixels, keep_ratio=ratio, max_new_tokens=n,
                                     ignore_eos=True)
            t1 = time.perf_counter()
        finally:
            if recorder is not None:
                self.pipe.decoder = recorder.stage
        t = out.timings
        if len(out.token_ids) != n:
            raise BenchError(f"ort: expected {n} new tokens, got {len(out.token_ids)}")
        ttft = t["vision_ms"] + t["embed_ms"] + t["prefill_ms"]
        run = Run(t["vision_ms"], ttft, t["tokens_per_s"], 1e3 * (t1 - t0), int(t["kv_bytes"]),
                  int(t["kept_tokens"]), len(out.token_ids))
        return (run, recorder.first) if record else run

    def profile_dart(self, feeds: dict, runs: int) -> tuple[float, float]:
        """(ms of DartPrune's nodes per prefill, their share of all node time in the prefill), from
        ONNX Runtime's profiler on a separate decoder session (profiling slows every node alike)."""
        import tempfile

        import onnxruntime as ort

        from dart_ops.onnx_op import NODE_PREFIX
        from runtime.stage import resolve_providers

        with tempfile.TemporaryDirectory() as tmp:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.log_severity_level = 3
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / "decoder")
            session = ort.InferenceSession(str(self.engine_dir / "decoder.onnx"), opts,
                                           providers=resolve_providers([self.provider]))
            session.run(None, feeds)  # warm-up, dropped below
            for _ in range(runs):
                session.run(None, feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
        return dart_share(events, NODE_PREFIX.rstrip("/"), skip_runs=1)


def dart_share(events: list[dict], marker: str, skip_runs: int = 0) -> tuple[float, float]:
    """From an ONNX Runtime profile: (ms per run of nodes whose name contains `marker`, their
    fraction of all node time), over the runs after the first `skip_runs`."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[skip_runs:]
    if not runs:
        raise BenchError("the ONNX Runtime profile holds no model_run events")
    marked = total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(a <= e["ts"] <= b for a, b in runs):
            continue
        total += e["dur"]
        if marker in e["name"]:
            marked += e["dur"]
    if marked == 0:
        raise BenchError(f"no {marker} nodes in the profile: was the engine exported before DartPrune's "
                         "body nodes were named? re-export it")
    return marked / 1e3 / len(runs), marked / total


# --- the whole benchmark --------------------------------------------------------------------------


def environment(cfg: BenchConfig) -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "onnxruntime", "onnxruntime-gpu", "numpy", "tensorrt"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"machine": platform.platform(), "cpu": cpu, "logical_cpus": os.cpu_count(),
           "threads": cfg.threads, "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if cfg.device.startswith("cuda"):
        import torch

        env["gpu"] = torch.cuda.get_device_name(cfg.device)
        env["cuda"] = torch.version.cuda
    return env


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
        out.append({"target": f"DartPrune < 2% of ort decoder prefill at {pruned[0]:g}", "value": share,
                    "threshold": 0.02, "met": share < 0.02})
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
    """The templated prompt's ids with the image token expanded (what runtime.PromptBuilder does)."""
    from tokenizers import Tokenizer

    from runtime.prompt import expand_image_tokens

    text = src.prompt["template"].format(prompt=prompt)
    ids = Tokenizer.from_str(src.tokenizer_json).encode(text, add_special_tokens=src.prompt["add_special_tokens"]).ids
    return expand_image_tokens(ids, src.tokens["image_token_id"], src.tokens["image_seq_len"])


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
    d = cfg.dart
    build(parse_args(["--model", cfg.model, "--out", str(out), "--ratio", str(d.keep_ratio or 0.111),
                      "--layer", str(d.layer), "--pivots-image", str(d.pivots_image),
                      "--pivots-text", str(d.pivots_text)]))
    return out


def load_eager(model: str, engine_dir: Path | None, device: str, dtype: str):
    """The torch model: the engine's saved checkpoint when there is one (the exact weights that
    were exported), else the family's loader (presets build on `device` directly)."""
    import torch

    from export import families

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
        return AutoConfig.from_pretrained(model if model != "llava" else "llava-hf/llava-1.5-7b-hf",
                                          local_files_only=True).to_dict()
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
    engine_dir = ensure_engine(cfg) if "ort" in cfg.runtimes else cfg.engine_dir
    eager_model = loaded = None
    if eager_rows:
        import torch

        torch.set_num_threads(cfg.threads)
        eager_model, loaded = load_eager(cfg.model, engine_dir, cfg.device, cfg.dtype)
    src = _source(cfg, cfg.model, engine_dir, eager_model, loaded)
    shape = flops.ModelShape.from_llava_config(src.config)
    ids = prompt_ids(src, cfg.prompt)
    from runtime.preprocess import preprocess
    from runtime.prompt import find_span

    pixels = preprocess(cfg.image, src.preprocess)  # (1, 3, H, W) float32
    S = len(ids)
    a, L = find_span(ids, src.tokens["image_token_id"])
    log.info("bench: %s, S=%d tokens (%d vision at %d), %d new tokens, %d threads, %d+%d runs per row",
             cfg.model, S, L, a, cfg.new_tokens, cfg.threads, cfg.warmup, cfg.repeats)

    rows: list[Row] = []
    rss_per_row = True
    eager = ort_runner = None
    order = plan(cfg)
    for i, (rt, ratio) in enumerate(order):
        d = src.dart
        dart = DartConfig(d.layer, d.pivots_image, d.pivots_text, keep_ratio=ratio)
        counts = dart.counts(L, S - a - L)
        if rt.startswith("eager"):
            if eager is None:
                eager = _eager_inputs(EagerRunner(eager_model, src.dart, cfg.device), ids, pixels, cfg)
            runner, inputs = eager
            call = lambda rt=rt, ratio=ratio: runner.run(rt, *inputs, ratio, cfg.new_tokens)  # noqa: E731
        else:
            if ort_runner is None:
                if eager is not None and not any(r.startswith("eager") for r, _ in order[i:]):
                    eager = eager_model = None  # the torch model is not needed any more
                    gc.collect()
                ort_runner = OrtRunner(engine_dir, cfg.ort_provider, cfg.threads)
            call = lambda ratio=ratio: ort_runner.run(ids, pixels, ratio, cfg.new_tokens)  # noqa: E731
        runs = []
        gpu = _gpu_peak(cfg.device) if rt.startswith("eager") else None
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
            runtime=rt, keep_ratio=ratio, device=cfg.device if rt.startswith("eager") else cfg.ort_provider,
            prompt_tokens=S, vision_tokens=L, kept_tokens=last.kept_tokens,
            kept_vision_tokens=counts.kept_vision if rt != "eager-hf" else L, new_tokens=last.new_tokens,
            runs=len(runs), **med, kv_bytes=last.kv_bytes, peak_rss_bytes=mem.peak,
            rss_delta_bytes=max(0, mem.peak - mem.start), peak_gpu_bytes=gpu.peak() if gpu else None,
            spread=spread, flop_limit_speedup=flops.speedup_limit(shape, S, a, L, dart),
        )
        if rt == "ort" and cfg.profile and counts.prune:
            _, feeds = ort_runner.run(ids, pixels, ratio, 1, record=True)
            row.dart_prune_ms, row.dart_prune_share = ort_runner.profile_dart(feeds, cfg.repeats)
        rows.append(row)
        log.debug("bench: %s @ %g: prefill %.1f ms", rt, ratio, row.prefill_ms)
    add_speedups(rows)
    meta = environment(cfg)
    meta.update(model=cfg.model, engine_dir=str(engine_dir) if engine_dir else None, dtype=cfg.dtype,
                prompt_tokens=S, vision_tokens=L, span_start=a, new_tokens=cfg.new_tokens,
                repeats=cfg.repeats, warmup=cfg.warmup, dart=asdict(src.dart), shape=asdict(shape),
                flops_full=flops.prefill_flops(shape, S, None, src.dart.layer)["total"],
                peak_rss_scope="row" if rss_per_row else "process")
    return rows, meta


def total_runs(cfg: BenchConfig) -> int:
    return len(plan(cfg)) * (cfg.warmup + cfg.repeats)


def _eager_inputs(runner: EagerRunner, ids: list[int], pixels: np.ndarray, cfg: BenchConfig):
    torch = runner.torch
    dtype = torch.float16 if cfg.dtype == "fp16" else torch.float32
    t_ids = torch.tensor([ids], dtype=torch.long, device=runner.device)
    t_pix = torch.from_numpy(pixels).to(device=runner.device, dtype=dtype)
    return runner, (t_ids, t_pix)


class _GpuPeak:
    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, device

    def reset(self):
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(self.torch.cuda.max_memory_allocated(self.device))


def _gpu_peak(device: str):
    return _GpuPeak(device) if device.startswith("cuda") else None

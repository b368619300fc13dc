"""One timed generate call per runtime, behind one protocol: `run(ids, pixels, ratio, n) -> Run`.

    eager-hf     Hugging Face `generate` without pruning (keep ratio 1.0 only)
    eager-dart   the family's eager DART baseline (dart_ops.eager.EagerDart), every keep ratio
    ort          the exported engine through the torch-free runtime on ONNX Runtime
    trt          the same runtime on the TensorRT engines of `python -m export.trt`

RUNNERS[name] says how to build each from a Context (the torch model, the engine directory) and
what it needs; bench.run never branches on a runtime's name."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.config import BenchConfig
from bench.probes import BenchError, PrefillKV, TokenClock, VisionClock, dart_share
from dart_ops.spec import DartConfig


@dataclass
class Run:
    vision_ms: float
    prefill_ms: float
    decode_tok_s: float
    e2e_ms: float
    kv_bytes: int
    kept_tokens: int
    new_tokens: int
    decoder_ms: float = 0.0  # engine rows: the decoder's prefill call alone


class Runner(Protocol):
    device: str  # the row's device: cpu / cuda[:N] for eager rows, the execution provider for engine rows

    def run(self, ids: list[int], pixels: np.ndarray, ratio: float, n: int) -> Run:
        """One generate call of exactly `n` new tokens (eos ignored) at keep ratio `ratio`, timed.
        ids: the templated prompt with the image tokens expanded; pixels: (1, 3, H, W) float32."""
        ...


@dataclass
class Context:
    """What runners are built from: the torch model (eager rows) and the engine (engine rows)."""

    cfg: BenchConfig
    family: Any  # export.families.Family: the eager DART baseline
    dart: DartConfig  # layer and pivots (the engine's when there is one)
    model: Any = None  # the HF torch model (eval), None once the eager rows are done
    engine_dir: Path | None = None


def _decode_rate(first: float, last: float, n: int) -> float:
    return (n - 1) / (last - first) if n > 1 and last > first else 0.0


# --- eager rows ---------------------------------------------------------------------------------------


class EagerRunner:
    """A torch model timed with forward hooks: the vision pass (VisionClock), each new token
    (TokenClock, a HF streamer) and the KV cache after prefill (PrefillKV, through get_decoder)."""

    name = "eager"

    def __init__(self, ctx: Context):
        import torch

        self.torch = torch
        self.model = ctx.model
        self.device = ctx.cfg.device
        self.torch_device = torch.device(ctx.cfg.device)
        self.dtype = torch.float16 if ctx.cfg.dtype == "fp16" else torch.float32
        cuda = self.torch_device.type == "cuda"
        self.sync = (lambda: torch.cuda.synchronize(self.torch_device)) if cuda else (lambda: None)

    def _generate(self, ids, pixels, ratio: float, n: int, clock: TokenClock, kv: PrefillKV):
        """(new tokens, KV bytes after prefill, tokens kept in the prefill) of one generate call."""
        raise NotImplementedError

    def run(self, ids: list[int], pixels: np.ndarray, ratio: float, n: int) -> Run:
        torch = self.torch
        t_ids = torch.tensor([ids], dtype=torch.long, device=self.torch_device)  # (1, S)
        t_pix = torch.from_numpy(pixels).to(device=self.torch_device, dtype=self.dtype)  # (1, 3, H, W)
        vision = VisionClock(self.model, self.sync)
        clock = TokenClock(self.sync)
        kv = PrefillKV(self.model)
        try:
            with torch.inference_mode():
                self.sync()
                t0 = time.perf_counter()
                n_out, kv_bytes, kept = self._generate(t_ids, t_pix, ratio, n, clock, kv)
                self.sync()
                t1 = time.perf_counter()
        finally:
            vision.close()
            kv.close()
        if n_out != n or len(clock.stamps) != n or len(vision.ms) != 1:
            raise BenchError(f"{self.name}: expected {n} new tokens and one vision pass, got {n_out} tokens, "
                             f"{len(clock.stamps)} stamps, {len(vision.ms)} vision passes")
        return Run(vision.ms[0], 1e3 * (clock.stamps[0] - t0), _decode_rate(clock.stamps[0], clock.stamps[-1], n),
                   1e3 * (t1 - t0), int(kv_bytes or 0), kept, n_out)


class EagerHF(EagerRunner):
    """Hugging Face generate, greedy, no pruning (`ratio` is ignored: plan runs it at 1.0 only)."""

    name = "eager-hf"

    def _generate(self, ids, pixels, ratio, n, clock, kv):
        out = self.model.generate(
            input_ids=ids, pixel_values=pixels, attention_mask=self.torch.ones_like(ids),
            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
            pad_token_id=0, streamer=clock,
        )  # (1, S + n)
        return out.shape[1] - ids.shape[1], kv.bytes, ids.shape[1]


class EagerDartRunner(EagerRunner):
    """The family's eager DART baseline (family.eager(hf, dart)) on the same torch model."""

    name = "eager-dart"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.dart = ctx.family.eager(self.model, ctx.dart)

    def _generate(self, ids, pixels, ratio, n, clock, kv):
        out = self.dart.generate(ids, pixels, keep_ratio=ratio, max_new_tokens=n, streamer=clock)
        return len(out.token_ids), out.timings["kv_bytes"], len(out.kept_positions)


# --- engine rows --------------------------------------------------------------------------------------


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


class EngineRunner:
    """The engine through the runtime on one provider. kv_binding: the decode loop keeps the KV
    cache with the decoder (IOBinding / TensorRT device buffers) or copies it through numpy;
    switchable between runs on the same loaded engine (`self.pipe.kv_binding`)."""

    def __init__(self, engine_dir: Path, provider: str, threads: int, spin: bool = False, kv_binding: bool = True):
        import runtime

        self.engine_dir = engine_dir
        self.threads = threads
        self.provider = self.device = provider
        self.spin = spin
        self.pipe = runtime.load(engine_dir, providers=[provider], threads=threads, spin=spin, kv_binding=kv_binding)

    @classmethod
    def on(cls, provider: Callable[[BenchConfig], str]) -> Callable[[Context], EngineRunner]:
        """The RUNNERS factory of the engine rows on `provider(cfg)`."""
        return lambda ctx: cls(ctx.engine_dir, provider(ctx.cfg), ctx.cfg.threads, ctx.cfg.ort_spin,
                               ctx.cfg.kv_binding)

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
            raise BenchError(f"engine on {self.provider}: expected {n} new tokens, got {len(out.token_ids)}")
        ttft = t["vision_ms"] + t["embed_ms"] + t["prefill_ms"]
        run = Run(t["vision_ms"], ttft, t["tokens_per_s"], 1e3 * (t1 - t0), int(t["kv_bytes"]),
                  int(t["kept_tokens"]), len(out.token_ids), t["prefill_ms"])
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
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / "decoder")
            session = ort.InferenceSession(str(self.engine_dir / "decoder.onnx"), opts,
                                           providers=resolve_providers([self.provider]))
            session.run(None, feeds)  # warm-up, dropped below
            for _ in range(runs):
                session.run(None, feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
        return dart_share(events, NODE_PREFIX.rstrip("/"), skip_runs=1)


def _check_trt(engine_dir: Path) -> None:
    from runtime.manifest import read_manifest
    from runtime.pipeline import check_trt_engines

    check_trt_engines(read_manifest(engine_dir, verify=False))


# --- the table ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """How a runtime's rows are built and what they need."""

    make: Callable[[Context], Runner]
    engine: bool  # needs the exported engine (else the torch model)
    prunes: bool = True  # runs every keep ratio (else 1.0 only)
    profiles: bool = False  # pruned rows also profile DartPrune's share (ONNX Runtime profiler)
    check: Callable[[Path], None] | None = None  # raises before any row runs when the engine lacks something


RUNNERS: dict[str, Kind] = {
    "eager-hf": Kind(EagerHF, engine=False, prunes=False),
    "eager-dart": Kind(EagerDartRunner, engine=False),
    "ort": Kind(EngineRunner.on(lambda cfg: cfg.ort_provider), engine=True, profiles=True),
    "trt": Kind(EngineRunner.on(lambda cfg: "tensorrt"), engine=True, check=_check_trt),
}

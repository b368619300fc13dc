"""One timed generation per runtime, behind one protocol: `run(inputs, ratio, n) -> Run`.

    eager-hf     Hugging Face `generate` without pruning (keep ratio 1.0 only)
    eager-dart   the family's eager DART baseline (dart_ops.eager.EagerDart), every keep ratio
    ort          the exported engine through the torch-free runtime on ONNX Runtime (prepare untimed,
                 prefill + decode_step timed)
    ort-int8     `ort` on the engine's weight-only int8 copy (export.quantize --bits 8, defaults: --target ort,
                 decoder linears, LM head in float) in <engine-dir>-int8, made when missing
    ort-int4     the same at --bits 4, in <engine-dir>-int4
    trt          the same runtime on the TensorRT engines of `python -m export.trt`

RUNNERS[name] says how to build each from a Context (the torch model, the engine directory) and
what it needs; bench.run never branches on a runtime's name, and no runner on a family's
(bench.families holds what differs per family)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench.config import BenchConfig
from bench.families import BenchFamily, Inputs, for_family
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
    token_ids: list[int] = field(default_factory=list)
    first_logits: np.ndarray | None = None  # engine rows: (V,) the prefill's logits (the first step's)


class Runner(Protocol):
    device: str  # the row's device: cpu / cuda[:N] for eager rows, the execution provider for engine rows

    def run(self, inputs: Inputs, ratio: float, n: int) -> Run:
        """One generation of exactly `n` new tokens (eos ignored) at keep ratio `ratio`, timed from
        the tokenised ids and preprocessed image of `inputs` (bench.families.Inputs: the same for
        every row of a run)."""
        ...


@dataclass
class Context:
    """What runners are built from: the torch model (eager rows) and the engine (engine rows)."""

    cfg: BenchConfig
    family: Any  # export.families.Family: the eager DART baseline
    dart: DartConfig  # layer and pivots (the engine's when there is one)
    model: Any = None  # the HF torch model (eval), None once the eager rows are done
    engine_dir: Path | None = None
    bench_family: BenchFamily | None = None  # bench.families entry of the manifest's family
    quantized: dict[int, Path] = field(default_factory=dict)  # bits -> the engine's quantized copy


def _decode_rate(first: float, last: float, n: int) -> float:
    return (n - 1) / (last - first) if n > 1 and last > first else 0.0


# --- eager rows ---------------------------------------------------------------------------------------


class EagerRunner:
    """A torch model timed with forward hooks: the vision pass (VisionClock), each new token
    (TokenClock, a HF streamer) and the KV cache after prefill (PrefillKV, through get_decoder).
    The family's extra arguments (bench.families: Qwen's grid, positions) are built before the clock starts."""

    name = "eager"

    def __init__(self, ctx: Context):
        import torch

        self.torch = torch
        self.model = ctx.model
        self.family = ctx.bench_family
        self.device = ctx.cfg.device
        self.torch_device = torch.device(ctx.cfg.device)
        self.dtype = torch.float16 if ctx.cfg.dtype == "fp16" else torch.float32
        cuda = self.torch_device.type == "cuda"
        self.sync = (lambda: torch.cuda.synchronize(self.torch_device)) if cuda else (lambda: None)

    def _kwargs(self, inputs: Inputs, ids) -> dict:
        """The family's extra arguments of this runner's generate call (untimed)."""
        raise NotImplementedError

    def _generate(self, ids, pixels, ratio: float, n: int, clock: TokenClock, kv: PrefillKV, kwargs: dict):
        """(new tokens, KV bytes after prefill, tokens kept in the prefill) of one generate call."""
        raise NotImplementedError

    def run(self, inputs: Inputs, ratio: float, n: int) -> Run:
        torch = self.torch
        t_ids = torch.tensor([inputs.ids], dtype=torch.long, device=self.torch_device)  # (1, S)
        t_pix = torch.from_numpy(inputs.pixels).to(device=self.torch_device, dtype=self.dtype)  # (1, 3, H, W) | (N, 1176)
        vision = VisionClock(self.model, self.sync)
        clock = TokenClock(self.sync)
        kv = PrefillKV(self.model)
        try:
            with torch.inference_mode():
                kwargs = self._kwargs(inputs, t_ids)
                self.sync()
                t0 = time.perf_counter()
                tokens, kv_bytes, kept = self._generate(t_ids, t_pix, ratio, n, clock, kv, kwargs)
                self.sync()
                t1 = time.perf_counter()
        finally:
            vision.close()
            kv.close()
        if len(tokens) != n or len(clock.stamps) != n or len(vision.ms) != 1:
            raise BenchError(f"{self.name}: expected {n} new tokens and one vision pass, got {len(tokens)} tokens, "
                             f"{len(clock.stamps)} stamps, {len(vision.ms)} vision passes")
        return Run(vision.ms[0], 1e3 * (clock.stamps[0] - t0), _decode_rate(clock.stamps[0], clock.stamps[-1], n),
                   1e3 * (t1 - t0), int(kv_bytes or 0), kept, len(tokens), token_ids=tokens)


class EagerHF(EagerRunner):
    """Hugging Face generate, greedy, no pruning (`ratio` is ignored: plan runs it at 1.0 only)."""

    name = "eager-hf"

    def _kwargs(self, inputs, ids):
        return self.family.hf_kwargs(self.model, inputs, ids)

    def _generate(self, ids, pixels, ratio, n, clock, kv, kwargs):
        out = self.model.generate(
            input_ids=ids, pixel_values=pixels, attention_mask=self.torch.ones_like(ids), **kwargs,
            max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
            pad_token_id=0, streamer=clock,
        )  # (1, S + n)
        return out[0, ids.shape[1]:].tolist(), kv.bytes, ids.shape[1]


class EagerDartRunner(EagerRunner):
    """The family's eager DART baseline (family.eager(hf, dart)) on the same torch model."""

    name = "eager-dart"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.dart = ctx.family.eager(self.model, ctx.dart)

    def _kwargs(self, inputs, ids):
        return self.family.dart_kwargs(self.model, inputs, ids)

    def _generate(self, ids, pixels, ratio, n, clock, kv, kwargs):
        out = self.dart.generate(ids, pixels, keep_ratio=ratio, max_new_tokens=n, streamer=clock, **kwargs)
        return out.token_ids, out.timings["kv_bytes"], len(out.kept_positions)


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
    """The engine through the runtime's step API on one provider: `prepare` (checks, prompt ids,
    the family's preprocessing, positions) untimed, then `prefill` and the greedy `decode_step`
    loop timed, as `Pipeline.generate` runs them. kv_binding: the decode loop keeps the KV cache
    with the decoder (IOBinding / TensorRT device buffers) or copies it through numpy; switchable
    between runs on the same loaded engine (`self.pipe.kv_binding`)."""

    def __init__(self, engine_dir: Path, provider: str, threads: int, spin: bool = False, kv_binding: bool = True,
                 family: BenchFamily | None = None):
        import runtime

        self.engine_dir = engine_dir
        self.threads = threads
        self.provider = self.device = provider
        self.spin = spin
        self.pipe = runtime.load(engine_dir, providers=[provider], threads=threads, spin=spin, kv_binding=kv_binding)
        self.family = family or for_family(self.pipe.manifest.family)
        self.checked: Inputs | None = None

    @classmethod
    def on(cls, provider: Callable[[BenchConfig], str], bits: int | None = None) -> Callable[[Context], EngineRunner]:
        """The RUNNERS factory of the engine rows on `provider(cfg)`: the engine, or its int`bits` copy."""
        return lambda ctx: cls(ctx.engine_dir if bits is None else ctx.quantized[bits], provider(ctx.cfg),
                               ctx.cfg.threads, ctx.cfg.ort_spin, ctx.cfg.kv_binding, ctx.bench_family)

    def prepare(self, inputs: Inputs, ratio: float, n: int):
        """The runtime's Prompt for `inputs` (untimed), checked once to hold the same ids, span and
        pixels as the eager rows get."""
        from runtime.steps import Request

        prompt = self.pipe.prepare(Request(**self.family.engine_request(inputs), keep_ratio=ratio, max_new_tokens=n,
                                           ignore_eos=True))
        if self.checked is not inputs:
            check_same_inputs(prompt, inputs, self.pipe.manifest)
            self.checked = inputs
        return prompt

    def run(self, inputs: Inputs, ratio: float, n: int, record: bool = False):
        prompt = self.prepare(inputs, ratio, n)
        recorder = None
        if record:
            recorder = self.pipe.decoder = _Recorder(self.pipe.decoder)
        try:
            t0 = time.perf_counter()
            state = self.pipe.prefill(prompt)
            first = np.array(state.logits, dtype=np.float32).reshape(-1)  # (V,) a copy: decode replaces it
            t1 = time.perf_counter()
            tokens = self._decode(prompt, state, n)
            t2 = time.perf_counter()
        finally:
            if recorder is not None:
                self.pipe.decoder = recorder.stage
        if len(tokens) != n:
            raise BenchError(f"engine on {self.provider}: expected {n} new tokens, got {len(tokens)}")
        ttft = 1e3 * (state.vision_s + state.embed_s + state.prefill_s)
        rate = state.steps / (t2 - t1) if state.steps and t2 > t1 else 0.0
        run = Run(1e3 * state.vision_s, ttft, rate, 1e3 * (t2 - t0), int(state.kv_bytes), len(state.kept),
                  len(tokens), 1e3 * state.prefill_s, tokens, first)
        return (run, recorder.first) if record else run

    def _decode(self, prompt, state, n: int) -> list[int]:
        """Greedy tokens from the prefill's logits, eos ignored: Pipeline.generate's loop."""
        tokens, logits = [], state.logits
        for t in range(n):
            tokens.append(prompt.sampler(logits))
            if t + 1 == n:
                break
            logits = self.pipe.decode_step(state, tokens[-1])
        return tokens

    def profile_dart(self, feeds: dict, runs: int) -> tuple[float, float]:
        """(ms of DartPrune's nodes per prefill, their share of all node time in the prefill), from
        ONNX Runtime's profiler on a separate decoder session (profiling slows every node alike)."""
        import tempfile

        import onnxruntime as ort

        from dart_ops.onnx_op_slots import NODE_PREFIX
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


def check_same_inputs(prompt, inputs: Inputs, manifest) -> None:
    """BenchError unless the engine's prepared prompt has exactly the ids, image span and pixel
    values the eager rows are fed (the runtime preprocesses the image itself for some families)."""
    pixels_name = manifest.stages["vision_encoder"].inputs[0].name
    engine_pixels = prompt.vision.feeds.get(pixels_name) if prompt.vision is not None else None
    problems = [what for what, same in (
        ("prompt ids", prompt.ids == inputs.ids),
        (f"image span {prompt.span} vs {inputs.span}", prompt.span == inputs.span),
        ("pixel values", engine_pixels is not None and engine_pixels.shape == inputs.pixels.shape
         and np.array_equal(engine_pixels, inputs.pixels)),
    ) if not same]
    if problems:
        raise BenchError(f"the engine prepared other inputs than the eager rows get ({', '.join(problems)}); "
                         "the engine's preprocessing or template differs from the model's: re-export it")


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
    bits: int | None = None  # runs the engine's weight-only int`bits` copy (bench.source.ensure_quantized)


RUNNERS: dict[str, Kind] = {
    "eager-hf": Kind(EagerHF, engine=False, prunes=False),
    "eager-dart": Kind(EagerDartRunner, engine=False),
    "ort": Kind(EngineRunner.on(lambda cfg: cfg.ort_provider), engine=True, profiles=True),
    "ort-int8": Kind(EngineRunner.on(lambda cfg: cfg.ort_provider, bits=8), engine=True, bits=8),
    "ort-int4": Kind(EngineRunner.on(lambda cfg: cfg.ort_provider, bits=4), engine=True, bits=4),
    "trt": Kind(EngineRunner.on(lambda cfg: "tensorrt"), engine=True, check=_check_trt),
}

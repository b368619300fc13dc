"""One timed generate call per runtime: eager Hugging Face / eager DART on a torch model, and the
exported engine through the torch-free runtime on ONNX Runtime."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from dart_ops.spec import DartConfig
from export.bench_probes import BenchError, PrefillKV, TokenClock, VisionClock, dart_share


@dataclass
class Run:
    vision_ms: float
    prefill_ms: float
    decode_tok_s: float
    e2e_ms: float
    kv_bytes: int
    kept_tokens: int
    new_tokens: int
    decoder_ms: float = 0.0  # ort: the decoder's prefill call alone


def _decode_rate(first: float, last: float, n: int) -> float:
    return (n - 1) / (last - first) if n > 1 and last > first else 0.0


class EagerRunner:
    """eager-hf and eager-dart on one torch model."""

    def __init__(self, model, dart: DartConfig, device: str, family):
        import torch

        self.torch = torch
        self.model = model
        self.device = torch.device(device)
        self.dart = family.eager(model, dart)  # the family's eager DART baseline
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
    """The engine through the runtime. kv_binding: the decode loop keeps the KV cache with the
    decoder (IOBinding / TensorRT device buffers) or copies it through numpy; switchable between
    runs on the same loaded engine (`self.pipe.kv_binding`)."""

    def __init__(self, engine_dir: Path, provider: str, threads: int, spin: bool = False, kv_binding: bool = True):
        import runtime

        self.engine_dir = engine_dir
        self.threads = threads
        self.provider = provider
        self.spin = spin
        self.pipe = runtime.load(engine_dir, providers=[provider], threads=threads, spin=spin, kv_binding=kv_binding)

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

"""What the benchmark (bench/) measures with, apart from the runs themselves: peak memory, per-token
and vision clocks, KV-cache bytes, DartPrune's share of an ONNX Runtime profile, the machine's
matmul rate, and the environment (machine, versions)."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np


class BenchError(RuntimeError):
    """A benchmark the user asked for cannot run here (reported as one line)."""


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
    """Times the vision encoder + projector of a HF vision-language model: its base model's
    `get_image_features` (what HF's own forward and dart_ops.eager.EagerDart both call, for every
    family), wrapped on the instance while the clock is open."""

    def __init__(self, model, sync):
        self.sync = sync
        self.ms: list[float] = []
        self.inner = model.base_model  # LlavaModel for LlavaForConditionalGeneration
        timed = self.inner.get_image_features

        @functools.wraps(timed)  # HF generate reads its signature to pick the encoder's arguments
        def get_image_features(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = timed(*args, **kwargs)
            self.sync()
            self.ms.append(1e3 * (time.perf_counter() - t0))
            return out

        self.inner.get_image_features = get_image_features

    def close(self):
        del self.inner.get_image_features  # the class's method again


class PrefillKV:
    """Bytes of the HF KV cache right after prefill (first forward of the language model)."""

    def __init__(self, model):
        self.bytes: int | None = None
        self.handle = model.get_decoder().register_forward_hook(self._hook)

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


class GpuPeak:
    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, device

    def reset(self):
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return int(self.torch.cuda.max_memory_allocated(self.device))


def gpu_peak(device: str):
    return GpuPeak(device) if device.startswith("cuda") else None


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


def matmul_rate(m: int, k: int, n: int, threads: int, use_torch: bool, runs: int = 20) -> dict[str, float]:
    """GFLOP/s of one fp32 (m, k) @ (k, n) matmul (median of `runs`) in ONNX Runtime and, with
    `use_torch`, PyTorch: what this machine reaches on the model's largest GEMM shape, the
    ceiling for any runtime's prefill."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    flop = 2 * m * k * n

    def rate(fn) -> float:
        fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return flop / statistics.median(times) / 1e9

    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [vi("a", TensorProto.FLOAT, [m, k]), vi("b", TensorProto.FLOAT, [k, n])],
                              [vi("c", TensorProto.FLOAT, [m, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = {"onnxruntime": rate(lambda: sess.run(None, {"a": a, "b": b}))}
    if use_torch:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        with torch.inference_mode():
            out["torch"] = rate(lambda: torch.mm(ta, tb))
    return out


def environment(threads: int, device: str) -> dict:
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
           "threads": threads, "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.startswith("cuda"):
        import torch

        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env

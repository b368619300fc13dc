"""One interface for running a graph, so backends (ONNX Runtime now, TensorRT later) can be swapped
and compared: `stage.run(feeds) -> outputs`, both dicts of numpy arrays keyed by tensor name."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from runtime.errors import EngineError, InputError

log = logging.getLogger(__name__)

# Short names of ONNX Runtime execution providers accepted by load(providers=...) and the CLI's
# --provider. "tensorrt" (native TensorRT engines, runtime/trt_stage.py) is handled by load().
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "ort-tensorrt": "TensorrtExecutionProvider",
}


class Stage(Protocol):
    """A runnable graph: named numpy inputs in, named numpy outputs out."""

    name: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def resolve_providers(names: Sequence[str] | None) -> list[str]:
    """ONNX Runtime provider names for short ("cpu", "cuda", "ort-tensorrt") or full names.

    None means CPU. CPU is appended as the fallback for nodes a GPU provider does not take.
    Raises EngineError when a requested provider is not in this onnxruntime build.
    """
    names = ["cpu"] if not names else list(names)
    available = ort.get_available_providers()
    resolved = []
    for name in names:
        full = PROVIDERS.get(name.lower(), name) if isinstance(name, str) else name
        if full not in PROVIDERS.values():
            raise EngineError(f"unknown provider {name!r}; use one of {', '.join(PROVIDERS)}")
        if full not in available:
            raise EngineError(
                f"provider {name!r} ({full}) is not available in this onnxruntime build (available: "
                f"{', '.join(available)}); CUDA and TensorRT need onnxruntime-gpu instead of onnxruntime"
            )
        if full not in resolved:
            resolved.append(full)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


class OrtStage:
    """A graph run by an onnxruntime InferenceSession.

    threads: intra-op thread count (None: ONNX Runtime's default, one per physical core).
    provider_options: {provider: {option: value}} passed to ONNX Runtime (see _options_for).
    spin:    let idle intra-op threads busy-wait for the next op (ONNX Runtime's default). Off
             by default here: a pipeline runs three sessions one after another, each with its
             own thread pool, and on a small CPU an idle pool's spinning steals the cores the
             running session needs (measured in docs/BENCHMARKS.md).
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        name: str | None = None,
        spin: bool = False,
        provider_options: dict[str, dict] | None = None,
    ):
        self.path = Path(path)
        self.name = name or self.path.stem
        self.providers = resolve_providers(providers)
        opts = ort.SessionOptions()
        if threads is not None:
            if threads < 1:
                raise InputError(f"threads must be >= 1, got {threads}")
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        # Fatal only: ONNX Runtime warns about every CPU fallback node and logs each error (in red)
        # before raising it; every error reaches the caller as one EngineError line instead.
        opts.log_severity_level = 4
        try:
            options = _options_for(self.providers, provider_options or {})
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=self.providers,
                                                provider_options=options)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise EngineError(f"{self.path.name}: onnxruntime cannot load it ({_first_line(exc)}); "
                              "re-export the engine") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # What runtime.engine_checks.check_graphs compares with the manifest: dims are ints (fixed),
        # strings (named dynamic axes) or None; metadata is the model's metadata_props.
        self.input_shapes = {i.name: list(i.shape) for i in self.session.get_inputs()}
        self.output_shapes = {o.name: list(o.shape) for o in self.session.get_outputs()}
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        log.info("%s: loaded %s on %s", self.name, self.path.name, ", ".join(self.session.get_providers()))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self.session.run(self.output_names, feeds, self._run_options)
        except Exception as exc:
            raise EngineError(f"{self.name}: onnxruntime failed ({_first_line(exc)})") from exc
        return dict(zip(self.output_names, outputs))


def _options_for(providers: list[str], options: dict[str, dict]) -> list[dict]:
    """Per-provider option dicts in `providers` order; keys of `options` are short or full names,
    values ONNX Runtime's provider options as strings (e.g. {"ort-tensorrt": {"trt_fp16_enable":
    "True", "trt_engine_cache_enable": "True", "trt_engine_cache_path": "cache/"}})."""
    full = {PROVIDERS.get(k, k): v for k, v in options.items()}
    unknown = set(full) - set(providers)
    if unknown:
        raise EngineError(f"provider options given for {sorted(unknown)}, which are not in use ({providers})")
    return [{k: str(v) for k, v in full.get(p, {}).items()} for p in providers]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

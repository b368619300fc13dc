"""One interface for running a graph, so backends (ONNX Runtime, TensorRT) can be swapped and
compared: `stage.run(feeds) -> outputs`, both dicts of numpy arrays keyed by tensor name.

A decode loop calls the decoder again and again, each call's present KV being the next call's past
KV. `kv_loop(stage, carry, fetch)` runs such a loop: carried outputs stay where the backend keeps
them (OrtStage: OrtValues through IOBinding, on the GPU with CUDA; TrtStage: its device buffers)
and only the `fetch` outputs come back as numpy. A stage without a loop of its own (and
`bound=False`) gets NumpyKVLoop: the same calls through `run`, every KV tensor a numpy array.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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


class KVLoop(Protocol):
    """Successive calls of one stage where the outputs named in `carry` ({output: input}, e.g.
    present_key_0 -> past_key_0) become the next call's inputs.

    run(feeds): the first call gives every input; later calls every input but the carried ones (a
    carried input given in `feeds` replaces the carried value). Returns the `fetch` outputs.
    kv_bytes(): bytes of the values carried into the next call.
    bound: True when the carried values stay with the backend (no numpy round trip)."""

    bound: bool

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def kv_bytes(self) -> int: ...


def kv_loop(stage: Stage, carry: Mapping[str, str], fetch: Sequence[str], bound: bool = True) -> KVLoop:
    """The stage's own loop (`stage.kv_loop(carry, fetch)`: OrtStage, TrtStage) when `bound` and
    the stage's class defines one, else NumpyKVLoop (the numpy round trip through `stage.run`). The
    class, not the instance: a wrapper that overrides `run` and forwards other attributes (a spy, a
    recorder) must see every call, so it gets the numpy loop through its own `run`."""
    make = getattr(type(stage), "kv_loop", None) if bound else None
    return make(stage, carry, fetch) if make is not None else NumpyKVLoop(stage, carry, fetch)


def check_carry(stage: Stage, carry: Mapping[str, str], fetch: Sequence[str]) -> None:
    """Every carried output and fetched output is an output of `stage`, every carried-to name an input."""
    outs, ins = set(stage.output_names), set(stage.input_names)
    bad = [n for n in [*carry, *fetch] if n not in outs] + [n for n in carry.values() if n not in ins]
    if bad:
        raise EngineError(f"{stage.name}: {bad} are not outputs / inputs of the graph (outputs "
                          f"{stage.output_names}, inputs {stage.input_names})")


class NumpyKVLoop:
    """A KV loop through `stage.run`: carried outputs come back as numpy arrays and are fed again."""

    bound = False

    def __init__(self, stage: Stage, carry: Mapping[str, str], fetch: Sequence[str]):
        check_carry(stage, carry, fetch)
        self.stage, self.carry, self.fetch = stage, dict(carry), tuple(fetch)
        self.carried: dict[str, np.ndarray] = {}  # input name -> the previous call's output

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.stage.run({**self.carried, **feeds})
        self.carried = {inp: out[name] for name, inp in self.carry.items()}
        return {n: out[n] for n in self.fetch}

    def kv_bytes(self) -> int:
        return sum(int(v.nbytes) for v in self.carried.values())


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

    def kv_loop(self, carry: Mapping[str, str], fetch: Sequence[str]) -> OrtKVLoop:
        return OrtKVLoop(self, carry, fetch)


# Providers whose outputs an IOBinding can keep in CUDA memory (device_id from their options).
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def kv_device(session: ort.InferenceSession) -> tuple[str, int]:
    """(device type, id) where a session's first provider computes: ("cuda", id) or ("cpu", 0)."""
    first = session.get_providers()[0]
    if first in CUDA_PROVIDERS:
        return "cuda", int(session.get_provider_options().get(first, {}).get("device_id", 0))
    return "cpu", 0


class OrtKVLoop:
    """A KV loop through one IOBinding: carried outputs stay OrtValues on the session's device
    (kv_device: the GPU with CUDA / TensorRT providers) and are bound as the next call's inputs;
    numpy feeds are bound in place (bind_cpu_input: no copy on CPU); fetched outputs are bound to
    the CPU and returned as numpy arrays that share the OrtValue's memory.

    ONNX Runtime 1.32 behaviour relied on (tests/test_kv_binding.py checks each): OrtValues and
    bound inputs may have 0-length dims (the prefill's empty past KV); an output bound by device
    only is allocated by ONNX Runtime, but after a run the binding holds that allocated value and
    would reuse it, refusing the next step's longer KV, so outputs are re-bound before every run;
    numpy arrays from OrtValue.numpy() stay valid after the binding moves on.
    The CUDA path is not exercised here (no GPU and no onnxruntime-gpu on the development machines)."""

    bound = True

    def __init__(self, stage: OrtStage, carry: Mapping[str, str], fetch: Sequence[str]):
        check_carry(stage, carry, fetch)
        self.stage, self.carry, self.fetch = stage, dict(carry), tuple(fetch)
        self.device = kv_device(stage.session)
        self.binding = stage.session.io_binding()
        self.carried: dict[str, ort.OrtValue] = {}  # input name -> the previous call's output

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stage, b = self.stage, self.binding
        missing = [n for n in stage.input_names if n not in feeds and n not in self.carried]
        extra = [n for n in feeds if n not in stage.input_names]
        if missing or extra:  # an input left bound from an earlier call would be read silently
            raise EngineError(f"{stage.name}: missing inputs {missing}, unexpected inputs {extra}")
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name, value in self.carried.items():
            if name not in feeds:
                b.bind_ortvalue_input(name, value)
        for name, value in feeds.items():
            b.bind_cpu_input(name, np.asarray(value, order="C"))
        for name in self.carry:
            b.bind_output(name, *self.device)
        for name in self.fetch:
            b.bind_output(name, "cpu")
        try:
            stage.session.run_with_iobinding(b, stage._run_options)
        except Exception as exc:
            raise EngineError(f"{stage.name}: onnxruntime failed ({_first_line(exc)})") from exc
        values = dict(zip([*self.carry, *self.fetch], b.get_outputs()))  # binding order
        self.carried = {inp: values[name] for name, inp in self.carry.items()}
        return {n: values[n].numpy() for n in self.fetch}

    def kv_bytes(self) -> int:
        return sum(int(v.tensor_size_in_bytes()) for v in self.carried.values())


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

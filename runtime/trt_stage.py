"""TrtStage: the Stage interface (`run(feeds) -> outputs`, numpy in and out) over a serialized
TensorRT engine (the Jetson path: TensorRT 10.3, JetPack 6). tensorrt and cuda-python are imported
lazily; pick_profile and coerce_input are pure. One execution context per optimization profile
(decoder: 0 = prefill, 1 = decode), created on first use and bound to its profile once; each call
picks the first profile whose shape ranges hold every input. Device buffers are cached per tensor
name and only grow. Not thread-safe.

Every input is an ordinary execution tensor in device memory, 0-d ones included (the decoder's
int32 span_start, span_len, quota are data; its pruned length comes from kept_slots' shape). An
engine with a shape-tensor input (values on the host, value ranges in the profiles: what older
exports' int64 span/quota scalars became) is refused at load: TensorRT 10.3's Python API takes
shape-tensor profile values as int32 only (docs/TENSORRT_10.3.md, section 4), and this project's
graphs no longer have such inputs. Integer feeds are cast to the engine's dtype where no value
changes (int64 -> int32 when every value fits); the runtime feeds int32 where the manifest says so.

`run(feeds)` copies every input to the GPU and every output back. `kv_loop(carry, fetch)` (the
decode loop, runtime.stage.KVLoop) keeps the carried outputs (present KV) on the GPU: after each
call the buffers of each carried output and its input (present_key_0 / past_key_0) swap names, so
the next call reads the KV where it was written and writes the new KV into the other buffer;
only the fetched outputs (logits, kept positions) and the small per-step inputs cross to the host.
Checked here only against the fake TensorRT + cudart of tests/test_trt_stage.py (which counts the
copies): TensorRT cannot be installed on the development machines, so the loop has not run on a
GPU. It relies on TensorRT asking the output allocator for every data-dependent output on every
execute_async_v3 (and checks it: a carried output TensorRT did not ask for raises EngineError
rather than aliasing the past KV buffer).

TensorRT Python API relied on (docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/
infer/Core/Engine.html and .../ExecutionContext.html; bindings in NVIDIA/TensorRT
python/src/infer/pyCore.cpp):
  ICudaEngine: num_io_tensors, get_tensor_name(i), get_tensor_mode/dtype/location(name),
    is_shape_inference_io(name) (NvInferRuntime.h: an input "whose value is required for
    IExecutionContext::getTensorShape() to return the shape of a network output", i.e. a shape
    tensor: refused here; kept_slots, whose dims alone set S', is not one),
    get_tensor_profile_shape(name, profile_index) -> [min, opt, max], create_execution_context().
  IExecutionContext: set_optimization_profile_async(profile_index, stream_handle) (raises on
    failure), set_input_shape(name, shape), set_tensor_address(name, int), get_tensor_shape(name),
    set_output_allocator(name, allocator), execute_async_v3(stream_handle) -> bool.
  IExecutionContext::setTensorAddress (NvInferRuntime.h): every input needs a non-null address,
    also one only whose dimensions matter (kept_slots; docs/TENSORRT_10.3.md, section 4); an
    output whose getTensorShape has a -1 after all input shapes are set needs an IOutputAllocator;
    setting both an address and an allocator for one output is allowed.
  IOutputAllocator (10.x): reallocate_output(tensor_name, memory, size, alignment) and
    reallocate_output_async(..., stream); the binding calls reallocate_output when
    reallocate_output_async is not overridden; notify_shape(tensor_name, shape) before
    execute_async_v3 returns. Both are implemented here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import EngineError

log = logging.getLogger(__name__)

TRT_HINT = ("TensorRT's Python bindings are not installed: on Jetson they come with JetPack 6 "
            "(`sudo apt install python3-libnvinfer`), on x86 servers `pip install tensorrt`")
CUDA_HINT = "cuda-python is not installed: `pip install cuda-python` (its major version must match CUDA's)"

Shape = tuple[int, ...]
Ranges = Sequence[Mapping[str, tuple[Sequence[int], Sequence[int]]]]  # per profile: name -> (min, max) shape


def trt_version() -> str | None:
    """tensorrt.__version__, or None when TensorRT is not importable."""
    try:
        import tensorrt
    except ImportError:
        return None
    return getattr(tensorrt, "__version__", None)


def _import_trt():
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError(f"{TRT_HINT} ({exc})") from None
    return tensorrt


def _import_cudart():
    try:  # cuda-python >= 12.8 (and 13, which dropped `cuda.cudart`)
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise EngineError(f"{CUDA_HINT} ({exc})") from None
    return cudart


# --- pure helpers -------------------------------------------------------------------------------


def _misfit(bounds: Mapping[str, tuple[Sequence[int], Sequence[int]]], shapes: Mapping[str, Shape]) -> str | None:
    """Why `shapes` do not fit one profile's min/max shapes (None when they fit)."""
    for name, (lo, hi) in bounds.items():
        if name not in shapes:
            continue
        x, lo, hi = tuple(shapes[name]), tuple(lo), tuple(hi)
        if len(x) != len(lo):
            return f"{name} shape {x} has rank {len(x)}, the profile wants {len(lo)} ({lo}..{hi})"
        if any(not a <= v <= b for v, a, b in zip(x, lo, hi)):
            return f"{name} shape {x} is outside {lo}..{hi}"
    return None


def pick_profile(ranges: Ranges, shapes: Mapping[str, Shape], where: str = "engine") -> int:
    """Index of the first optimization profile whose (min, max) shapes hold every input shape
    (same rank, min <= dim <= max); by shapes only, as no input is a shape tensor. Inputs a
    profile does not list are not checked. Raises EngineError naming, per profile, the first
    input that does not fit."""
    if not ranges:
        raise EngineError(f"{where}: the engine has no optimization profiles")
    reasons = []
    for idx, bounds in enumerate(ranges):
        why = _misfit(bounds, shapes)
        if why is None:
            return idx
        reasons.append(f"profile {idx}: {why}")
    raise EngineError(f"{where}: no optimization profile takes these inputs ({'; '.join(reasons)}); "
                      "rebuild the engine with wider profiles or shorten the input")


def _kind(dt: np.dtype) -> str:
    return "i" if dt.kind in "iu" else dt.kind  # b(ool), i(nteger), f(loat), ...


def coerce_input(name: str, value, dtype: np.dtype, where: str = "engine") -> np.ndarray:
    """`value` as a C-contiguous array of the engine's dtype. Within one kind (bool, integer,
    float) the casts numpy calls safe are done (int32 -> int64, float16 -> float32), and integer
    narrowing (int64 -> int32) when every value fits; anything else (float64 -> float32,
    float -> int, bool <-> int) raises EngineError."""
    arr, dtype = np.asarray(value), np.dtype(dtype)
    if arr.dtype != dtype:
        same_kind = _kind(arr.dtype) == _kind(dtype)
        ok = same_kind and np.can_cast(arr.dtype, dtype, "safe")
        if not ok and same_kind and _kind(dtype) == "i":  # integer narrowing: only if every value fits
            info = np.iinfo(dtype)
            ok = arr.size == 0 or info.min <= arr.min() <= arr.max() <= info.max
        if not ok:
            raise EngineError(f"{where}: input {name} is {arr.dtype}, the engine takes {dtype} and the cast "
                              f"could change values; pass it as {dtype}")
    return np.asarray(arr, dtype=dtype, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d


# --- CUDA ---------------------------------------------------------------------------------------


def _cuda(result, what: str):
    """Unpack a cuda-python (err, value...) tuple; raise EngineError naming the CUDA error."""
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if int(err) != 0:
        raise EngineError(f"CUDA error {getattr(err, 'name', err)} while {what}")
    return rest[0] if len(rest) == 1 else rest


class _DeviceBuffers:
    """Device memory per tensor name that only grows (by at least 1.5x, so a decode loop whose KV
    grows one token per step reallocates O(log n) times). Never hands out a null pointer: zero-size
    tensors (empty past KV in prefill) get a small allocation, as TensorRT wants an address."""

    MIN_BYTES = 256  # cudaMalloc memory is 256-byte aligned, TensorRT's requirement

    def __init__(self, cudart):
        self.cudart = cudart
        self.bufs: dict[str, tuple[int, int]] = {}  # name -> (pointer, capacity)

    def ensure(self, name: str, nbytes: int) -> int:
        ptr, cap = self.bufs.get(name, (0, 0))
        if ptr and nbytes <= cap:
            return ptr
        if ptr:
            self.bufs.pop(name)
            _cuda(self.cudart.cudaFree(ptr), f"freeing the buffer of {name}")
        cap = max(int(nbytes), cap + cap // 2, self.MIN_BYTES)
        ptr = _cuda(self.cudart.cudaMalloc(cap), f"allocating {cap} bytes for {name}")
        self.bufs[name] = (int(ptr), cap)
        return int(ptr)

    def ptr(self, name: str) -> int:
        return self.bufs[name][0]

    def swap(self, a: str, b: str) -> None:
        """Exchange the buffers of two names (a carried output becomes the next call's input)."""
        self.bufs[a], self.bufs[b] = self.bufs[b], self.bufs[a]

    def free_all(self) -> None:
        bufs, self.bufs = self.bufs, {}
        for name, (ptr, _) in bufs.items():
            _cuda(self.cudart.cudaFree(ptr), f"freeing the buffer of {name}")


def _make_allocator(trt, buffers: _DeviceBuffers):
    """A trt.IOutputAllocator (the class exists only once tensorrt is imported) backed by `buffers`,
    so outputs with data-dependent shapes (kept_positions, pruned KV) land in the same cache."""

    class OutputAllocator(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)  # required by the pybind11 trampoline
            self.shapes: dict[str, Shape] = {}
            self.asked: set[str] = set()  # outputs TensorRT asked memory for in this execution
            self.error: str | None = None

        def reallocate_output(self, tensor_name, memory, size, alignment):
            self.asked.add(tensor_name)
            try:  # exceptions cannot cross into TensorRT: record, return nullptr (execute fails)
                return buffers.ensure(tensor_name, int(size))
            except Exception as exc:  # noqa: BLE001  any failure: TensorRT gets a null pointer
                self.error = str(exc)
                return 0

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

    return OutputAllocator()


# --- the stage ----------------------------------------------------------------------------------


@dataclass
class _Executed:
    outputs: dict[str, np.ndarray]  # the fetched outputs, on the host
    shapes: dict[str, Shape]  # every output's shape
    placed: set[str]  # outputs written to the buffer under their own name (an address set before
    # execution, or memory the output allocator handed out during it)


class TrtStage:
    """A serialized TensorRT engine (.engine / .plan) with the Stage interface."""

    def __init__(self, path: str | Path, name: str | None = None, device: int = 0):
        self.path, self.device = Path(path), device
        self.name = name or self.path.stem
        self._buffers = self._stream = self._engine = self._runtime = None
        self._contexts: dict[int, object] = {}
        self._loop: TrtKVLoop | None = None  # the KV loop whose values the carried buffers hold
        self._allocated: set[tuple[int, str]] = set()  # (profile, output) with the allocator set
        trt = _import_trt()
        cudart = self._cudart = _import_cudart()
        if not self.path.is_file():
            raise self._error(f"engine file {self.path} does not exist; build it with python -m export.trt")
        _cuda(cudart.cudaSetDevice(device), f"selecting CUDA device {device}")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise self._error(f"TensorRT {trt.__version__} cannot deserialize {self.path} (built by another "
                              "TensorRT or for another GPU?); rebuild it here with python -m export.trt")
        self._stream = _cuda(cudart.cudaStreamCreate(), "creating a CUDA stream")
        self._buffers = _DeviceBuffers(cudart)
        self._allocator = _make_allocator(trt, self._buffers)

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        # What runtime.engine_checks.check_graphs compares with the manifest (-1: a dynamic dim).
        self.input_shapes = {n: [int(d) for d in engine.get_tensor_shape(n)] for n in self.input_names}
        self.output_shapes = {n: [int(d) for d in engine.get_tensor_shape(n)] for n in self.output_names}
        self.dtypes: dict[str, np.dtype] = {}
        for n in names:
            try:
                self.dtypes[n] = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            except (TypeError, KeyError):  # bf16 / fp8 / int4 have no numpy type
                raise self._error(f"tensor {n} is {engine.get_tensor_dtype(n)}, which numpy cannot hold; "
                                  "rebuild the engine with float32/float16 I/O") from None
        self._refuse_shape_inputs(trt)
        self.ranges: list[dict] = []  # per profile: input -> (min shape, max shape)
        for p in range(engine.num_optimization_profiles):
            bounds = [engine.get_tensor_profile_shape(n, p) for n in self.input_names]  # [min, opt, max]
            self.ranges.append({n: (tuple(mm[0]), tuple(mm[2])) for n, mm in zip(self.input_names, bounds)})
        log.info("%s: loaded %s (TensorRT %s, %d profiles)", self.name, self.path.name, trt.__version__,
                 len(self.ranges))

    def _error(self, msg: str) -> EngineError:
        return EngineError(f"{self.name}: {msg}")

    def _refuse_shape_inputs(self, trt) -> None:
        """An input TensorRT made a shape tensor (host memory, values in the profile): built from an
        export older than this version, whose graphs have none (module docstring)."""
        engine = self._engine
        for n in self.input_names:
            if engine.is_shape_inference_io(n) or engine.get_tensor_location(n) == trt.TensorLocation.HOST:
                raise self._error(f"input {n} of {self.path.name} is a shape tensor (an engine built from an older "
                                  "export); re-export and re-build it with this version (python -m export.build, "
                                  "then python -m export.trt)")

    def _context(self, profile: int):
        """The execution context bound to `profile`, created on first use (TensorRT: a context's
        profile must be set before it runs, and a profile serves one context at a time)."""
        ctx = self._contexts.get(profile)
        if ctx is None:
            ctx = self._engine.create_execution_context()
            if ctx is None:
                raise self._error("TensorRT could not create an execution context (out of GPU memory?)")
            try:
                ctx.set_optimization_profile_async(profile, int(self._stream))
            except Exception as exc:  # noqa: BLE001  the binding raises a plain RuntimeError or TypeError
                raise self._error(f"TensorRT could not select profile {profile} ({exc})") from None
            self._contexts[profile] = ctx
        return ctx

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._loop = None  # the buffers a KV loop carries are about to be overwritten
        return self._execute(self._arrays(feeds, ()), {}, self.output_names).outputs

    def kv_loop(self, carry: Mapping[str, str], fetch: Sequence[str]) -> TrtKVLoop:
        """A decode loop keeping the `carry` outputs on the GPU (see the module docstring). Starting
        one (or calling run) ends the previous loop: they share the stage's buffers."""
        return TrtKVLoop(self, carry, fetch)

    def _arrays(self, feeds: dict[str, np.ndarray], carried) -> dict[str, np.ndarray]:
        """The host inputs, checked and coerced; `carried` inputs are on the device already."""
        if self._engine is None:
            raise self._error("the stage is closed")
        missing = [n for n in self.input_names if n not in feeds and n not in carried]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise self._error(f"missing inputs {missing}, unexpected inputs {extra}; the engine takes "
                              f"{self.input_names}")
        return {n: coerce_input(n, v, self.dtypes[n], self.name) for n, v in feeds.items()}

    def _execute(self, arrays: dict[str, np.ndarray], carried: Mapping[str, Shape],
                 fetch: Sequence[str]) -> _Executed:
        """One execution: `arrays` are copied to the device, `carried` inputs are already in their
        device buffers with these shapes; the `fetch` outputs are copied back, the others stay in
        their buffers."""
        profile = pick_profile(self.ranges, {**{n: a.shape for n, a in arrays.items()}, **carried},
                               where=self.name)
        cudart, stream = self._cudart, self._stream
        _cuda(cudart.cudaSetDevice(self.device), f"selecting CUDA device {self.device}")
        ctx = self._context(profile)
        for n, a in arrays.items():
            self._bind_input(ctx, profile, n, a.shape, self._to_device(n, a))
        for n, shape in carried.items():
            self._bind_input(ctx, profile, n, shape, self._buffers.ptr(n))
        static = self._bind_outputs(ctx, profile)
        self._allocator.shapes.clear()
        self._allocator.asked.clear()
        self._allocator.error = None
        if not ctx.execute_async_v3(int(stream)):
            why = f" ({self._allocator.error})" if self._allocator.error else ""
            raise self._error(f"TensorRT execution failed on profile {profile}{why}; see the TensorRT log")
        shapes = {}
        for n in self.output_names:
            shape = static[n] if n in static else self._allocator.shapes.get(n)
            if shape is None:
                raise self._error(f"TensorRT did not report the shape of output {n}")
            shapes[n] = shape
        outputs = {n: self._to_host(n, shapes[n]) for n in fetch}
        _cuda(cudart.cudaStreamSynchronize(stream), f"running {self.name}")
        return _Executed(outputs, shapes, set(static) | self._allocator.asked)

    def _to_device(self, name: str, a: np.ndarray) -> int:
        """The address TensorRT reads input `name` from: a device buffer holding a copy of `a`
        (never null, also for an empty or a dims-only input)."""
        ptr = self._buffers.ensure(name, a.nbytes)
        if a.nbytes:
            _cuda(self._cudart.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes,
                                               self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
                  f"copying {name} to the GPU")
        return ptr

    def _to_host(self, name: str, shape: Shape) -> np.ndarray:
        out = np.empty(shape, self.dtypes[name])
        if out.nbytes:
            _cuda(self._cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers.ptr(name), out.nbytes,
                                               self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                  f"copying {name} back")
        return out

    def _bind_input(self, ctx, profile: int, name: str, shape: Shape, ptr: int) -> None:
        if tuple(ctx.get_tensor_shape(name)) != tuple(shape) and not ctx.set_input_shape(name, shape):
            raise self._error(f"TensorRT rejected shape {tuple(shape)} for {name} (profile {profile})")
        if not ctx.set_tensor_address(name, ptr):
            raise self._error(f"TensorRT rejected the address of {name}")

    def _bind_outputs(self, ctx, profile: int) -> dict[str, Shape]:
        """Addresses for the outputs whose shapes are known now (after the input shapes are set),
        the output allocator for the data-dependent ones. Returns the known shapes."""
        static: dict[str, Shape] = {}
        for n in self.output_names:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(n))
            if all(d >= 0 for d in shape):
                static[n] = shape
                nbytes = math.prod(shape) * self.dtypes[n].itemsize
                if not ctx.set_tensor_address(n, self._buffers.ensure(n, nbytes)):
                    raise self._error(f"TensorRT rejected the address of {n}")
            elif (profile, n) not in self._allocated:  # data-dependent: TensorRT asks the allocator
                if not ctx.set_output_allocator(n, self._allocator):
                    raise self._error(f"TensorRT refused an output allocator for {n}")
                self._allocated.add((profile, n))
        return static

    def close(self) -> None:
        """Free the contexts, the engine, the device buffers and the stream (idempotent)."""
        stream, self._stream = self._stream, None
        try:
            if stream is not None:
                _cuda(self._cudart.cudaStreamSynchronize(stream), f"finishing {self.name}'s work")
        finally:
            self._contexts, self._allocated, self._loop = {}, set(), None
            self._engine = self._runtime = None  # contexts, then engine, then runtime
            try:
                if self._buffers is not None:
                    self._buffers.free_all()
            finally:
                if stream is not None:
                    _cuda(self._cudart.cudaStreamDestroy(stream), "destroying the CUDA stream")

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110  interpreter shutdown, CUDA context already gone
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TrtKVLoop:
    """A decode loop on a TrtStage (runtime.stage.KVLoop): the `carry` outputs stay in device
    buffers that become the next call's inputs (buffer swap, no host round trip); only the `fetch`
    outputs are copied to the host. Not verified on real TensorRT (see the module docstring)."""

    bound = True

    def __init__(self, stage: TrtStage, carry: Mapping[str, str], fetch: Sequence[str]):
        from runtime.stage import check_carry

        check_carry(stage, carry, fetch)
        for out, inp in carry.items():
            if stage.dtypes[out] != stage.dtypes[inp]:
                raise stage._error(f"cannot carry {out} ({stage.dtypes[out]}) into {inp} ({stage.dtypes[inp]}) "
                                   "on the device")
        self.stage, self.carry, self.fetch = stage, dict(carry), tuple(fetch)
        self.shapes: dict[str, Shape] = {}  # carried input -> shape of the value in its buffer
        stage._loop = self

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stage = self.stage
        if stage._engine is not None and stage._loop is not self:
            raise stage._error("the device buffers this KV loop carries were reused by another run or loop (or "
                               "its last step failed); start a new loop")
        carried = {n: s for n, s in self.shapes.items() if n not in feeds}
        stage._loop = None  # until the buffers are swapped below
        done = stage._execute(stage._arrays(feeds, carried), carried, self.fetch)
        unplaced = [n for n in self.carry if n not in done.placed]
        if unplaced:  # TensorRT wrote them where it wrote them last time: now a past KV buffer
            raise stage._error(f"TensorRT did not ask the output allocator for {unplaced}, so the KV cannot be "
                               "carried on the device; load the engine with kv_binding=False")
        for out, inp in self.carry.items():
            stage._buffers.swap(out, inp)
            self.shapes[inp] = done.shapes[out]
        stage._loop = self
        return done.outputs

    def kv_bytes(self) -> int:
        dtypes = self.stage.dtypes
        return sum(math.prod(shape) * dtypes[n].itemsize for n, shape in self.shapes.items())

"""runtime/trt_stage.py: profile choice (by shapes only) and input coercion (pure), the missing-package
errors, the whole run() path against a fake `tensorrt` + fake cudart (host memory stands in for device
memory, so the copies, addresses, profiles and output allocator are checked byte for byte), the
refusal of an engine with a shape-tensor input, the KV loop (carried outputs stay in device buffers:
the fake cudart counts every host<->device copy), and, where TensorRT and a GPU exist, real
two-profile engines compared with onnxruntime. TensorRT cannot be installed on the development
machines: there the real-engine tests skip, and the KV loop is checked against the fake only."""

from __future__ import annotations

import ctypes
import enum
import sys
import types
import weakref

import numpy as np
import pytest

from runtime import trt_stage
from runtime.errors import EngineError
from runtime.trt_stage import TrtStage, coerce_input, pick_profile

# --- pick_profile: the decoder's two profiles -----------------------------------------------------

D, H, HD, MAX_SEQ, MAX_CTX = 64, 2, 16, 2048, 4096


def decoder_ranges():
    """Prefill (0): seq and kept 1..2048, both past groups 0..0; decode (1): seq = kept = 1, past
    1..4096. The int32 span/quota scalars are 0-d in both."""
    def profile(seq, kept, past_full, past_kept):
        return {
            "inputs_embeds": ((1, seq[0], D), (1, seq[1], D)),
            "position_ids": ((1, seq[0]), (1, seq[1])),
            "span_start": ((), ()), "span_len": ((), ()), "quota": ((), ()),
            "kept_slots": ((1, kept[0]), (1, kept[1])),  # S' = its last dim
            "past_key_0": ((1, H, past_full[0], HD), (1, H, past_full[1], HD)),  # layers < K
            "past_key_3": ((1, H, past_kept[0], HD), (1, H, past_kept[1], HD)),  # layers >= K (pruned)
        }
    return [profile((1, MAX_SEQ), (1, MAX_SEQ), (0, 0), (0, 0)), profile((1, 1), (1, 1), (1, MAX_CTX), (1, MAX_CTX))]


def decoder_shapes(seq, past_full, past_kept, kept=None):
    return {"inputs_embeds": (1, seq, D), "position_ids": (1, seq), "span_start": (), "span_len": (), "quota": (),
            "kept_slots": (1, seq if kept is None else kept), "past_key_0": (1, H, past_full, HD),
            "past_key_3": (1, H, past_kept, HD)}


def test_prefill_picks_profile_0_and_decode_profile_1():
    ranges = decoder_ranges()
    assert pick_profile(ranges, decoder_shapes(600, 0, 0)) == 0  # nothing pruned: S' = S
    assert pick_profile(ranges, decoder_shapes(600, 0, 0, kept=92)) == 0  # 576 vision tokens -> 68 kept
    assert pick_profile(ranges, decoder_shapes(1, 0, 0)) == 0  # a one-token prompt is still prefill
    assert pick_profile(ranges, decoder_shapes(1, 600, 70)) == 1  # the two KV groups differ in length
    assert pick_profile(ranges, decoder_shapes(1, MAX_CTX, MAX_CTX)) == 1


def test_no_profile_fits_names_the_input():
    with pytest.raises(EngineError) as e:
        pick_profile(decoder_ranges(), decoder_shapes(MAX_SEQ + 1, 0, 0), where="decoder")
    msg = str(e.value)
    assert msg.startswith("decoder:") and "inputs_embeds" in msg and str((1, MAX_SEQ + 1, D)) in msg
    assert str((1, 1, D)) in msg and str((1, MAX_SEQ, D)) in msg  # the allowed range is shown
    with pytest.raises(EngineError, match="past_key_0"):  # decode with two new tokens: neither profile
        pick_profile(decoder_ranges(), decoder_shapes(2, 10, 10))
    with pytest.raises(EngineError, match="past_key_3"):  # past beyond max_context
        pick_profile(decoder_ranges(), decoder_shapes(1, 10, MAX_CTX + 1))
    with pytest.raises(EngineError, match=r"profile 1: kept_slots shape \(1, 2\) is outside \(1, 1\)\.\.\(1, 1\)"):
        pick_profile(decoder_ranges(), decoder_shapes(1, 10, 10, kept=2))  # a decode step never prunes


def test_rank_mismatch_raises():
    shapes = decoder_shapes(5, 0, 0)
    shapes["past_key_0"] = (1, H, HD)
    with pytest.raises(EngineError, match="rank 3"):
        pick_profile(decoder_ranges(), shapes)


def test_scalars_are_shapes_not_values():
    """A 0-d input is matched by its (empty) shape like any other input; a 1-element array where
    the profile wants a scalar is a rank mismatch, not a value to look at."""
    assert pick_profile(decoder_ranges(), decoder_shapes(1, 600, 70)) == 1
    shapes = {**decoder_shapes(600, 0, 0, kept=92), "quota": (1,)}
    with pytest.raises(EngineError, match=r"profile 0: quota shape \(1,\) has rank 1, the profile wants 0"):
        pick_profile(decoder_ranges(), shapes)


def test_pick_profile_edge_cases():
    with pytest.raises(EngineError, match="no optimization profiles"):
        pick_profile([], {"x": (1,)})
    assert pick_profile([{"x": ((), ())}], {"x": ()}) == 0  # 0-d inputs
    assert pick_profile([{"x": ((1,), (4,))}], {"other": (9,)}) == 0  # unlisted inputs are not checked


def test_coerce_input():
    a = coerce_input("ids", np.array([[1, 2]], np.int32), np.int64)
    assert a.dtype == np.int64 and a.flags.c_contiguous
    assert coerce_input("ids", np.array([1, 2], np.int64), np.int32).dtype == np.int32  # values fit
    assert coerce_input("x", np.ones((2, 3), np.float16), np.float32).dtype == np.float32
    assert coerce_input("x", np.ones((3, 2), np.float32).T, np.float32).flags.c_contiguous
    assert coerce_input("e", np.zeros((0, 4), np.int64), np.int32).shape == (0, 4)
    assert coerce_input("s", 5, np.int64).shape == ()
    for value, dtype in [(np.array([2**40]), np.int32), (np.ones(2, np.float64), np.float32),
                         (np.ones(2, np.float32), np.int64), (np.ones(2, bool), np.int32),
                         (np.ones(2, np.int32), np.bool_)]:
        with pytest.raises(EngineError, match="the engine takes"):
            coerce_input("t", value, dtype, "decoder")


# --- missing packages -------------------------------------------------------------------------------


def test_missing_tensorrt_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    assert trt_stage.trt_version() is None
    with pytest.raises(EngineError) as e:
        TrtStage(tmp_path / "decoder.engine")
    msg = str(e.value)
    assert "JetPack" in msg and "pip install tensorrt" in msg and "\n" not in msg


def test_missing_cuda_python_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt())
    for mod in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, mod, None)
    assert trt_stage.trt_version() == "10.3.0-fake"
    with pytest.raises(EngineError, match="pip install cuda-python"):
        TrtStage(tmp_path / "decoder.engine")


# --- a fake TensorRT + CUDA ----------------------------------------------------------------------------
# The fake engine, shaped like the decoder's interface: inputs x [1, S, 4] f32, past [1, P, 4] f32,
# k int32 0-d (data, like span_start / quota), slots int32 [1, N] (values unused, only its last dim
# matters, like kept_slots); all on the device. Outputs y = concat(past, x) [1, P+S, 4], r =
# arange(N) + k [N] int32 (its length from slots' dim, known once the input shapes are set), and
# kept = nonzero(x[0, :, 0] > 0) [1, -1] int32 (data-dependent: needs the output allocator).
# Profile 0 (prefill): S 1..8, P 0..0, N 1..8; profile 1 (decode): S 1, P 1..16, N 1..1.
# IO_KV adds a second, ragged KV pair like the decoder's layers >= K: past2 [1, P2, 4] and
# y2 = concat(past2, x[:, x[0, :, 0] > 0]) (pruned, data-dependent: from the output allocator).
# An io entry with location "host" is a shape tensor (is_shape_inference_io): what TrtStage refuses.

OK = 0


class CudaError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


class FakeCudart:
    """Device memory = ctypes buffers; every copy checks it stays inside a live allocation."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    cudaError_t = CudaError

    def __init__(self):
        self.live: dict[int, ctypes.Array] = {}
        self.mallocs = 0
        self.fail_malloc = False
        self.stream_destroyed = False
        self.copies: list[tuple[str, int]] = []  # ("h2d" | "d2h", bytes), in order

    def owns(self, ptr: int, nbytes: int) -> bool:
        return any(p <= ptr and ptr + nbytes <= p + len(b) for p, b in self.live.items())

    def cudaSetDevice(self, device):
        return (CudaError.cudaSuccess,)

    def cudaStreamCreate(self):
        return CudaError.cudaSuccess, 4242

    def cudaStreamSynchronize(self, stream):
        assert stream == 4242
        return (CudaError.cudaSuccess,)

    def cudaStreamDestroy(self, stream):
        self.stream_destroyed = True
        return (CudaError.cudaSuccess,)

    def cudaMalloc(self, nbytes):
        if self.fail_malloc:
            return CudaError.cudaErrorMemoryAllocation, 0
        buf = ctypes.create_string_buffer(nbytes)
        self.live[ctypes.addressof(buf)] = buf
        self.mallocs += 1
        return CudaError.cudaSuccess, ctypes.addressof(buf)

    def cudaFree(self, ptr):
        del self.live[ptr]
        return (CudaError.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        assert isinstance(dst, int) and isinstance(src, int) and stream == 4242
        assert self.owns(dst if kind == 1 else src, nbytes), "copy outside a device allocation"
        self.copies.append(("h2d" if kind == 1 else "d2h", nbytes))
        ctypes.memmove(dst, src, nbytes)
        return (CudaError.cudaSuccess,)


def read(ptr, shape, dtype):
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype).reshape(shape).copy()


IO = {  # name: (mode, dtype, engine-level shape, location)
    "x": ("in", "float32", (1, -1, 4), "device"),
    "past": ("in", "float32", (1, -1, 4), "device"),
    "k": ("in", "int32", (), "device"),
    "slots": ("in", "int32", (1, -1), "device"),
    "y": ("out", "float32", (1, -1, 4), "device"),
    "r": ("out", "int32", (-1,), "device"),
    "kept": ("out", "int32", (1, -1), "device"),
}
IO_KV = {**IO, "past2": ("in", "float32", (1, -1, 4), "device"), "y2": ("out", "float32", (1, -1, 4), "device")}
PROFILES = [
    {"x": ((1, 1, 4), (1, 4, 4), (1, 8, 4)), "past": ((1, 0, 4), (1, 0, 4), (1, 0, 4)), "k": ((), (), ()),
     "slots": ((1, 1), (1, 4), (1, 8)), "past2": ((1, 0, 4), (1, 0, 4), (1, 0, 4))},
    {"x": ((1, 1, 4), (1, 1, 4), (1, 1, 4)), "past": ((1, 1, 4), (1, 8, 4), (1, 16, 4)), "k": ((), (), ()),
     "slots": ((1, 1), (1, 1), (1, 1)), "past2": ((1, 0, 4), (1, 8, 4), (1, 16, 4))},
]


class FakeContext:
    def __init__(self, engine):
        self.engine, self.profile = engine, None
        self.shapes, self.addresses, self.allocators = {}, {}, {}
        self.handed: dict[str, int] = {}  # output -> the memory the allocator last returned

    def set_optimization_profile_async(self, idx, stream):
        assert isinstance(idx, int) and isinstance(stream, int)
        if any(c is not self and c.profile == idx for c in self.engine.live):
            raise RuntimeError("Error in set optimization profile async.")  # one context per profile
        self.profile = idx
        self.engine.profile_sets.append(idx)
        return True

    def set_input_shape(self, name, shape):
        assert self.profile is not None, "profile must be set first"
        lo, _, hi = PROFILES[self.profile][name]
        if len(shape) != len(lo) or not all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        io = self.engine.io
        if io[name][0] == "in":
            return self.shapes.get(name, io[name][2])
        if name == "y":
            if "x" not in self.shapes or "past" not in self.shapes:
                return (1, -1, 4)
            return (1, self.shapes["past"][1] + self.shapes["x"][1], 4)
        if name == "r":  # from an input's dims: known once they are set, whatever the values
            return (self.shapes["slots"][1],) if "slots" in self.shapes else (-1,)
        return (1, -1)

    def set_tensor_address(self, name, ptr):
        assert isinstance(ptr, int) and ptr != 0
        self.addresses[name] = ptr
        return True

    def set_output_allocator(self, name, allocator):
        self.allocators[name] = allocator
        self.engine.allocator_sets.append((self.profile, name))
        return True

    def execute_async_v3(self, stream):
        assert isinstance(stream, int) and self.profile is not None
        cuda = self.engine.cudart
        if self.engine.fail_execute:
            return False
        x = read(self.addresses["x"], self.shapes["x"], np.float32)
        assert cuda.owns(self.addresses["past"], 1), "empty inputs still need a device address"
        past = read(self.addresses["past"], self.shapes["past"], np.float32)
        assert cuda.owns(self.addresses["k"], 4), "a 0-d input is an execution tensor in device memory"
        assert cuda.owns(self.addresses["slots"], 1), "a dims-only input still needs a device address"
        k = int(read(self.addresses["k"], (), np.int32))
        outs = {"y": np.concatenate([past, x], axis=1), "r": np.arange(self.shapes["slots"][1], dtype=np.int32) + k,
                "kept": np.nonzero(x[0, :, 0] > 0)[0].astype(np.int32)[None]}
        if "past2" in self.engine.io:
            past2 = read(self.addresses["past2"], self.shapes["past2"], np.float32)
            outs["y2"] = np.concatenate([past2, x[:, x[0, :, 0] > 0]], axis=1)
        for name, value in outs.items():
            if -1 in self.get_tensor_shape(name):
                alloc = self.allocators[name]
                if self.engine.reuse_output_memory and name in self.handed:
                    ptr = self.handed[name]  # what a TensorRT that skipped the allocator would do
                else:
                    ptr = alloc.reallocate_output_async(name, self.handed.get(name, 0), value.nbytes, 256, stream)
                if not ptr:
                    return False
                self.handed[name] = ptr
                alloc.notify_shape(name, value.shape)
            else:
                ptr = self.addresses[name]
            assert cuda.owns(ptr, value.nbytes)
            ctypes.memmove(ptr, value.ctypes.data, value.nbytes)
        return True


class FakeEngine:
    num_optimization_profiles = len(PROFILES)

    def __init__(self, cudart, io=IO):
        self.cudart, self.io = cudart, io
        self.names = list(io)
        self.num_io_tensors = len(self.names)
        self.live: weakref.WeakSet[FakeContext] = weakref.WeakSet()  # contexts not yet destroyed
        self.created = 0
        self.profile_sets: list[int] = []
        self.allocator_sets: list[tuple[int, str]] = []
        self.fail_execute = False
        self.reuse_output_memory = False

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return FakeTrt.TensorIOMode.INPUT if self.io[name][0] == "in" else FakeTrt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def get_tensor_location(self, name):
        return FakeTrt.TensorLocation.HOST if self.io[name][3] == "host" else FakeTrt.TensorLocation.DEVICE

    def is_shape_inference_io(self, name):
        return self.io[name][3] == "host"

    def get_tensor_shape(self, name):
        return self.io[name][2]

    def get_tensor_profile_shape(self, name, profile_index):
        assert isinstance(name, str) and isinstance(profile_index, int)
        return [list(s) for s in PROFILES[profile_index][name]]

    def create_execution_context(self):
        ctx = FakeContext(self)
        self.live.add(ctx)
        self.created += 1
        return ctx


class FakeTrt:
    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class TensorLocation(enum.Enum):
        DEVICE = 0
        HOST = 1


def make_fake_trt(engine=None):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0-fake"
    trt.TensorIOMode, trt.TensorLocation = FakeTrt.TensorIOMode, FakeTrt.TensorLocation

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return None if data == b"corrupt" else engine

    class IOutputAllocator:
        def __init__(self):
            pass

    def nptype(dt):
        if dt == "bfloat16":
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return np.dtype(dt).type

    trt.Logger, trt.Runtime, trt.IOutputAllocator, trt.nptype = Logger, Runtime, IOutputAllocator, nptype
    return trt


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """(stage factory, fake cudart, fake engine) with `tensorrt` and cuda-python faked."""
    cudart = FakeCudart()
    engine = FakeEngine(cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(engine))
    monkeypatch.setattr(trt_stage, "_import_cudart", lambda: cudart)
    path = tmp_path / "toy.engine"
    path.write_bytes(b"plan")
    return (lambda: TrtStage(path, name="toy")), cudart, engine


def feeds(seq, past, k, slots, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((1, seq, 4)).astype(np.float32),
            "past": rng.standard_normal((1, past, 4)).astype(np.float32), "k": np.array(k, np.int32),
            "slots": np.zeros((1, slots), np.int32)}


def expected(f):
    x = f["x"]
    return {"y": np.concatenate([f["past"], x], axis=1), "r": np.arange(f["slots"].shape[1]) + int(f["k"]),
            "kept": np.nonzero(x[0, :, 0] > 0)[0][None]}


def check(out, f):
    want = expected(f)
    assert set(out) == set(want)
    for name, value in want.items():
        assert out[name].shape == value.shape, name
        np.testing.assert_array_equal(out[name], value.astype(out[name].dtype), err_msg=name)


def test_fake_engine_metadata(fake):
    make, _, _ = fake
    stage = make()
    assert stage.name == "toy" and stage.input_names == ["x", "past", "k", "slots"]
    assert stage.output_names == ["y", "r", "kept"]
    assert stage.ranges[0]["past"] == ((1, 0, 4), (1, 0, 4))
    assert stage.ranges[1]["x"] == ((1, 1, 4), (1, 1, 4))
    assert stage.ranges[0]["slots"] == ((1, 1), (1, 8)) and stage.ranges[1]["slots"] == ((1, 1), (1, 1))
    assert stage.ranges[0]["k"] == stage.ranges[1]["k"] == ((), ())  # a 0-d input: a shape like any other
    assert stage.dtypes["k"] == stage.dtypes["r"] == np.int32


def test_engine_with_a_shape_tensor_input_is_refused(fake):
    """An engine in which TensorRT made an input a shape tensor (an older export's int64 scalar that
    set a shape) is refused at load, with one line saying what to do."""
    make, _, engine = fake
    engine.io = {**IO, "k": ("in", "int64", (), "host")}
    with pytest.raises(EngineError) as e:
        make()
    assert str(e.value) == ("toy: input k of toy.engine is a shape tensor (an engine built from an older export); "
                            "re-export and re-build it with this version (python -m export.build, then "
                            "python -m export.trt)")
    assert engine.created == 0  # refused before any execution context


def test_prefill_then_decode_matches_numpy(fake):
    make, cudart, engine = fake
    stage = make()
    f = feeds(6, 0, 5, 4)  # prefill: empty past (zero-size input), slots [1, 4] -> r = 5 + arange(4)
    out = stage.run(f)
    check(out, f)
    assert out["r"].tolist() == [5, 6, 7, 8]
    past = out["y"]
    for step in range(10):  # decode: past grows by one each step, slots [1, 1], k is data
        f = {"x": np.full((1, 1, 4), (-1.0) ** step, np.float32), "past": past, "k": np.array(step, np.int32),
             "slots": np.zeros((1, 1), np.int32)}
        out = stage.run(f)
        check(out, f)
        past = out["y"]
    assert past.shape == (1, 16, 4)
    assert engine.created == 2 and engine.profile_sets == [0, 1]  # one context per profile, set once
    assert engine.allocator_sets == [(0, "kept"), (1, "kept")]  # only the data-dependent output, once
    assert cudart.mallocs < 20  # grow-only buffers: not one allocation per step per tensor
    stage.run(feeds(3, 0, 2, 2, seed=1))  # back to prefill: the profile-0 context is reused
    assert engine.created == 2 and engine.profile_sets == [0, 1]


def test_run_checks_names_dtypes_and_profiles(fake):
    make, _, _ = fake
    stage = make()
    f = feeds(2, 0, 1, 2)
    with pytest.raises(EngineError, match=r"missing inputs \['k'\], unexpected inputs \['z'\]"):
        stage.run({"x": f["x"], "past": f["past"], "slots": f["slots"], "z": f["k"]})
    with pytest.raises(EngineError, match="input x is float64"):
        stage.run({**f, "x": f["x"].astype(np.float64)})
    out = stage.run({**f, "k": np.array(1, np.int64), "slots": np.zeros((1, 2), np.int64)})  # narrowed: fits
    check(out, f)
    with pytest.raises(EngineError, match="toy: input k is int64, the engine takes int32 and the cast could change"):
        stage.run({**f, "k": np.array(2**40, np.int64)})
    with pytest.raises(EngineError, match=r"profile 0: x shape \(1, 9, 4\)"):
        stage.run(feeds(9, 0, 1, 1))
    with pytest.raises(EngineError, match=r"profile 0: past shape \(1, 4, 4\).*; profile 1: slots shape "
                                          r"\(1, 3\) is outside \(1, 1\)\.\.\(1, 1\)"):
        stage.run(feeds(1, 4, 0, 3))  # a decode step never has more than one slot
    with pytest.raises(EngineError, match=r"k shape \(1,\) has rank 1, the profile wants 0"):
        stage.run({**f, "k": np.array([1], np.int32)})


def test_execute_failure_and_allocation_failure(fake):
    make, cudart, engine = fake
    stage = make()
    engine.fail_execute = True
    with pytest.raises(EngineError, match="TensorRT execution failed on profile 0"):
        stage.run(feeds(2, 0, 1, 1))
    engine.fail_execute = False
    cudart.fail_malloc = True
    with pytest.raises(EngineError, match="cudaErrorMemoryAllocation while allocating"):
        stage.run(feeds(3, 0, 1, 1))


def test_output_allocator_failure_is_reported(fake, monkeypatch):
    make, _, _ = fake
    stage = make()
    ensure = stage._buffers.ensure

    def failing(name, nbytes):  # the allocator's request for the data-dependent output fails
        if name == "kept":
            raise EngineError("CUDA error cudaErrorMemoryAllocation while allocating 64 bytes for kept")
        return ensure(name, nbytes)

    monkeypatch.setattr(stage._buffers, "ensure", failing)
    with pytest.raises(EngineError, match=r"execution failed on profile 0 \(CUDA error cudaErrorMemoryAlloc"):
        stage.run(feeds(3, 0, 1, 1))


def test_close_frees_everything(fake):
    make, cudart, _ = fake
    stage = make()
    stage.run(feeds(4, 0, 2, 2))
    assert cudart.live
    stage.close()
    assert not cudart.live and cudart.stream_destroyed
    stage.close()  # idempotent
    with pytest.raises(EngineError, match="closed"):
        stage.run(feeds(4, 0, 2, 2))
    with make() as s2:
        s2.run(feeds(1, 0, 0, 1))
    assert not cudart.live


def test_load_errors(fake, tmp_path):
    make, _, engine = fake
    with pytest.raises(EngineError, match="does not exist"):
        TrtStage(tmp_path / "missing.engine")
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"corrupt")
    with pytest.raises(EngineError, match="cannot deserialize"):
        TrtStage(bad)
    engine.io = {**IO, "y": ("out", "bfloat16", (1, -1, 4), "device")}
    with pytest.raises(EngineError, match="tensor y is bfloat16"):
        make()


# --- the KV loop: carried outputs stay in device buffers ------------------------------------------------


@pytest.fixture
def fake_kv(monkeypatch, tmp_path):
    """Like `fake`, with the second (ragged, allocator-backed) KV pair of IO_KV."""
    cudart = FakeCudart()
    engine = FakeEngine(cudart, IO_KV)
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(engine))
    monkeypatch.setattr(trt_stage, "_import_cudart", lambda: cudart)
    path = tmp_path / "toy.engine"
    path.write_bytes(b"plan")
    return TrtStage(path, name="toy"), cudart, engine


CARRY = {"y": "past", "y2": "past2"}  # like present_key_0 -> past_key_0 (full) and ..._3 (pruned)


def kv_steps(n, seed=0):
    """Prefill feeds (S = 6, empty pasts, k = 5, 4 slots), then n decode feeds (x, k = t, one slot:
    the pasts are carried)."""
    rng = np.random.default_rng(seed)
    empty = np.zeros((1, 0, 4), np.float32)
    first = {"x": rng.standard_normal((1, 6, 4)).astype(np.float32), "past": empty, "past2": empty,
             "k": np.array(5, np.int32), "slots": np.zeros((1, 4), np.int32)}
    xs = [np.full((1, 1, 4), (-1.0) ** t * (t + 1), np.float32) for t in range(n)]
    return [first] + [{"x": x, "k": np.array(t, np.int32), "slots": np.zeros((1, 1), np.int32)}
                      for t, x in enumerate(xs)]


def kv_reference(steps):
    """The fake engine in numpy, one step after another: the fetched outputs and the final pasts."""
    past, past2, fetched = steps[0]["past"], steps[0]["past2"], []
    for f in steps:
        x = f["x"]
        fetched.append({"r": np.arange(f["slots"].shape[1]) + int(f["k"]), "kept": np.nonzero(x[0, :, 0] > 0)[0][None]})
        past, past2 = np.concatenate([past, x], axis=1), np.concatenate([past2, x[:, x[0, :, 0] > 0]], axis=1)
    return fetched, past, past2


def test_kv_loop_keeps_the_kv_on_the_device(fake_kv):
    stage, cudart, _ = fake_kv
    steps = kv_steps(10)
    want, past, past2 = kv_reference(steps)
    loop = stage.kv_loop(CARRY, ("r", "kept"))
    assert loop.bound
    per_step = []
    for f, w in zip(steps, want):
        cudart.copies.clear()
        out = loop.run(f)
        per_step.append(list(cudart.copies))
        assert set(out) == {"r", "kept"}
        for name in w:
            np.testing.assert_array_equal(out[name], w[name], err_msg=name)
    # The carried KV, read where it lies: the buffers now named past / past2, with the loop's shapes.
    assert loop.shapes == {"past": past.shape, "past2": past2.shape}
    assert past.shape == (1, 16, 4) and past2.shape == (1, want[0]["kept"].size + 5, 4)  # 5 decode x > 0
    np.testing.assert_array_equal(read(stage._buffers.ptr("past"), past.shape, np.float32), past)
    np.testing.assert_array_equal(read(stage._buffers.ptr("past2"), past2.shape, np.float32), past2)
    assert loop.kv_bytes() == past.nbytes + past2.nbytes
    # Prefill: x, k and the 4 slots in (the empty pasts copy nothing), r and kept out. Each decode
    # step: the 16 bytes of x, k and the one slot in, r out and kept when x > 0 (4 bytes each),
    # nothing else: no KV crosses, whatever its length.
    assert per_step[0] == [("h2d", 6 * 16), ("h2d", 4), ("h2d", 4 * 4), ("d2h", 4 * 4),
                           ("d2h", want[0]["kept"].size * 4)]
    for t, copies in enumerate(per_step[1:]):
        assert copies == [("h2d", 16), ("h2d", 4), ("h2d", 4), ("d2h", 4)] + ([("d2h", 4)] if t % 2 == 0 else []), t
    assert cudart.mallocs < 20  # grow-only, swapped buffers: not one allocation per step


def test_numpy_round_trip_copies_the_kv_every_step(fake_kv):
    """The same loop through run() (NumpyKVLoop, the kv_binding=False path): the same outputs, and
    each step copies both pasts in and both presents back."""
    from runtime.stage import kv_loop

    stage, cudart, _ = fake_kv
    steps = kv_steps(4)
    want, past, past2 = kv_reference(steps)
    loop = kv_loop(stage, CARRY, ("r", "kept"), bound=False)
    assert not loop.bound
    for t, (f, w) in enumerate(zip(steps, want)):
        kv_in = [16 * v.shape[1] for v in loop.carried.values()]  # bytes of each carried past
        cudart.copies.clear()
        out = loop.run(f)
        for name in w:
            np.testing.assert_array_equal(out[name], w[name], err_msg=name)
        if t:
            kv_out = [16 * v.shape[1] for v in loop.carried.values()]
            h2d = sorted(n for k, n in cudart.copies if k == "h2d")
            d2h = sorted(n for k, n in cudart.copies if k == "d2h")
            assert h2d == sorted([16, 4, 4] + [n for n in kv_in if n]), t  # x, k, slots and both pasts in
            assert set(kv_out) <= set(d2h) and sum(d2h) >= sum(kv_out), t  # both presents back
    np.testing.assert_array_equal(loop.carried["past"], past)
    np.testing.assert_array_equal(loop.carried["past2"], past2)


def test_kv_loop_is_ended_by_another_run_or_loop(fake_kv):
    stage, _, _ = fake_kv
    steps = kv_steps(2)
    loop = stage.kv_loop(CARRY, ("kept",))
    loop.run(steps[0])
    loop.run(steps[1])
    stage.run({**steps[0], "k": np.array(1, np.int32)})  # overwrites the buffers the loop carries
    with pytest.raises(EngineError, match="reused by another run or loop"):
        loop.run(steps[2])
    second = stage.kv_loop(CARRY, ("kept",))
    second.run(steps[0])
    with pytest.raises(EngineError, match="reused by another run or loop"):
        loop.run(steps[1])
    second.run(steps[1])  # the newest loop goes on
    stage.close()
    with pytest.raises(EngineError, match="closed"):
        second.run(steps[2])


def test_kv_loop_refuses_output_memory_the_allocator_did_not_hand_out(fake_kv):
    """A TensorRT writing a data-dependent output where it wrote it last time (without asking the
    allocator) would write the new KV into the buffer now holding the past KV: refused."""
    stage, _, engine = fake_kv
    steps = kv_steps(2)
    loop = stage.kv_loop(CARRY, ("kept",))
    loop.run(steps[0])
    loop.run(steps[1])  # the decode profile's first call: its allocator hands out y2's memory
    engine.reuse_output_memory = True
    with pytest.raises(EngineError, match=r"did not ask the output allocator for \['y2'\].*kv_binding=False"):
        loop.run(steps[2])


def test_kv_loop_checks_names(fake_kv):
    stage, _, _ = fake_kv
    with pytest.raises(EngineError, match=r"\['nope'\] are not outputs / inputs"):
        stage.kv_loop({"y": "nope"}, ("kept",))
    with pytest.raises(EngineError, match=r"cannot carry r \(int32\) into past \(float32\) on the device"):
        stage.kv_loop({"r": "past"}, ("kept",))
    loop = stage.kv_loop(CARRY, ("kept",))
    with pytest.raises(EngineError, match=r"missing inputs \['past2'\]"):
        loop.run({k: v for k, v in kv_steps(0)[0].items() if k != "past2"})


# --- real TensorRT (needs TensorRT, cuda-python and a GPU) -------------------------------------------


def _real_stage_env():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (Jetson / GPU machines only)")
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    try:
        trt_stage._import_cudart()
    except EngineError as e:
        pytest.skip(str(e))


def _onnx_model(path, inputs: str):
    """A toy graph: y = concat(past, x), kept = nonzero(x > 0) (data-dependent). `inputs`:
    "plain"; "slots": also k int32 0-d (data) and slots int32 [1, N] (dims only), r = arange(N) + k
    with N from Shape(slots), as the decoder takes S' from kept_slots; "shape-tensor": also n int64
    0-d, r = Range(0, n) (n's value sets r's shape: TensorRT makes n a shape tensor)."""
    from onnx import TensorProto, helper, save

    f32, i32, i64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    info = helper.make_tensor_value_info
    inputs_ = [info("x", f32, [1, "S", 4]), info("past", f32, [1, "P", 4])]
    outputs = [info("y", f32, [1, "T", 4]), info("kept", i64, [3, "N"])]
    nodes = [helper.make_node("Concat", ["past", "x"], ["y"], axis=1),
             helper.make_node("Greater", ["x", "zero"], ["mask"]),
             helper.make_node("NonZero", ["mask"], ["kept"])]  # data-dependent shape
    inits = [helper.make_tensor("zero", f32, [], [0.0]), helper.make_tensor("start", i64, [], [0]),
             helper.make_tensor("delta", i64, [], [1]), helper.make_tensor("one", i64, [], [1])]
    if inputs == "slots":
        inputs_ += [info("k", i32, []), info("slots", i32, [1, "N"])]
        outputs.append(info("r", i32, ["N"]))
        nodes += [helper.make_node("Shape", ["slots"], ["dims"]),
                  helper.make_node("Gather", ["dims", "one"], ["n"], axis=0),
                  helper.make_node("Range", ["start", "n", "delta"], ["ar"]),
                  helper.make_node("Cast", ["ar"], ["ar32"], to=i32),
                  helper.make_node("Add", ["ar32", "k"], ["r"])]
    elif inputs == "shape-tensor":
        inputs_.append(info("n", i64, []))
        outputs.append(info("r", i64, ["n"]))
        nodes.append(helper.make_node("Range", ["start", "n", "delta"], ["r"]))
    graph = helper.make_graph(nodes, "toy", inputs_, outputs, inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _build(onnx_path, engine_path, inputs: str):
    from polygraphy.backend.trt import (
        CreateConfig,
        Profile,
        engine_from_network,
        network_from_onnx_path,
        save_engine,
    )

    prefill = Profile().add("x", (1, 1, 4), (1, 4, 4), (1, 8, 4)).add("past", (1, 0, 4), (1, 0, 4), (1, 0, 4))
    decode = Profile().add("x", (1, 1, 4), (1, 1, 4), (1, 1, 4)).add("past", (1, 1, 4), (1, 8, 4), (1, 16, 4))
    if inputs == "slots":  # ordinary shapes only, as export.trt writes them
        prefill.add("k", (), (), ()).add("slots", (1, 1), (1, 4), (1, 8))
        decode.add("k", (), (), ()).add("slots", (1, 1), (1, 1), (1, 1))
    elif inputs == "shape-tensor":  # values: what the old export's profiles had
        prefill.add("n", [1], [4], [8])
        decode.add("n", [1], [1], [1])
    network = network_from_onnx_path(str(onnx_path))
    engine = engine_from_network(network, config=CreateConfig(profiles=[prefill, decode]))
    save_engine(engine, str(engine_path))


@pytest.mark.tensorrt
@pytest.mark.parametrize("inputs", ["plain", "slots"])
def test_real_engine_matches_onnxruntime(tmp_path, inputs):
    _real_stage_env()
    import onnxruntime as ort

    onnx_path, engine_path = tmp_path / "toy.onnx", tmp_path / "toy.engine"
    _onnx_model(onnx_path, inputs)
    _build(onnx_path, engine_path, inputs)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    with TrtStage(engine_path) as stage:  # would raise if TensorRT had made k or slots a shape tensor
        assert len(stage.ranges) == 2
        if inputs == "slots":
            assert stage.ranges[0]["k"] == ((), ()) and stage.ranges[1]["slots"] == ((1, 1), (1, 1))
        past = np.zeros((1, 0, 4), np.float32)
        for step in range(6):  # prefill (empty past), then decode steps feeding y back as past
            x = rng.standard_normal((1, 5 if step == 0 else 1, 4)).astype(np.float32)
            f = {"x": x, "past": past}
            if inputs == "slots":
                f.update(k=np.array(7 * step, np.int32), slots=np.zeros((1, 3 if step == 0 else 1), np.int32))
            got, want = stage.run(f), dict(zip([o.name for o in sess.get_outputs()], sess.run(None, f)))
            assert set(got) == set(want)
            for name, value in want.items():
                assert got[name].shape == value.shape, name
                np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
            past = got["y"]
        assert len(stage._contexts) == 2


@pytest.mark.tensorrt
def test_real_engine_with_a_shape_tensor_input_is_refused(tmp_path):
    """An engine built the old way (a 0-d int64 input whose value sets a shape) loads in TensorRT
    but TrtStage refuses it, with one line."""
    _real_stage_env()
    onnx_path, engine_path = tmp_path / "toy.onnx", tmp_path / "toy.engine"
    _onnx_model(onnx_path, "shape-tensor")
    _build(onnx_path, engine_path, "shape-tensor")
    with pytest.raises(EngineError, match="input n of toy.engine is a shape tensor .*re-export and re-build"):
        TrtStage(engine_path)


@pytest.mark.tensorrt
def test_real_engine_kv_loop_matches_onnxruntime(tmp_path):
    """The KV loop on real TensorRT: y carried into past on the GPU for 6 steps, then read back
    from the buffer it lies in. Not run on the development machines (no TensorRT there)."""
    _real_stage_env()
    import onnxruntime as ort

    onnx_path, engine_path = tmp_path / "toy.onnx", tmp_path / "toy.engine"
    _onnx_model(onnx_path, "plain")
    _build(onnx_path, engine_path, "plain")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    with TrtStage(engine_path) as stage:
        loop = stage.kv_loop({"y": "past"}, ("kept",))
        past = np.zeros((1, 0, 4), np.float32)
        for step in range(6):
            x = rng.standard_normal((1, 5 if step == 0 else 1, 4)).astype(np.float32)
            got = loop.run({"x": x, "past": past} if step == 0 else {"x": x})
            y, kept = sess.run(["y", "kept"], {"x": x, "past": past})
            np.testing.assert_array_equal(got["kept"], kept)
            past = y
        assert loop.shapes == {"past": past.shape} and loop.kv_bytes() == past.nbytes
        carried = stage._to_host("past", past.shape)
        trt_stage._cuda(stage._cudart.cudaStreamSynchronize(stage._stream), "reading the carried KV")
        np.testing.assert_allclose(carried, past, rtol=1e-6, atol=1e-6)

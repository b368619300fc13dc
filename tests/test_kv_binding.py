"""The KV cache stays where the decoder runs between decode steps (runtime.stage.kv_loop): ONNX
Runtime through IOBinding / OrtValue, checked here on the CPU provider against the numpy round trip
(load(kv_binding=False)): the fetched outputs, the carried KV, the generated tokens and the kept
positions are bit-identical. The ONNX Runtime behaviour the loop relies on (0-length dims in
OrtValues and bound inputs, outputs re-bound before every run) is checked on ONNX Runtime itself.
The CUDA path (KV as OrtValues in GPU memory) is not exercised: no GPU and no onnxruntime-gpu here.
TensorRT's loop (device buffers) is tested against a fake TensorRT in tests/test_trt_stage.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime.errors import EngineError, InputError
from runtime.pipeline import load
from runtime.stage import OrtStage, kv_device, kv_loop

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.png"

# --- a ragged two-cache graph ------------------------------------------------------------------------
# x [1, 2, S, 4]; past_a [1, 2, P, 4] grows by S per call (like layers < K), past_b [1, 2, Q, 4] by
# one token, x's first (like the pruned layers >= K: a different length). Outputs, deliberately in
# another order than the loop names them: total = sum(present_a) - 2 * sum(present_b) (depends on
# both caches, so a wrong carry changes it) and n_b = Shape(present_b) (the cache length).


def _ragged_model(path: Path) -> Path:
    f = TensorProto.FLOAT
    n = helper.make_node
    nodes = [
        n("Concat", ["past_a", "x"], ["present_a"], axis=2),
        n("Slice", ["x", "zero", "one", "two"], ["x_first"]),
        n("Concat", ["past_b", "x_first"], ["present_b"], axis=2),
        n("ReduceSum", ["present_a"], ["sum_a"], keepdims=0),
        n("ReduceSum", ["present_b"], ["sum_b"], keepdims=0),
        n("Mul", ["sum_b", "minus2"], ["sum_b2"]),
        n("Add", ["sum_a", "sum_b2"], ["total"]),
        n("Shape", ["present_b"], ["n_b"]),
    ]
    kv = lambda name, dim: helper.make_tensor_value_info(name, f, [1, 2, dim, 4])
    graph = helper.make_graph(
        nodes, "ragged",
        [kv("x", "S"), kv("past_a", "P"), kv("past_b", "Q")],
        [helper.make_tensor_value_info("n_b", TensorProto.INT64, [4]), kv("present_b", "Q1"),
         helper.make_tensor_value_info("total", f, []), kv("present_a", "PS")],
        [helper.make_tensor(k, TensorProto.INT64, [1], [v]) for k, v in (("zero", 0), ("one", 1), ("two", 2))]
        + [helper.make_tensor("minus2", f, [], [-2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


CARRY = {"present_a": "past_a", "present_b": "past_b"}
FETCH = ("total", "n_b")


def _steps(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    empty = np.zeros((1, 2, 0, 4), np.float32)
    first = {"x": rng.standard_normal((1, 2, 5, 4)).astype(np.float32), "past_a": empty, "past_b": empty}
    return [first] + [{"x": rng.standard_normal((1, 2, 1, 4)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def ragged(tmp_path_factory) -> OrtStage:
    return OrtStage(_ragged_model(tmp_path_factory.mktemp("ragged") / "ragged.onnx"), ["cpu"], threads=1)


def test_bound_loop_equals_the_numpy_round_trip(ragged):
    bound, plain = kv_loop(ragged, CARRY, FETCH), kv_loop(ragged, CARRY, FETCH, bound=False)
    assert bound.bound and not plain.bound and kv_device(ragged.session) == ("cpu", 0)
    past_a = past_b = np.zeros((1, 2, 0, 4), np.float32)
    for t, feeds in enumerate(_steps(8)):
        got, want = bound.run(feeds), plain.run(feeds)
        assert set(got) == set(FETCH)
        past_a = np.concatenate([past_a, feeds["x"]], axis=2)  # what each cache holds now
        past_b = np.concatenate([past_b, feeds["x"][:, :, :1]], axis=2)
        assert got["n_b"].tolist() == want["n_b"].tolist() == [1, 2, t + 1, 4]
        assert got["total"].dtype == want["total"].dtype == np.float32
        assert got["total"].tobytes() == want["total"].tobytes(), t  # bit-identical
        for inp, value in ((n, bound.carried[n].numpy()) for n in CARRY.values()):
            np.testing.assert_array_equal(value, plain.carried[inp], err_msg=inp)
        np.testing.assert_array_equal(bound.carried["past_a"].numpy(), past_a)
        np.testing.assert_array_equal(bound.carried["past_b"].numpy(), past_b)
        assert bound.kv_bytes() == plain.kv_bytes() == past_a.nbytes + past_b.nbytes
    assert past_a.shape == (1, 2, 13, 4) and past_b.shape == (1, 2, 9, 4)  # ragged: 5 + 8 vs 1 + 8


def test_fetched_arrays_outlive_later_steps(ragged):
    """OrtValue.numpy() shares the OrtValue's memory; the array keeps it alive after the binding
    has moved on to later steps' outputs."""
    loop = kv_loop(ragged, CARRY, ("total", "n_b"))
    steps = _steps(6)
    first = loop.run(steps[0])
    kept = first["total"].copy(), first["n_b"].copy()
    for feeds in steps[1:]:
        loop.run(feeds)
    assert first["total"].tobytes() == kept[0].tobytes() and first["n_b"].tolist() == kept[1].tolist()


def test_loop_errors(ragged):
    with pytest.raises(EngineError, match=r"\['present_c', 'past_c'\] are not outputs / inputs"):
        kv_loop(ragged, {"present_c": "past_c"}, FETCH)
    with pytest.raises(EngineError, match=r"\['nope'\] are not outputs"):
        kv_loop(ragged, CARRY, ("nope",))
    loop = kv_loop(ragged, CARRY, FETCH)
    steps = _steps(1)
    with pytest.raises(EngineError, match=r"missing inputs \['past_a', 'past_b'\]"):
        loop.run(steps[1])  # the first call must give the pasts (nothing is carried yet)
    with pytest.raises(EngineError, match=r"unexpected inputs \['y'\]"):
        loop.run({**steps[0], "y": steps[0]["x"]})
    loop.run(steps[0])
    with pytest.raises(EngineError, match=r"ragged: onnxruntime failed"):  # 3 heads: Concat refuses it
        loop.run({"x": np.zeros((1, 3, 1, 4), np.float32)})


# --- ONNX Runtime 1.32 behaviour the loop relies on ---------------------------------------------------


def test_ortvalues_with_zero_length_dims(ragged):
    """An empty past KV as an OrtValue (from numpy, or allocated by shape) and bound: shapes keep
    the 0, 0 bytes, and the graph concatenates onto it."""
    from_numpy = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 2, 0, 4), np.float32))
    by_shape = ort.OrtValue.ortvalue_from_shape_and_type([1, 2, 0, 4], np.float32, "cpu", 0)
    for v in (from_numpy, by_shape):
        assert v.shape() == [1, 2, 0, 4] and v.tensor_size_in_bytes() == 0 and v.numpy().shape == (1, 2, 0, 4)
    b = ragged.session.io_binding()
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 1, 4)
    b.bind_cpu_input("x", x)
    b.bind_ortvalue_input("past_a", from_numpy)
    b.bind_ortvalue_input("past_b", by_shape)
    for name in ("present_a", "present_b", "total"):
        b.bind_output(name, "cpu")
    ragged.session.run_with_iobinding(b)
    present_a, present_b, total = b.get_outputs()
    np.testing.assert_array_equal(present_a.numpy(), x)
    np.testing.assert_array_equal(present_b.numpy(), x)
    assert float(total.numpy()) == -float(x.sum())  # sum_a - 2 * sum_b with a == b == x


def test_outputs_must_be_rebound_each_step(ragged):
    """Why OrtKVLoop re-binds its outputs before every run: after a run the binding holds the
    allocated output and treats it as pre-allocated, so the next step's longer KV is refused."""
    b = ragged.session.io_binding()
    empty = np.zeros((1, 2, 0, 4), np.float32)
    b.bind_cpu_input("x", np.ones((1, 2, 1, 4), np.float32))
    b.bind_cpu_input("past_a", empty)
    b.bind_cpu_input("past_b", empty)
    b.bind_output("present_a", "cpu")
    ragged.session.run_with_iobinding(b)
    b.bind_ortvalue_input("past_a", b.get_outputs()[0])
    with pytest.raises(Exception, match="pre-allocated"):  # ONNX Runtime's own error type
        ragged.session.run_with_iobinding(b)
    b.bind_output("present_a", "cpu")
    ragged.session.run_with_iobinding(b)
    assert b.get_outputs()[0].shape() == [1, 2, 2, 4]


# --- the pipeline: the fake engine of test_runtime_unit, then llava-tiny ---------------------------


class _Recording:
    """A pipeline's KV loop that keeps every call's logits."""

    def __init__(self, loop, logits: list):
        self.loop, self.logits, self.bound = loop, logits, loop.bound

    def run(self, feeds):
        out = self.loop.run(feeds)
        self.logits.append(out["logits"].copy())
        return out

    def kv_bytes(self):
        return self.loop.kv_bytes()


def _generate_watched(pipe, monkeypatch, **kw):
    """(output, logits of every decoder call, {"run": n, "run_with_iobinding": m}: the decoder
    session's calls) of one generate."""
    session = pipe.decoder.session
    calls = {"run": 0, "run_with_iobinding": 0}
    logits: list[np.ndarray] = []

    def counting(name):
        original = getattr(session, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return counted

    for name in calls:
        monkeypatch.setattr(session, name, counting(name))
    make = pipe.kv_loop
    monkeypatch.setattr(pipe, "kv_loop", lambda: _Recording(make(), logits))
    try:
        return pipe.generate(**kw), logits, calls
    finally:
        monkeypatch.undo()


def test_fake_engine_both_paths_match_the_reference(tmp_path):
    from test_runtime_unit import build_engine, reference_generate

    from runtime.preprocess import preprocess

    engine = build_engine(tmp_path / "fake")
    bound, plain = load(engine), load(engine, kv_binding=False)
    assert bound.kv_binding and not plain.kv_binding
    assert bound.kv_loop().bound and not plain.kv_loop().bound
    pixels = preprocess(SAMPLE, bound.manifest.preprocess)
    ids = bound.prompt.encode("what is this", True)
    for ratio in (1.0, 0.5):
        want, want_kept = reference_generate(ids, pixels, ratio, 12)
        kw = {"input_ids": ids, "pixel_values": pixels, "keep_ratio": ratio, "max_new_tokens": 12}
        a, b = bound.generate(**kw), plain.generate(**kw)
        assert a.token_ids == b.token_ids == want and a.kept_positions == b.kept_positions == want_kept
        assert a.first_logits.tobytes() == b.first_logits.tobytes()
        assert a.timings["kv_bytes"] == b.timings["kv_bytes"] > 0


def test_load_kv_binding_must_be_a_bool(tmp_path):
    from test_runtime_unit import build_engine

    with pytest.raises(InputError, match=r"kv_binding must be True or False, got 'yes'"):
        load(build_engine(tmp_path / "fake"), kv_binding="yes")


@pytest.fixture(scope="module")
def tiny_pipes(tiny_engine):
    engine_dir, _ = tiny_engine
    return load(engine_dir, threads=1), load(engine_dir, threads=1, kv_binding=False)


@pytest.mark.parametrize("ratio", [1.0, 0.111])
def test_llava_tiny_tokens_bit_identical(tiny_pipes, ratio, monkeypatch):
    """llava-tiny, 20 tokens (eos ignored): the bound loop and the numpy round trip give the same
    tokens, kept positions, logits of every step (bit for bit) and KV size; the bound path runs the
    decoder session only through its IOBinding, the numpy one only through session.run."""
    bound, plain = tiny_pipes
    kw = {"prompt": "What is in the picture?", "image": SAMPLE, "keep_ratio": ratio, "max_new_tokens": 20,
          "ignore_eos": True}
    a, logits_bound, calls_bound = _generate_watched(bound, monkeypatch, **kw)
    b, logits_plain, calls_plain = _generate_watched(plain, monkeypatch, **kw)
    assert len(a.token_ids) == 20 and a.token_ids == b.token_ids
    assert a.kept_positions == b.kept_positions
    assert len(logits_bound) == len(logits_plain) == 20
    for t, (x, y) in enumerate(zip(logits_bound, logits_plain)):
        assert x.dtype == y.dtype == np.float32 and x.tobytes() == y.tobytes(), f"logits of call {t}"
    assert len({x.tobytes() for x in logits_bound}) == 20  # every step's logits differ: the KV moves them
    assert a.first_logits.tobytes() == b.first_logits.tobytes()
    assert a.timings["kv_bytes"] == b.timings["kv_bytes"]
    assert calls_bound == {"run": 0, "run_with_iobinding": 20}  # prefill + 19 decode steps
    assert calls_plain == {"run": 20, "run_with_iobinding": 0}
    S, kept = a.timings["prompt_tokens"], len(a.kept_positions)
    if ratio == 1.0:
        assert kept == S
    else:
        assert a.timings["kept_vision_tokens"] < a.timings["vision_tokens"] and kept < S


# --- the benchmark's side-by-side measurement ----------------------------------------------------------


def _ab_config(engine_dir, **kw):
    from bench.config import BenchConfig

    base = {"model": "llava-tiny", "engine_dir": engine_dir, "ratios": (1.0, 0.111), "runtimes": ("ort",),
            "new_tokens": 4, "repeats": 2, "warmup": 1, "threads": 1, "profile": False}
    return BenchConfig(**{**base, **kw})


def test_kv_binding_ab_on_llava_tiny(tiny_engine, tiny_pipes):
    from bench.run import kv_binding_ab
    from bench.runners import EngineRunner as OrtRunner

    engine_dir, _ = tiny_engine
    runner = OrtRunner(engine_dir, "cpu", 1)
    ticks = []
    result = kv_binding_ab(_ab_config(engine_dir), runner=runner, progress=ticks.append)
    assert runner.pipe.kv_binding  # restored
    assert len(ticks) == 2 * 2 * 3  # 2 ratios x (1 warm-up + 2 timed) pairs x 2 variants
    assert {k: result[k] for k in ("runtime", "provider", "new_tokens", "pairs", "warmup_pairs")} == \
        {"runtime": "ort", "provider": "cpu", "new_tokens": 4, "pairs": 2, "warmup_pairs": 1}
    cfg = _ab_config(engine_dir)
    assert [row["keep_ratio"] for row in result["rows"]] == [1.0, 0.111]
    for row in result["rows"]:
        w = tiny_pipes[0].generate(cfg.prompt, image=cfg.image, keep_ratio=row["keep_ratio"], max_new_tokens=1)
        assert row["prompt_tokens"] == w.timings["prompt_tokens"] and row["kv_bytes"] == w.timings["kv_bytes"]
        assert row["kept_tokens"] == len(w.kept_positions)
        d, spread = row["decode_tok_s"], row["spread"]
        for name in ("bound", "numpy"):
            assert 0 < spread[name][0] <= d[name] <= spread[name][1]
        assert row["speedup"] == d["bound"] / d["numpy"]
        assert row["pair_spread"][0] <= row["pair_speedup"] <= row["pair_spread"][1]


def test_kv_binding_ab_refuses_diverging_paths(tiny_engine, monkeypatch):
    from bench.probes import BenchError
    from bench.run import kv_binding_ab
    from bench.runners import EngineRunner as OrtRunner

    engine_dir, _ = tiny_engine
    runner = OrtRunner(engine_dir, "cpu", 1)
    generate = runner.pipe.generate

    def numpy_path_differs(**kw):
        out = generate(**kw)
        return out if runner.pipe.kv_binding else dataclasses.replace(out, token_ids=[*out.token_ids[:-1], out.token_ids[-1] + 1])

    monkeypatch.setattr(runner.pipe, "generate", numpy_path_differs)
    with pytest.raises(BenchError, match="kv_binding=False generated other tokens"):
        kv_binding_ab(_ab_config(engine_dir, ratios=(1.0,)), runner=runner)


def test_bench_run_adds_the_ab_to_meta(tiny_engine):
    from bench.run import run, total_runs

    cfg = _ab_config(tiny_engine[0], ratios=(1.0,), repeats=1, warmup=0, kv_binding_ab=True)
    ticks = []
    rows, meta = run(cfg, progress=ticks.append)
    assert [(r.runtime, r.keep_ratio) for r in rows] == [("ort", 1.0)]
    assert meta["kv_binding"] is True and len(ticks) == total_runs(cfg) == 1 + 2
    ab = meta["kv_binding_ab"]
    assert ab["runtime"] == "ort" and [r["keep_ratio"] for r in ab["rows"]] == [1.0]
    assert ab["rows"][0]["kv_bytes"] == rows[0].kv_bytes

"""dart::DartPruneSlots (the DartPrune ONNX function with no shape-tensor inputs, run by ONNX Runtime)
against the PyTorch reference, the golden file and DartPrune itself: keep indices equal element for
element, length included, with S' given as kept_slots' last dimension (Counts.kept_len). Also: no
graph input reaches a shape, by our dataflow walk and by export.check_trt's rule."""

from __future__ import annotations

import dart_cases
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from dart_cases import FORBIDDEN, reference, session_cache, tied_case
from onnx import TensorProto, helper, inliner, numpy_helper

from dart_ops import onnx_op
from dart_ops import onnx_op_slots as slots
from dart_ops.spec import MAX_SPAN, OP_DOMAIN, effective_counts
from export.check_trt import check_model

_NP = {"int64": np.int64, "int32": np.int32}


@pytest.fixture(scope="module")
def session():
    """session(pivots_image, pivots_text, **standalone_model kwargs): one ORT session per config."""
    return session_cache(slots.standalone_model)


def check(sess, hidden, keys, a, L, q, pi, pt, index_dtype="int64"):
    """Run with S' = Counts.kept_len (computed here, not by run_standalone) and compare."""
    S = hidden.shape[-2]
    kept = effective_counts(L, S - a - L, max(q, 0), pi, pt).kept_len(S)
    got = slots.run_standalone(sess, hidden, keys, a, L, q, kept=kept)
    want = reference(hidden, keys, a, L, q, pi, pt)
    assert got.dtype == _NP[index_dtype]
    assert got.shape == want.shape and got.shape[-1] == kept, (got.shape, want.shape, kept)
    assert np.array_equal(got, want), f"a={a} L={L} q={q} pivots={pi}+{pt}"
    return got


# --- golden -------------------------------------------------------------------------------------

@pytest.mark.parametrize("i", range(24))
def test_golden(golden, session, i):
    a, L, T, pi, pt, _ = golden[f"c{i}_meta"].tolist()
    got = check(session(pi, pt), golden[f"c{i}_sim"], golden[f"c{i}_keys"], a, L, T, pi, pt)
    assert np.array_equal(got, golden[f"c{i}_keep_canonical"])


@pytest.mark.parametrize("i", range(24))
def test_golden_sized_body_int32(golden, session, i):
    """The body an exporter builds (P steps, max_span = vision tokens + P), int32 scalars and keep."""
    a, L, T, pi, pt, _ = golden[f"c{i}_meta"].tolist()
    sess = session(pi, pt, max_pivots=max(pi + pt, 1), max_span=L + pi + pt, index_dtype="int32")
    got = check(sess, golden[f"c{i}_sim"], golden[f"c{i}_keys"], a, L, T, pi, pt, "int32")
    assert np.array_equal(got, golden[f"c{i}_keep_canonical"])


# --- random cases with exact ties, batch 2, equal to DartPrune too -------------------------------

@pytest.mark.parametrize("pi,pt", [(4, 4), (1, 1), (2, 6), (8, 0), (8, 8)])
@pytest.mark.parametrize("seed", range(2))
def test_ties_batch_quotas(session, pi, pt, seed):
    rng = np.random.default_rng(1000 + 100 * seed + 10 * pi + pt)
    a, L = int(rng.integers(0, 20)), int(rng.integers(40, 200))
    S = a + L + int(rng.integers(0, 30))
    hidden, keys = tied_case(rng, S)
    c = effective_counts(L, S - a - L, 10**6, pi, pt)
    old = ort.InferenceSession(onnx_op.standalone_model(pi, pt).SerializeToString(),
                               providers=["CPUExecutionProvider"])
    for q in (0, 1, max(c.quota // 2, 1), c.quota, c.quota + 5, 10**6):
        got = check(session(pi, pt), hidden, keys, a, L, q, pi, pt)
        assert got.shape[0] == 2
        assert np.array_equal(got, onnx_op.run_standalone(old, hidden, keys, a, L, q))
    assert not np.array_equal(got[0], got[1]) or c.kept_vision == L  # the batch items really differ
    for b in range(2):
        check(session(pi, pt), hidden[b], keys[b], a, L, 3, pi, pt)


def test_ties_really_tie():
    hidden, keys = tied_case(np.random.default_rng(0), 120)
    assert len(np.unique(np.abs(keys[0]).sum(-1))) < 30
    assert len(np.unique(hidden[0] / np.linalg.norm(hidden[0], axis=-1, keepdims=True), axis=0)) <= 5


def test_float16(session):
    rng = np.random.default_rng(7)
    for a, L, tail in [(5, 150, 20), (0, 96, 3), (30, 64, 0)]:
        hidden, keys = tied_case(rng, a + L + tail)
        h16, k16 = hidden.astype(np.float16), keys.astype(np.float16)
        for index_dtype in ("int64", "int32"):
            sess = session(4, 4, dtype="float16", index_dtype=index_dtype)
            for q in (0, 2, 7, 1000):
                got = slots.run_standalone(sess, h16, k16, a, L, q)
                assert got.dtype == _NP[index_dtype]
                assert np.array_equal(got, reference(h16, k16, a, L, q, 4, 4))


# --- degenerate inputs --------------------------------------------------------------------------

DEGENERATE = [*dart_cases.DEGENERATE, ("span of max_span tokens", 80, 4, 72, 5)]  # (label, S, a, L, q)


@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
@pytest.mark.parametrize("pi,pt", [(4, 4), (8, 0), (1, 3)])
@pytest.mark.parametrize("label,S,a,L,q", DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_degenerate(session, label, S, a, L, q, pi, pt, index_dtype):
    hidden, keys = tied_case(np.random.default_rng(S + a + L), S)
    sess = session(pi, pt, max_pivots=8, max_span=72, index_dtype=index_dtype)
    got = check(sess, hidden, keys, a, L, q, pi, pt, index_dtype)
    if L == 0 or pi >= L:  # no image, or every vision token is an image pivot
        assert np.array_equal(got, np.broadcast_to(np.arange(S), got.shape))


def test_no_pivots_keeps_everything(session):
    hidden, keys = tied_case(np.random.default_rng(3), 40)
    assert np.array_equal(check(session(0, 0), hidden, keys, 5, 30, 2, 0, 0), np.tile(np.arange(40), (2, 1)))
    # image pivots 0, text pivots but no text after the span: P = 0, nothing pruned
    assert check(session(0, 4), hidden, keys, 5, 35, 2, 0, 4).shape == (2, 40)


@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
def test_decode_step_keeps_all(session, index_dtype):
    """Decode steps: S = 1 (fewer tokens than TopK's K = max_pivots), span_len 0, S' = S."""
    rng = np.random.default_rng(4)
    for S in (1, 3):
        hidden = rng.standard_normal((2, S, 16)).astype(np.float32)
        keys = rng.standard_normal((2, S, 8)).astype(np.float32)
        got = slots.run_standalone(session(4, 4, index_dtype=index_dtype), hidden, keys, 0, 0, 8, kept=S)
        assert got.dtype == _NP[index_dtype]
        assert np.array_equal(got, np.tile(np.arange(S), (2, 1)))


def test_max_span_general_body(session):
    rng = np.random.default_rng(11)
    S, a = MAX_SPAN + 12, 4
    hidden = rng.standard_normal((1, S, 8)).astype(np.float32)
    keys = rng.standard_normal((1, S, 8)).astype(np.float32)
    check(session(4, 4), hidden, keys, a, MAX_SPAN, 100, 4, 4)


# --- opsets, index dtypes, kept_slots values ignored ------------------------------------------------

@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
@pytest.mark.parametrize("opset", [17, 18, 20])
def test_opsets(golden, session, opset, index_dtype):
    sess = session(4, 4, opset=opset, index_dtype=index_dtype)
    for i in (0, 7, 23):
        a, L, T, pi, pt, _ = golden[f"c{i}_meta"].tolist()
        got = check(sess, golden[f"c{i}_sim"], golden[f"c{i}_keys"], a, L, T, pi, pt, index_dtype)
        assert np.array_equal(got, golden[f"c{i}_keep_canonical"])
    hidden, keys = tied_case(np.random.default_rng(5), 90)
    for q in (0, 3, 100):
        check(sess, hidden, keys, 6, 70, q, 4, 4, index_dtype)


def test_scalar_dtype_independent_of_body():
    """The body casts the scalars to int64 first: an int64 body takes int32 scalars and vice versa."""
    hidden, keys = tied_case(np.random.default_rng(8), 90)
    want = reference(hidden, keys, 6, 70, 3, 4, 4)
    for body, scalars in (("int64", TensorProto.INT32), ("int32", TensorProto.INT64)):
        model = slots.standalone_model(index_dtype=body)
        for v in model.graph.input[2:5]:
            v.type.tensor_type.elem_type = scalars
        assert np.array_equal(slots.run_standalone(model, hidden, keys, 6, 70, 3), want)


@pytest.mark.parametrize("slots_dtype", ["bool", "float16", "int64"])
def test_kept_slots_values_are_ignored(slots_dtype):
    sess = ort.InferenceSession(slots.standalone_model(index_dtype="int32", slots_dtype=slots_dtype)
                                .SerializeToString(), providers=["CPUExecutionProvider"])
    hidden, keys = tied_case(np.random.default_rng(9), 90)
    want = reference(hidden, keys, 6, 70, 3, 4, 4)
    kept = want.shape[-1]
    slot_type = helper.tensor_dtype_to_np_dtype(slots.SLOT_DTYPES[slots_dtype])
    scalars = {name: np.asarray(v, np.int32) for name, v in zip(slots.INPUTS[2:5], (6, 70, 3))}
    for fill in (0, 1):
        feeds = {"hidden": hidden, "keys": keys, **scalars, "kept_slots": np.full((2, kept), fill, slot_type)}
        assert np.array_equal(sess.run(None, feeds)[0], want)


def test_kept_length_out_of_contract_stays_in_range(session):
    """S' is the caller's promise; a wrong one cuts or continues the kept indices (slot i depends on
    i only), clamped at S - 1, and a span longer than max_span still gives in-range indices."""
    hidden, keys = tied_case(np.random.default_rng(10), 90)
    sess = session(4, 4, max_pivots=8, max_span=72)
    want = reference(hidden, keys, 6, 70, 3, 4, 4)  # (2, 56)
    n = want.shape[1]
    longer = slots.run_standalone(sess, hidden, keys, 6, 70, 3, kept=n + 5)
    assert np.array_equal(longer[:, :n], want) and np.all(longer[:, n:] == 89)
    assert np.array_equal(slots.run_standalone(sess, hidden, keys, 6, 70, 3, kept=20), want[:, :20])
    over = slots.run_standalone(session(4, 4, max_pivots=8, max_span=64), hidden, keys, 6, 70, 3)
    assert over.shape == want.shape and over.min() >= 0 and over.max() < 90
    assert np.all(np.diff(over, axis=1) > 0)


def test_one_element_scalars():
    """span_start, span_len, quota may also be [1] tensors with a dynamic dim (no shape input then,
    whatever a body does with them: TensorRT never makes an input with a dynamic dim a shape input)."""
    model = slots.standalone_model(index_dtype="int32", max_pivots=8, max_span=72)
    for v in model.graph.input[2:5]:
        v.type.tensor_type.shape.dim.add().dim_param = "one"
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    hidden, keys = tied_case(np.random.default_rng(12), 90)
    want = reference(hidden, keys, 6, 70, 3, 4, 4)
    feeds = {"hidden": hidden, "keys": keys, "kept_slots": np.zeros(want.shape, np.int32)}
    feeds.update({name: np.array([v], np.int32) for name, v in zip(slots.INPUTS[2:5], (6, 70, 3))})
    assert np.array_equal(sess.run(None, feeds)[0], want)


# --- no shape inputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [17, 20])
def test_no_graph_input_is_a_shape_input(opset):
    """Ours: no input reaches a shape; DartPrune: the three scalars do. export.check_trt's error rule
    (the same walk, shape_input_uses) names the same inputs."""
    old = onnx_op.standalone_model(4, 4, opset)
    assert slots.check_no_shape_inputs(old) == ["span_start", "span_len", "quota"]
    assert [f.message.split("'")[1] for f in check_model(old, "old") if f.rule == "shape-input"] == [
        "span_start", "span_len", "quota"]
    for index_dtype in ("int64", "int32"):
        new = slots.standalone_model(4, 4, opset, index_dtype=index_dtype, max_pivots=8, max_span=584)
        assert slots.check_no_shape_inputs(new) == []
        assert [f for f in check_model(new, "new") if f.rule == "shape-input"] == []
        assert {f.rule for f in check_model(new, "new")} == ({"int64-io"} if index_dtype == "int64" else set())
    # with int32 I/O the whole TensorRT 10.3 static check is clean: no int64-io error either
    assert check_model(slots.standalone_model(4, 4, opset, index_dtype="int32"), "new32") == []


def _tiny(nodes, inputs):
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [vi(n, t, s) for n, t, s in inputs],
                              [vi("out", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shape_input_walk_on_small_graphs():
    """The walk follows values through any op (float inputs too), stops at Shape, and sees outer-scope
    names captured by an If branch; check_trt reports what it finds, naming the operand reached."""
    n = helper.make_node
    x = ("x", TensorProto.FLOAT, ["b", "s"])
    y = ("y", TensorProto.FLOAT, ["b", "s"])
    # float (B, S) input -> ReduceMax -> Cast -> Reshape's shape: a data-dependent shape
    m = _tiny([n("ReduceMax", ["y"], ["m"], keepdims=0), n("Cast", ["m"], ["mi"], to=TensorProto.INT64),
               n("Unsqueeze", ["mi", "zero"], ["shp"]), n("Reshape", ["x", "shp"], ["out"])], [x, y])
    m.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "zero"))
    assert slots.check_no_shape_inputs(m) == ["y"]
    assert [f.message.split("'")[1] for f in check_model(m, "m") if f.rule == "shape-input"] == ["y"]
    ((node, index),) = slots.shape_input_uses(m).values()
    assert (node.op_type, index) == ("Reshape", 1)
    # through Shape: only y's shape reaches the Reshape, not its values
    m = _tiny([n("Shape", ["y"], ["shp"]), n("Reshape", ["x", "shp"], ["out"])], [x, y])
    assert slots.check_no_shape_inputs(m) == []
    # an If branch slicing x by y's values (captured from the outer scope)
    branch = helper.make_graph(
        [n("Cast", ["y"], ["yi"], to=TensorProto.INT64), n("ReduceMax", ["yi"], ["e"], keepdims=1, axes=[0, 1]),
         n("Reshape", ["e", "one"], ["e1"]), n("Slice", ["x", "zero", "e1", "one"], ["o"])],
        "b", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    m = _tiny([n("Greater", ["c", "c"], ["cond"]), n("If", ["cond"], ["out"], then_branch=branch,
                                                      else_branch=branch)],
              [x, y, ("c", TensorProto.FLOAT, [])])
    m.graph.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "zero"),
                                numpy_helper.from_array(np.array([1], np.int64), "one")])
    assert slots.check_no_shape_inputs(m) == ["y", "c"]  # c: the If condition picks the branch


# --- structure ------------------------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", ["int64", "int32"])
@pytest.mark.parametrize("opset", [17, 18, 20])
def test_structure(opset, index_dtype):
    model = slots.standalone_model(4, 4, opset, index_dtype=index_dtype)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10
    assert [(nd.op_type, nd.domain) for nd in model.graph.node] == [(slots.OP_NAME, OP_DOMAIN)]
    assert {o.domain: o.version for o in model.opset_import} == {"": opset, OP_DOMAIN: 1}
    (fn,) = model.functions
    assert (fn.domain, fn.name, list(fn.input), list(fn.output)) == (OP_DOMAIN, "DartPruneSlots",
                                                                     list(slots.INPUTS), ["keep"])
    assert [(o.domain, o.version) for o in fn.opset_import] == [("", opset)]
    assert list(fn.attribute) == ["pivots_image", "pivots_text"]
    assert model.graph.output[0].type.tensor_type.elem_type == slots.INDEX_DTYPES[index_dtype]

    flat = inliner.inline_local_functions(model)
    onnx.checker.check_model(flat, full_check=True)
    assert not FORBIDDEN & {nd.op_type for nd in flat.graph.node}
    assert not any(a.ref_attr_name for nd in flat.graph.node for a in nd.attribute)
    consts = {nd.output[0]: numpy_helper.to_array(nd.attribute[0].t) for nd in flat.graph.node
              if nd.op_type == "Constant" and nd.attribute[0].name == "value"}
    topk = [nd for nd in flat.graph.node if nd.op_type == "TopK"]
    # pivots (image, text), one sort per pivot step, one for the ascending order
    assert sorted(int(consts[nd.input[1]].item()) for nd in topk) == [16, 16] + [MAX_SPAN] * 17
    assert "CumSum" not in {nd.op_type for nd in flat.graph.node}  # an ILoop in TensorRT 10.3's parser
    # the output: Cast(to=index dtype) of indices over Range(0, S'), S' = Gather(Shape(kept_slots), 1)
    producer = {o: nd for nd in flat.graph.node for o in nd.output}
    out = producer["keep"]
    assert (out.op_type, out.attribute[0].i) == ("Cast", slots.INDEX_DTYPES[index_dtype])
    (rng,) = [nd for nd in flat.graph.node if nd.op_type == "Range" and producer[nd.input[1]].op_type == "Gather"
              and producer[producer[nd.input[1]].input[0]].input == ["kept_slots"]]
    assert consts[producer[rng.input[1]].input[1]].tolist() == 1


def test_inlined_model_runs(golden):
    flat = inliner.inline_local_functions(slots.standalone_model(2, 6, index_dtype="int32"))
    sess = ort.InferenceSession(flat.SerializeToString(), providers=["CPUExecutionProvider"])
    a, L, T, pi, pt, _ = golden["c14_meta"].tolist()
    S = golden["c14_sim"].shape[0]
    got = slots.run_standalone(sess, golden["c14_sim"], golden["c14_keys"], a, L, T,
                               kept=effective_counts(L, S - a - L, T, pi, pt).kept_len(S))
    assert np.array_equal(got, golden["c14_keep_canonical"])


@pytest.mark.parametrize("kw", [{"max_span": 0}, {"max_span": MAX_SPAN + 1}, {"max_pivots": 0},
                                {"max_pivots": 40, "max_span": 64}, {"index_dtype": "int16"}, {"opset": 16}])
def test_bad_sizes(kw):
    with pytest.raises(ValueError):
        slots.dart_prune_slots_function(**kw)


def test_bad_model_arguments():
    for kw in ({"dtype": "float64"}, {"slots_dtype": "uint8"}, {"pivots_image": 12, "pivots_text": 8},
               {"pivots_image": -1}):
        with pytest.raises(ValueError):
            slots.standalone_model(**kw)

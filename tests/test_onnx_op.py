"""dart::DartPrune (ONNX function, run by ONNX Runtime) against the PyTorch reference and the
golden file: keep indices must be equal element for element, length included."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
from dart_cases import DEGENERATE, FORBIDDEN, reference, session_cache, tied_case
from onnx import numpy_helper

from dart_ops import onnx_op
from dart_ops.spec import MAX_SPAN, OP_DOMAIN, OP_NAME, effective_counts


@pytest.fixture(scope="module")
def session():
    """session(pivots_image, pivots_text, opset=17, **kw): one ORT session per config, reused."""
    return session_cache(lambda pi, pt, opset=17, **kw: onnx_op.standalone_model(pi, pt, opset, **kw))


def check(sess, hidden, keys, a, L, q, pi, pt):
    got = onnx_op.run_standalone(sess, hidden, keys, a, L, q)
    want = reference(hidden, keys, a, L, q, pi, pt)
    S = hidden.shape[-2]
    assert got.dtype == np.int64
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.array_equal(got, want), f"a={a} L={L} q={q} pivots={pi}+{pt}"
    kept = effective_counts(L, S - a - L, max(q, 0), pi, pt).kept_len(S)
    assert got.shape[-1] == kept
    return got


# --- golden -------------------------------------------------------------------------------------

@pytest.mark.parametrize("i", range(24))
def test_golden(golden, session, i):
    a, L, T, pi, pt, S = golden[f"c{i}_meta"].tolist()
    hidden, keys = golden[f"c{i}_sim"], golden[f"c{i}_keys"]
    got = check(session(pi, pt), hidden, keys, a, L, T, pi, pt)
    assert np.array_equal(got, golden[f"c{i}_keep_canonical"])


# --- random cases with exact ties ---------------------------------------------------------------

@pytest.mark.parametrize("pi,pt", [(4, 4), (1, 1), (2, 6), (8, 0), (8, 8)])
@pytest.mark.parametrize("seed", range(3))
def test_ties_batch_quotas(session, pi, pt, seed):
    rng = np.random.default_rng(100 * seed + 10 * pi + pt)
    a = int(rng.integers(0, 20))
    L = int(rng.integers(40, 200))
    S = a + L + int(rng.integers(0, 30))
    hidden, keys = tied_case(rng, S)
    c = effective_counts(L, S - a - L, 10**6, pi, pt)
    sess = session(pi, pt)
    for q in (0, 1, max(c.quota // 2, 1), c.quota, c.quota + 5, 10**6):
        got = check(sess, hidden, keys, a, L, q, pi, pt)
        assert got.shape[0] == 2
    # the two batch items really differ, and each row equals its own single-sample reference
    assert not np.array_equal(got[0], got[1]) or c.kept_vision == L
    for b in range(2):
        check(sess, hidden[b], keys[b], a, L, 3, pi, pt)


def test_ties_really_tie():
    """The generator produces duplicate L1 scores and duplicate cosines inside the span."""
    hidden, keys = tied_case(np.random.default_rng(0), 120)
    assert len(np.unique(np.abs(keys[0]).sum(-1))) < 30
    assert len(np.unique(hidden[0] / np.linalg.norm(hidden[0], axis=-1, keepdims=True),
                         axis=0)) <= 5


def test_float16(golden):
    sess16 = ort.InferenceSession(onnx_op.standalone_model(4, 4, dtype="float16")
                                  .SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for a, L, tail in [(5, 150, 20), (0, 96, 3), (30, 64, 0)]:
        hidden, keys = tied_case(rng, a + L + tail)
        h16, k16 = hidden.astype(np.float16), keys.astype(np.float16)
        for q in (0, 2, 7, 1000):
            got = onnx_op.run_standalone(sess16, h16, k16, a, L, q)
            want = reference(h16.astype(np.float32), k16.astype(np.float32), a, L, q, 4, 4)
            assert np.array_equal(got, want)


# --- degenerate inputs (dart_cases.DEGENERATE) ---------------------------------------------------

@pytest.mark.parametrize("pi,pt", [(4, 4), (8, 0), (1, 3)])
@pytest.mark.parametrize("label,S,a,L,q", DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_degenerate(session, label, S, a, L, q, pi, pt):
    hidden, keys = tied_case(np.random.default_rng(S + a + L), S)
    got = check(session(pi, pt), hidden, keys, a, L, q, pi, pt)
    if L == 0 or pi >= L:  # no image, or every vision token is an image pivot
        assert np.array_equal(got, np.broadcast_to(np.arange(S), got.shape))


def test_no_pivots_keeps_everything(session):
    hidden, keys = tied_case(np.random.default_rng(3), 40)
    assert np.array_equal(check(session(0, 0), hidden, keys, 5, 30, 2, 0, 0),
                          np.tile(np.arange(40), (2, 1)))
    # image pivots 0, text pivots but no text after the span: P = 0, nothing pruned
    assert check(session(0, 4), hidden, keys, 5, 35, 2, 0, 4).shape == (2, 40)


def test_max_span(session):
    rng = np.random.default_rng(11)
    S, a = MAX_SPAN + 12, 4
    hidden = rng.standard_normal((1, S, 8)).astype(np.float32)
    keys = rng.standard_normal((1, S, 8)).astype(np.float32)
    got = onnx_op.run_standalone(session(4, 4), hidden, keys, a, MAX_SPAN, 100)
    assert got.shape == (1, S - MAX_SPAN + 4 + 8 * 100)
    with pytest.raises(Exception):  # a longer span fails instead of being cut silently
        onnx_op.run_standalone(session(4, 4), hidden[:, :S - 1], keys[:, :S - 1], 0, MAX_SPAN + 1, 5)


# --- a body sized to the model (what the exporter builds: P steps, max_span = vision tokens + P) --

@pytest.mark.parametrize("i", range(24))
def test_golden_sized_body(golden, session, i):
    a, L, T, pi, pt, S = golden[f"c{i}_meta"].tolist()
    got = check(session(pi, pt, max_pivots=max(pi + pt, 1), max_span=L + pi + pt),
                golden[f"c{i}_sim"], golden[f"c{i}_keys"], a, L, T, pi, pt)
    assert np.array_equal(got, golden[f"c{i}_keep_canonical"])


@pytest.mark.parametrize("label,S,a,L,q", DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_degenerate_sized_body(session, label, S, a, L, q):
    hidden, keys = tied_case(np.random.default_rng(S + a + L), S)
    check(session(4, 4, max_pivots=8, max_span=72), hidden, keys, a, L, q, 4, 4)


def test_sized_body_span_limit(session):
    """A span up to max_span (pad of zero entries included) works; one token more fails."""
    rng = np.random.default_rng(12)
    hidden = rng.standard_normal((1, 80, 8)).astype(np.float32)
    keys = rng.standard_normal((1, 80, 8)).astype(np.float32)
    sess = session(4, 4, max_pivots=8, max_span=64)
    for L in (56, 64):
        check(sess, hidden, keys, 3, L, 5, 4, 4)
    with pytest.raises(Exception):
        onnx_op.run_standalone(sess, hidden, keys, 3, 65, 5)


def test_sized_body_is_smaller():
    """The sized body sorts max_span entries in max_pivots steps: fewer, smaller TopKs."""
    def topk_ks(fn):
        consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in fn.node
                  if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
        return sorted(int(consts[n.input[1]].item()) for n in fn.node if n.op_type == "TopK")

    general = topk_ks(onnx_op.dart_prune_function(18))
    sized = topk_ks(onnx_op.dart_prune_function(18, max_pivots=8, max_span=584))
    assert general == [16, 16] + [MAX_SPAN] * 16
    assert sized == [8, 8] + [584] * 8


@pytest.mark.parametrize("kw", [dict(max_span=0), dict(max_span=MAX_SPAN + 1), dict(max_pivots=0),
                                dict(max_pivots=40, max_span=64)])
def test_sized_body_bad_sizes(kw):
    with pytest.raises(ValueError):
        onnx_op.dart_prune_function(17, **kw)


# --- structure ----------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [17, 18])
def test_structure(opset):
    model = onnx_op.standalone_model(4, 4, opset)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10
    assert [(n.op_type, n.domain) for n in model.graph.node] == [(OP_NAME, OP_DOMAIN)]
    assert {o.domain: o.version for o in model.opset_import} == {"": opset, OP_DOMAIN: 1}
    (fn,) = model.functions
    assert (fn.domain, fn.name) == (OP_DOMAIN, OP_NAME)
    assert [(o.domain, o.version) for o in fn.opset_import] == [("", opset)]
    assert all(n.domain in ("", "ai.onnx") for n in fn.node)
    assert list(fn.attribute) == ["pivots_image", "pivots_text"]
    refs = {a.ref_attr_name for n in fn.node for a in n.attribute if a.ref_attr_name}
    assert refs == {"pivots_image", "pivots_text"}

    flat = onnx.inliner.inline_local_functions(model)
    onnx.checker.check_model(flat, full_check=True)
    ops = [n.op_type for n in flat.graph.node]
    assert not FORBIDDEN & set(ops)
    assert not any(a.ref_attr_name for n in flat.graph.node for a in n.attribute)
    consts = {o: onnx.numpy_helper.to_array(n.attribute[0].t)
              for n in flat.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"
              for o in n.output}
    consts.update({t.name: onnx.numpy_helper.to_array(t) for t in flat.graph.initializer})
    topk = [n for n in flat.graph.node if n.op_type == "TopK"]
    assert len(topk) == 2 + onnx_op.MAX_PIVOTS
    for n in topk:
        assert n.input[1] in consts, f"TopK K {n.input[1]} is not a constant"
        assert 1 <= int(consts[n.input[1]].item()) <= MAX_SPAN


def test_inlined_model_runs(golden):
    flat = onnx.inliner.inline_local_functions(onnx_op.standalone_model(2, 6))
    sess = ort.InferenceSession(flat.SerializeToString(), providers=["CPUExecutionProvider"])
    a, L, T, pi, pt, _ = golden["c14_meta"].tolist()
    got = onnx_op.run_standalone(sess, golden["c14_sim"], golden["c14_keys"], a, L, T)
    assert np.array_equal(got, golden["c14_keep_canonical"])


def test_pivot_attributes_validated():
    with pytest.raises(ValueError):
        onnx_op.standalone_model(12, 8)  # 20 > MAX_PIVOTS
    with pytest.raises(ValueError):
        onnx_op.standalone_model(-1, 4)
    with pytest.raises(ValueError):
        onnx_op.dart_prune_function(16)


# --- opset 18, exact-size unroll ----------------------------------------------------------------

@pytest.mark.parametrize("kw", [{"opset": 18}, {"max_pivots": 8}, {"opset": 18, "max_pivots": 8}])
def test_variants(golden, session, kw):
    sess = session(4, 4, **kw)
    for i in (0, 7, 23):
        a, L, T, pi, pt, _ = golden[f"c{i}_meta"].tolist()
        got = check(sess, golden[f"c{i}_sim"], golden[f"c{i}_keys"], a, L, T, pi, pt)
        assert np.array_equal(got, golden[f"c{i}_keep_canonical"])
    hidden, keys = tied_case(np.random.default_rng(5), 90)
    for q in (0, 3, 100):
        check(sess, hidden, keys, 6, 70, q, 4, 4)

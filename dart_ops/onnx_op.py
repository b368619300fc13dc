"""dart::DartPrune as an ONNX model-local function whose body uses only standard ONNX ops.

Because the body is standard ops, ONNX Runtime runs the op with no custom-op library, and
TensorRT's ONNX parser (which inlines local functions) builds it with no plugin. The result must
equal `dart_ops.reference.select_keep(..., order="canonical")` index for index.

    node:    keep = dart::DartPrune(hidden, keys, span_start, span_len, quota)
                    <pivots_image: int, pivots_text: int>   (both required on the node)
    hidden   (B, S, D) float32 or float16, layer K-1's output after the final RMSNorm
    keys     (B, S, F) float32 or float16, layer K-1's post-RoPE keys, heads concatenated
    span_start, span_len, quota   int64 scalars, shared by the whole batch
    keep     (B, S') int64, ascending kept token indices, S' = effective_counts(...).kept_len(S)

span_len 0 gives keep = arange(S), so a decoder graph can run the same node in decode steps.

How the body stays TensorRT-parseable (TensorRT 10.3): no NonZero, Loop, If or Scan, and every
TopK has a constant K (a Constant node, <= max_span <= spec.MAX_SPAN = 3840):
  - scores: ReduceL1 of the keys (fp32). Pivots: TopK with K = max_pivots (a Constant) over the
    span's / text tail's scores padded with -inf (Concat with a ConstantOfShape block), so the
    vector is never shorter than K. A slot past the effective pivot count does nothing.
  - cosines: ReduceL2 norms clamped at 1e-8 (Max), Div, GatherElements of the pivot rows, MatMul.
  - greedy harvest, unrolled over `max_pivots` static steps in canonical order: the cosines of the
    span are padded with +inf to exactly max_span entries (ConstantOfShape of max_span - L, which
    also makes a longer span fail loudly instead of being cut), taken tokens are set to +inf
    (Where), TopK(K=max_span, smallest, sorted) orders them, Less(arange, T) marks the
    first T, ScatterElements puts the marks back on token positions (the TopK order is a
    permutation, so there are no duplicate indices), Or adds them to the taken set.
  - ascending output without NonZero: CumSum of the keep mask gives each kept token its output
    slot and each dropped token a slot after S'; that is a permutation, so one ScatterElements
    (no duplicates, well defined everywhere) sorts the kept indices first; Slice keeps S'.
The counts (effective pivots, clamped T, S') are scalar int64 arithmetic (Min, Max, Div, Mul,
Where) on the inputs and on Constants that reference the pivots_image / pivots_text attributes
(ref_attr_name), so after inlining they are constants and shape-input arithmetic.
Also used: Shape, Gather, Slice, Unsqueeze, Expand, Transpose, Range, Cast, Equal/Less/
GreaterOrEqual/And/Or/Not, Add/Sub. ONNX TopK breaks ties towards the lower index, as the
reference does.

Why K and the step count are `max_pivots` and not the attributes: a function body is one fixed
node list for every call site, so it cannot be unrolled per attribute value; and a K taken from
the attribute would be 0 for pivots_text = 0, an empty TopK that TensorRT may not accept. The attributes only
enter the runtime counts, so unused slots cost a few no-op steps.

Limits: span_len <= max_span (else the op fails at run time; spec.MAX_SPAN = 3840 by default);
pivots_image + pivots_text <= max_pivots (the number of unrolled steps, MAX_PIVOTS = 16 by
default; checked by the builders here, not at run time). Exporters size both to the model
(export/stages.py); the cost of the body is about max_pivots sorts of max_span entries.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dart_ops.spec import MAX_PIVOTS, MAX_SPAN, OP_DOMAIN, OP_NAME, OP_VERSION

# ONNX Runtime 1.31 refuses the IR 14 that onnx 1.23 writes by default.
IR_VERSION = 10
INPUTS = ("hidden", "keys", "span_start", "span_len", "quota")
OUTPUT = "keep"
ATTRIBUTES = ("pivots_image", "pivots_text")
# Body nodes are named with this prefix, so profilers can attribute time to DartPrune after ONNX
# Runtime inlines the function (it keeps body node names, see scripts/bench.py --profile).
NODE_PREFIX = "DartPrune/"
_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


class _Body:
    """Collects the nodes of a function body; `op` returns the (auto-named) output. Node names start
    with `prefix` (DartPrune's, or dart_ops.onnx_op_slots' for DartPruneSlots)."""

    def __init__(self, opset: int, prefix: str = NODE_PREFIX):
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        self._n += 1
        names = [f"{op_type.lower()}_{self._n}" + (f"_{i}" if outputs > 1 else "")
                 for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=f"{self.prefix}{op_type}_{self._n}", **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.int64) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype)))

    def attr_const(self, attr: str) -> str:
        """int64 scalar holding the function attribute `attr` (a Constant with ref_attr_name)."""
        self._n += 1
        name = f"{attr}_{self._n}"
        node = helper.make_node("Constant", [], [name], name=f"{self.prefix}{name}")
        node.attribute.append(
            helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name=attr))
        self.nodes.append(node)
        return name

    def reduce(self, op_type: str, x: str, axis: int, keepdims: int = 0) -> str:
        # ReduceSum takes axes as an input since opset 13, the other reductions since opset 18.
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, x, self.const([axis]), keepdims=keepdims)
        return self.op(op_type, x, axes=[axis], keepdims=keepdims)

    def vec(self, x: str) -> str:
        """int64 scalar -> (1,)"""
        return self.op("Unsqueeze", x, self.const([0]))

    def fill(self, shape: list[str], value, dtype=np.float32) -> str:
        """Tensor of runtime shape Concat(shape) (each a (1,) int64) filled with `value`."""
        shape = self.op("Concat", *shape, axis=0) if len(shape) > 1 else shape[0]
        return self.op("ConstantOfShape", shape,
                       value=numpy_helper.from_array(np.asarray([value], dtype)))

    def clamp(self, x: str, lo: str, hi: str) -> str:
        return self.op("Max", self.op("Min", x, hi), lo)


def _counts(g: _Body, S: str, a: str, L: str, q: str):
    """spec.effective_counts as scalar int64 data ops. Returns (pi, P, T, keep_all, kept_vision):
    image pivots used, pivots used, quota, nothing pruned, vision tokens kept."""
    text_after = g.op("Sub", g.op("Sub", S, a), L)
    pi = g.op("Min", g.attr_const("pivots_image"), L)  # image pivots used
    pt = g.op("Min", g.attr_const("pivots_text"), text_after)  # text pivots used
    P = g.op("Add", pi, pt)
    zero, one = g.const(0), g.const(1)
    keep_all = g.op("Equal", P, zero)  # no pivot (this includes L == 0): nothing pruned
    free = g.op("Div", g.op("Sub", L, pi), g.op("Max", P, one))  # (L - pi) // P, both >= 0
    T = g.op("Min", g.op("Max", q, zero), free)
    kept_vision = g.op("Where", keep_all, L, g.op("Add", pi, g.op("Mul", P, T)))
    return pi, P, T, keep_all, kept_vision


def _top_pivots(g: _Body, scores: str, B: str, M: str, start: str, end: str) -> str:
    """Indices (relative to `start`) of the M best scores in [start, end), best first,
    (B, M) int64. The slice is padded with M -inf so that TopK's constant K always fits;
    slots past the real tokens point into the padding and are invalid."""
    part = g.op("Slice", scores, g.vec(start), g.vec(end), g.const([1]))  # (B, n)
    pad = g.fill([B, g.const([M])], -np.inf)  # (B, M)
    padded = g.op("Concat", part, pad, axis=1)  # (B, n + M)
    _, idx = g.op("TopK", padded, g.const([M]), axis=1, largest=1, sorted=1, outputs=2)
    return idx


def _unit_rows(g: _Body, hidden: str, B: str, pivots: str, M: int) -> tuple[str, str]:
    """fp32 hidden states with every row divided by max(its L2 norm, 1e-8), as torch's
    cosine_similarity does, (B, S, D); and the pivots' rows of it, (B, M, D)."""
    h = g.op("Cast", hidden, to=TensorProto.FLOAT)  # (B, S, D)
    norm = g.reduce("ReduceL2", h, axis=2, keepdims=1)  # (B, S, 1)
    hn = g.op("Div", h, g.op("Max", norm, g.const(1e-8, np.float32)))  # (B, S, D)
    D = g.op("Gather", g.op("Shape", hn), g.const([2]))  # (1,)
    rows = g.op("Expand", g.op("Unsqueeze", pivots, g.const([2])),
                g.op("Concat", B, g.const([M]), D, axis=0))  # (B, M, D)
    return hn, g.op("GatherElements", hn, rows, axis=1)


def _body(opset: int, M: int, N: int) -> list[onnx.NodeProto]:
    g = _Body(opset)
    hidden, keys, a, L, q = INPUTS
    shape = g.op("Shape", hidden)
    B = g.op("Gather", shape, g.const([0]))  # (1,)
    S = g.op("Gather", shape, g.const(1))  # ()
    pi, P, T, keep_all, kept_vision = _counts(g, S, a, L, q)
    kept_len = g.op("Add", g.op("Sub", S, L), kept_vision)  # S'

    # Pivots: (B, M) absolute token indices in canonical order, image first, then text.
    scores = g.reduce("ReduceL1", g.op("Cast", keys, to=TensorProto.FLOAT), axis=2)  # (B, S)
    aL = g.op("Add", a, L)
    img = _top_pivots(g, scores, B, M, a, aL)  # (B, M), relative to a
    txt = _top_pivots(g, scores, B, M, aL, S)  # (B, M), relative to a + L
    slot = g.const(np.arange(M))  # (M,)
    txt_slot = g.op("Max", g.op("Min", g.op("Sub", slot, pi), g.const(M - 1)), g.const(0))
    txt_abs = g.op("Add", g.op("Gather", txt, txt_slot, axis=1), aL)  # (B, M)
    is_img = g.op("Less", slot, pi)  # (M,)
    pivots = g.op("Where", is_img, g.op("Add", img, a), txt_abs)  # (B, M)
    S_1 = g.op("Sub", S, g.const(1))
    pivots = g.op("Max", g.op("Min", pivots, S_1), g.const(0))  # invalid slots clamped in range

    # Cosine similarity, fp32, rows normalised as torch's cosine_similarity.
    hn, piv = _unit_rows(g, hidden, B, pivots, M)
    span = g.op("Slice", hn, g.vec(a), g.vec(aL), g.const([1]))  # (B, L, D)
    cos = g.op("MatMul", piv, g.op("Transpose", span, perm=[0, 2, 1]))  # (B, M, L)
    pad = g.fill([B, g.const([M]), g.vec(g.op("Sub", g.const(N), L))], np.inf)  # (B, M, N - L)
    cos = g.op("Concat", cos, pad, axis=2)  # (B, M, N); fails if L > N

    # Greedy harvest. taken: (B, N) bool over span positions, image pivots taken from the start.
    pos_n = g.op("Range", g.const(0), g.const(N), g.const(1))  # (N,)
    zeros = g.fill([B, g.const([N])], 0.0)  # (B, N)
    img_valid = g.op("Expand", g.op("Cast", is_img, to=TensorProto.FLOAT),
                     g.op("Concat", B, g.const([M]), axis=0))  # (B, M)
    taken = g.op("Cast", g.op("ScatterElements", zeros, img, img_valid, axis=1),
                 to=TensorProto.BOOL)  # (B, N)
    BN = g.op("Concat", B, g.const([N]), axis=0)
    inf = g.const(np.inf, np.float32)
    for j in range(M):  # pivot slot j; a slot j >= P harvests nothing
        T_j = g.op("Where", g.op("Less", g.const(j), P), T, g.const(0))
        cos_j = g.op("Gather", cos, g.const(j), axis=1)  # (B, N)
        cand = g.op("Where", taken, inf, cos_j)  # (B, N), taken and padding -> +inf
        _, order = g.op("TopK", cand, g.const([N]), axis=1, largest=0, sorted=1, outputs=2)
        first = g.op("Expand", g.op("Cast", g.op("Less", pos_n, T_j), to=TensorProto.FLOAT), BN)
        new = g.op("ScatterElements", zeros, order, first, axis=1)  # (B, N), order: permutation
        taken = g.op("Or", taken, g.op("Cast", new, to=TensorProto.BOOL))

    # Keep mask over the sequence: outside the span, or taken inside it, or nothing pruned.
    pos = g.op("Range", g.const(0), S, g.const(1))  # (S,)
    rel = g.op("Sub", pos, a)  # (S,)
    in_span = g.op("And", g.op("GreaterOrEqual", rel, g.const(0)), g.op("Less", rel, L))
    rel = g.op("Max", g.op("Min", rel, g.const(N - 1)), g.const(0))
    kept_span = g.op("Gather", taken, rel, axis=1)  # (B, S)
    keep = g.op("Or", g.op("Or", g.op("Not", in_span), kept_span), keep_all)  # (B, S)

    # Ascending indices: kept token -> slot (#kept up to it) - 1, dropped -> S' + #dropped before.
    kept_i = g.op("Cast", keep, to=TensorProto.INT64)
    csum = g.op("CumSum", kept_i, g.const(1))  # (B, S)
    dst = g.op("Where", keep, g.op("Sub", csum, g.const(1)),
               g.op("Sub", g.op("Add", pos, kept_len), csum))  # (B, S), a permutation of 0..S-1
    pos_b = g.op("Expand", pos, g.op("Shape", kept_i))  # (B, S)
    ordered = g.op("ScatterElements", pos_b, dst, pos_b, axis=1)  # (B, S), every slot written
    g.nodes.append(helper.make_node(
        "Slice", [ordered, g.const([0]), g.vec(kept_len), g.const([1])], [OUTPUT]))  # (B, S')
    return g.nodes


def dart_prune_function(opset: int = 17, max_pivots: int = MAX_PIVOTS,
                        max_span: int = MAX_SPAN) -> onnx.FunctionProto:
    """The dart::DartPrune function (domain spec.OP_DOMAIN), body in default-domain `opset`
    (must equal the model's). Nodes may set pivots_image + pivots_text <= max_pivots; spans may
    hold up to max_span tokens. Both size the body: `max_pivots` unrolled steps, each sorting
    `max_span` entries, so an exporter that knows its model (LLaVA-1.5: 8 pivots, 576 vision
    tokens) builds a body several times cheaper than the general one (16 x 3840)."""
    check_sizes(OP_NAME, opset, max_pivots, max_span)
    # Plain attribute names, no attribute_proto defaults: onnx 1.23's inliner does not apply
    # defaults (it leaves the referencing Constant empty), so every node must set both.
    return helper.make_function(
        OP_DOMAIN, OP_NAME, list(INPUTS), [OUTPUT], _body(opset, max_pivots, max_span),
        [helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
        doc_string=f"DART token selection (canonical pivot order), up to {max_pivots} pivots and "
                   f"{max_span} span tokens.")


def check_sizes(op: str, opset: int, max_pivots: int, max_span: int) -> None:
    """Raise ValueError unless `op`'s function body (DartPrune's or DartPruneSlots') can be built for
    this opset with `max_pivots` unrolled steps over `max_span` entries."""
    if opset < 17:
        raise ValueError(f"{op} needs opset >= 17, got {opset}")
    if not 1 <= max_span <= MAX_SPAN:
        raise ValueError(f"max_span must be in [1, {MAX_SPAN}] (TensorRT's TopK limit), got {max_span}")
    if not 1 <= max_pivots <= max_span // 2:
        raise ValueError(f"max_pivots must be in [1, {max_span // 2}], got {max_pivots}")


def check_pivots(pivots_image: int, pivots_text: int, max_pivots: int = MAX_PIVOTS) -> None:
    """Raise ValueError unless a DartPrune node may carry these pivot attributes."""
    for name, v in (("pivots_image", pivots_image), ("pivots_text", pivots_text)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if pivots_image + pivots_text > max_pivots:
        raise ValueError(f"DartPrune unrolls {max_pivots} pivots, got "
                         f"{pivots_image}+{pivots_text}; build the function with more")


def dart_node(op: str, inputs, output: str, pivots_image: int, pivots_text: int, max_pivots: int,
              name: str) -> onnx.NodeProto:
    """A node of DART op `op` (DartPrune or DartPruneSlots) in the `dart` domain, with both pivot
    attributes set (checked against the body's max_pivots)."""
    check_pivots(pivots_image, pivots_text, max_pivots)
    return helper.make_node(op, list(inputs), [output], name=name, domain=OP_DOMAIN,
                            pivots_image=pivots_image, pivots_text=pivots_text)


def dart_prune_node(inputs, output: str, pivots_image: int = 4, pivots_text: int = 4,
                    max_pivots: int = MAX_PIVOTS, name: str = "dart_prune") -> onnx.NodeProto:
    """A dart::DartPrune node; `inputs` are the five input names in INPUTS order."""
    return dart_node(OP_NAME, inputs, output, pivots_image, pivots_text, max_pivots, name)


def standalone_model(pivots_image: int = 4, pivots_text: int = 4, opset: int = 17, *,
                     dtype: str = "float32", max_pivots: int = MAX_PIVOTS,
                     max_span: int = MAX_SPAN) -> onnx.ModelProto:
    """A model holding one DartPrune node (tests, benchmarks, engine-parse checks)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    ft = _DTYPES[dtype]
    vi = helper.make_tensor_value_info
    inputs = [vi("hidden", ft, ["batch", "seq", "hidden_dim"]),
              vi("keys", ft, ["batch", "seq", "key_dim"])]
    inputs += [vi(n, TensorProto.INT64, []) for n in INPUTS[2:]]
    node = dart_prune_node(INPUTS, OUTPUT, pivots_image, pivots_text, max_pivots)
    graph = helper.make_graph([node], "dart_prune", inputs,
                              [vi(OUTPUT, TensorProto.INT64, ["batch", "kept"])])
    model = helper.make_model(
        graph, functions=[dart_prune_function(opset, max_pivots, max_span)],
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(OP_DOMAIN, OP_VERSION)],
        producer_name="dart_ops")
    model.ir_version = IR_VERSION
    return model


def run_standalone(session_or_model, hidden, keys, span_start, span_len, quota) -> np.ndarray:
    """Run a standalone DartPrune model; (S, D) inputs give (S',), (B, S, D) give (B, S')."""
    sess = session_or_model
    if isinstance(sess, onnx.ModelProto):
        import onnxruntime as ort

        sess = ort.InferenceSession(sess.SerializeToString(), providers=["CPUExecutionProvider"])
    hidden, keys = np.asarray(hidden), np.asarray(keys)
    single = hidden.ndim == 2
    feeds = {"hidden": hidden[None] if single else hidden, "keys": keys[None] if single else keys}
    for name, v in zip(INPUTS[2:], (span_start, span_len, quota)):
        feeds[name] = np.asarray(v, dtype=np.int64)
    (keep,) = sess.run([OUTPUT], feeds)
    return keep[0] if single else keep

"""dart::DartPruneSlots: DartPrune as an ONNX function with no shape-tensor inputs.

The same selection as dart::DartPrune (dart_ops.onnx_op), index for index equal to
`dart_ops.reference.select_keep(..., order="canonical")`, but the pruned length S' comes from the
SHAPE of an input instead of being computed from the values of span_start / span_len / quota.
TensorRT makes an integer input whose values decide a shape into a shape input tensor (host values,
IOptimizationProfile::setShapeValues, documented only for int32 in TensorRT 10.3); here no input
value reaches a shape, so every input is an ordinary execution tensor with a normal optimization
profile over its dimensions.

    node:    keep = dart::DartPruneSlots(hidden, keys, span_start, span_len, quota, kept_slots)
                    <pivots_image: int, pivots_text: int>   (both required on the node)
    hidden      (B, S, D) float32 or float16, layer K-1's output after the final RMSNorm
    keys        (B, S, F) float32 or float16, layer K-1's post-RoPE keys, heads concatenated
    span_start, span_len, quota   int32 or int64, 0-d (or any shape holding one element, e.g. a
                [1] with a dynamic dim), shared by the whole batch
    kept_slots  (B, S') any dtype; its VALUES are never read, only its last dimension S'
    keep        (B, S') ascending kept token indices; int64, or int32 for a body built with
                index_dtype="int32" (ONNX TopK's indices are int64: one Cast at the end)

Contract: S' must equal `dart_ops.spec.kept_len(S, a, L, quota, pivots_image, pivots_text)` (the
runtime computes it before the call; S' = S when span_len is 0, as in decode steps), and span_len
<= max_span. The graph cannot check either: without a data-dependent shape there is no loud
failure TensorRT could raise, and an out-of-range Gather is
undefined behaviour there (not an error). Out of contract the output stays well defined and every
index in [0, S): output slot i depends only on i, so a too small S' cuts the kept indices and a too
large one continues them, clamped at S - 1; span tokens past the first max_span are dropped.
The runtime must check both (it knows S, the span, the quota and max_span before the call).

How the values of span_start (a), span_len (L) and quota (T) stay data (no Slice bound,
ConstantOfShape/Range/Expand/Reshape shape, or TopK K derives from them; every shape derives from
the shapes of hidden, keys, kept_slots and the constants M = max_pivots, N = max_span):
  - the span is a fixed window of N positions: window j holds token clamp(a + j, 0, S - 1) and is
    valid when j < L (a mask, not a Slice);
  - image pivots: TopK(K = M) over the window's scores with invalid positions at -inf (N >= 2M,
    so K always fits); text pivots: TopK(K = M) over the whole sequence's scores with positions
    before a + L at -inf, padded with M more -inf columns (S may be shorter than M). ONNX TopK
    breaks ties towards the lower index, and masking preserves the order of the valid positions,
    so both equal the reference's stable sorts;
  - cosines: (B, M, S) for the pivots against the whole sequence (MatMul of normalised rows),
    then a Gather of the window's columns -> (B, M, N), +inf where invalid;
  - the greedy harvest is DartPrune's (M unrolled TopK(K = N) steps over the window);
  - the output is built directly at its final shape: slot i of Range(0, S'), S' =
    Shape(kept_slots)[1] (a shape from an input's shape: a normal profile dimension), holds i
    before the span, a + the (i - a)-th kept window position, or i + L - kept_vision after it; the
    kept window positions come ascending out of one more TopK(K = N). DartPrune's CumSum +
    ScatterElements + Slice(kept_len) are gone: TensorRT 10.3's parser imports CumSum as an ILoop
    over the sequence and documents it for float types only.
No NonZero, Loop, If, Scan or CumSum; every TopK K is a Constant (M, or N <= spec.MAX_SPAN = 3840).
span_start, span_len and quota are cast to int64 first (the body's arithmetic is int64, as
DartPrune's), so the same body accepts int32 or int64 scalars; `index_dtype` only sets the output.

`check_no_shape_inputs(model)` lists the graph inputs whose values reach a shape-determining
operand (after inlining functions): [] for a model holding this op, span_start/span_len/quota for
one holding DartPrune.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, inliner

from dart_ops.onnx_op import ATTRIBUTES, IR_VERSION, _Body, _counts, _unit_rows, check_sizes, dart_node
from dart_ops.spec import MAX_PIVOTS, MAX_SPAN, OP_DOMAIN, OP_VERSION, kept_len

OP_NAME = "DartPruneSlots"
INPUTS = ("hidden", "keys", "span_start", "span_len", "quota", "kept_slots")
OUTPUT = "keep"
# Body nodes keep this prefix after inlining (profilers attribute time by it, as for DartPrune).
NODE_PREFIX = "DartPruneSlots/"
FLOAT_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
INDEX_DTYPES = {"int64": TensorProto.INT64, "int32": TensorProto.INT32}
SLOT_DTYPES = {**INDEX_DTYPES, **FLOAT_DTYPES, "bool": TensorProto.BOOL}


def _pivots(g: _Body, scores: str, B: str, S: str, a: str, L: str, pi: str, M: int, N: int):
    """Canonical pivots: image pivots by score, then text pivots by score. Returns img (B, M): image
    pivots as window positions (relative to a); in_win (N,): window position valid; win_tok (N,):
    its token; pivots (B, M): absolute token indices clamped to [0, S-1] (slots at or past the
    effective pivot count are invalid and harmless)."""
    neg_inf = g.const(-np.inf, np.float32)
    win = g.const(np.arange(N))  # (N,)
    in_win = g.op("Less", win, L)  # (N,) window position j < L is a span token
    S_1 = g.op("Sub", S, g.const(1))
    win_tok = g.clamp(g.op("Add", win, a), g.const(0), S_1)  # (N,) token of window position j
    img_scores = g.op("Where", in_win, g.op("Gather", scores, win_tok, axis=1), neg_inf)  # (B, N)
    _, img = g.op("TopK", img_scores, g.const([M]), axis=1, largest=1, sorted=1, outputs=2)  # (B, M)

    pos = g.op("Range", g.const(0), S, g.const(1))  # (S,)
    is_text = g.op("GreaterOrEqual", pos, g.op("Add", a, L))  # (S,) after the span
    txt_scores = g.op("Where", is_text, scores, neg_inf)  # (B, S)
    padded = g.op("Concat", txt_scores, g.fill([B, g.const([M])], -np.inf), axis=1)  # (B, S + M)
    _, txt = g.op("TopK", padded, g.const([M]), axis=1, largest=1, sorted=1, outputs=2)  # (B, M) absolute

    slot = g.const(np.arange(M))  # (M,)
    txt_slot = g.clamp(g.op("Sub", slot, pi), g.const(0), g.const(M - 1))  # slot j -> text pivot j - pi
    pivots = g.op("Where", g.op("Less", slot, pi), g.op("Add", img, a),
                  g.op("Gather", txt, txt_slot, axis=1))  # (B, M)
    return img, in_win, win_tok, g.clamp(pivots, g.const(0), S_1)


def _cosines(g: _Body, hidden: str, B: str, pivots: str, win_tok: str, in_win: str, M: int) -> str:
    """(B, M, N) fp32 cosine of each pivot with each window position, +inf where invalid; rows
    normalised by max(norm, 1e-8) as torch's cosine_similarity."""
    hn, piv = _unit_rows(g, hidden, B, pivots, M)  # (B, S, D), (B, M, D)
    cos = g.op("MatMul", piv, g.op("Transpose", hn, perm=[0, 2, 1]))  # (B, M, S)
    cos = g.op("Gather", cos, win_tok, axis=2)  # (B, M, N)
    return g.op("Where", in_win, cos, g.const(np.inf, np.float32))  # (B, M, N)


def _harvest(g: _Body, cos: str, img: str, B: str, pi: str, P: str, T: str, M: int, N: int) -> str:
    """Greedy harvest unrolled over M pivot slots (canonical order). Returns taken (B, N) bool over
    window positions: image pivots plus T least duplicated free tokens per pivot."""
    is_img = g.op("Less", g.const(np.arange(M)), pi)  # (M,)
    zeros = g.fill([B, g.const([N])], 0.0)  # (B, N)
    img_valid = g.op("Expand", g.op("Cast", is_img, to=TensorProto.FLOAT), g.op("Concat", B, g.const([M]), axis=0))
    taken = g.op("Cast", g.op("ScatterElements", zeros, img, img_valid, axis=1), to=TensorProto.BOOL)  # (B, N)
    win = g.const(np.arange(N))  # (N,)
    BN = g.op("Concat", B, g.const([N]), axis=0)
    inf = g.const(np.inf, np.float32)
    for j in range(M):  # pivot slot j; a slot j >= P harvests nothing
        T_j = g.op("Where", g.op("Less", g.const(j), P), T, g.const(0))
        cand = g.op("Where", taken, inf, g.op("Gather", cos, g.const(j), axis=1))  # (B, N), taken/invalid +inf
        _, order = g.op("TopK", cand, g.const([N]), axis=1, largest=0, sorted=1, outputs=2)  # (B, N)
        first = g.op("Expand", g.op("Cast", g.op("Less", win, T_j), to=TensorProto.FLOAT), BN)  # (B, N)
        new = g.op("ScatterElements", zeros, order, first, axis=1)  # (B, N), order is a permutation
        taken = g.op("Or", taken, g.op("Cast", new, to=TensorProto.BOOL))
    return taken


def _ordered(g: _Body, taken: str, in_win: str, S: str, a: str, L: str, kv: str, N: int) -> str:
    """(B, S') kept token indices, ascending, S' = kept_slots' last dimension. Output slot i holds
    i before the span, a + (the (i - a)-th kept window position) inside the kept vision tokens,
    i + L - kv after them. The kept window positions come ascending out of one TopK over the key
    j (kept) or N + j (dropped): no CumSum (an ILoop over S in TensorRT 10.3's parser). With nothing
    pruned (no pivot) nothing is taken and the sort is the identity, so slot i holds i throughout."""
    win = g.const(np.arange(N))  # (N,)
    win_keep = g.op("And", in_win, taken)  # (B, N); taken is inside the span already, unless NaN inputs
    key = g.op("Cast", g.op("Where", win_keep, win, g.op("Add", win, g.const(N))), to=TensorProto.FLOAT)
    _, asc = g.op("TopK", key, g.const([N]), axis=1, largest=0, sorted=1, outputs=2)  # (B, N), exact < 2^24
    S_kept = g.op("Gather", g.op("Shape", INPUTS[5]), g.const(1))  # () S' from kept_slots' shape
    i = g.op("Range", g.const(0), S_kept, g.const(1))  # (S',)
    rel = g.op("Sub", i, a)  # (S',)
    vision = g.op("Add", g.op("Gather", asc, g.clamp(rel, g.const(0), g.const(N - 1)), axis=1), a)  # (B, S')
    after = g.op("Add", i, g.op("Sub", L, kv))  # (S',)
    out = g.op("Where", g.op("Less", rel, g.const(0)), i,
               g.op("Where", g.op("Less", rel, kv), vision, after))  # (B, S')
    return g.clamp(out, g.const(0), g.op("Sub", S, g.const(1)))  # in range even out of contract


def _scalar(g: _Body, name: str) -> str:
    """A span/quota input (0-d, or any shape holding one element) as a 0-d int64."""
    return g.op("Reshape", g.op("Cast", name, to=TensorProto.INT64), g.const(np.zeros(0, np.int64)))


def _body(opset: int, M: int, N: int, index_dtype: int) -> list[onnx.NodeProto]:
    g = _Body(opset, NODE_PREFIX)
    hidden, keys = INPUTS[0], INPUTS[1]
    a, L, q = (_scalar(g, name) for name in INPUTS[2:5])  # () int64 each
    shape = g.op("Shape", hidden)
    B = g.op("Gather", shape, g.const([0]))  # (1,)
    S = g.op("Gather", shape, g.const(1))  # ()
    pi, P, T, _, kept_vision = _counts(g, S, a, L, q)

    scores = g.reduce("ReduceL1", g.op("Cast", keys, to=TensorProto.FLOAT), axis=2)  # (B, S)
    img, in_win, win_tok, pivots = _pivots(g, scores, B, S, a, L, pi, M, N)
    cos = _cosines(g, hidden, B, pivots, win_tok, in_win, M)  # (B, M, N)
    taken = _harvest(g, cos, img, B, pi, P, T, M, N)  # (B, N)
    keep = _ordered(g, taken, in_win, S, a, L, kept_vision, N)  # (B, S') int64
    g.nodes.append(helper.make_node("Cast", [keep], [OUTPUT], to=index_dtype, name=f"{NODE_PREFIX}Cast_out"))
    return g.nodes


def dart_prune_slots_function(opset: int = 17, max_pivots: int = MAX_PIVOTS, max_span: int = MAX_SPAN,
                              index_dtype: str = "int64") -> onnx.FunctionProto:
    """The dart::DartPruneSlots function (domain spec.OP_DOMAIN), body in default-domain `opset` (must
    equal the model's), sized like DartPrune's (`max_pivots` unrolled steps sorting `max_span`
    entries each). `index_dtype` ("int64" or "int32") is the dtype of `keep`; the scalar inputs may
    be either."""
    check_sizes(OP_NAME, opset, max_pivots, max_span)
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be one of {sorted(INDEX_DTYPES)}, got {index_dtype!r}")
    # Plain attribute names without defaults: onnx 1.23's inliner does not apply attribute defaults.
    return helper.make_function(
        OP_DOMAIN, OP_NAME, list(INPUTS), [OUTPUT],
        _body(opset, max_pivots, max_span, INDEX_DTYPES[index_dtype]),
        [helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES),
        doc_string=f"DART token selection (canonical pivot order), kept length from kept_slots' shape, up to "
                   f"{max_pivots} pivots and {max_span} span tokens, {index_dtype} output.")


def dart_prune_slots_node(inputs, output: str, pivots_image: int = 4, pivots_text: int = 4,
                          max_pivots: int = MAX_PIVOTS, name: str = "dart_prune_slots") -> onnx.NodeProto:
    """A dart::DartPruneSlots node; `inputs` are the six input names in INPUTS order."""
    return dart_node(OP_NAME, inputs, output, pivots_image, pivots_text, max_pivots, name)


def standalone_model(pivots_image: int = 4, pivots_text: int = 4, opset: int = 17, *, dtype: str = "float32",
                     index_dtype: str = "int64", slots_dtype: str | None = None, max_pivots: int = MAX_PIVOTS,
                     max_span: int = MAX_SPAN) -> onnx.ModelProto:
    """A model holding one DartPruneSlots node (tests, benchmarks, engine-parse checks). span_start,
    span_len, quota and keep are `index_dtype`; kept_slots is `slots_dtype` (default: index_dtype).
    The pivot counts are also written to metadata_props, where run_standalone reads them."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
    slots_dtype = slots_dtype or index_dtype
    if slots_dtype not in SLOT_DTYPES:
        raise ValueError(f"slots_dtype must be one of {sorted(SLOT_DTYPES)}, got {slots_dtype!r}")
    fn = dart_prune_slots_function(opset, max_pivots, max_span, index_dtype)  # validates index_dtype
    ft, it = FLOAT_DTYPES[dtype], INDEX_DTYPES[index_dtype]
    vi = helper.make_tensor_value_info
    inputs = [vi("hidden", ft, ["batch", "seq", "hidden_dim"]), vi("keys", ft, ["batch", "seq", "key_dim"])]
    inputs += [vi(n, it, []) for n in INPUTS[2:5]]
    inputs.append(vi("kept_slots", SLOT_DTYPES[slots_dtype], ["batch", "kept"]))
    node = dart_prune_slots_node(INPUTS, OUTPUT, pivots_image, pivots_text, max_pivots)
    graph = helper.make_graph([node], "dart_prune_slots", inputs, [vi(OUTPUT, it, ["batch", "kept"])])
    model = helper.make_model(
        graph, functions=[fn], producer_name="dart_ops",
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(OP_DOMAIN, OP_VERSION)])
    helper.set_model_props(model, {"pivots_image": str(pivots_image), "pivots_text": str(pivots_text)})
    model.ir_version = IR_VERSION
    return model


def run_standalone(session_or_model, hidden, keys, span_start, span_len, quota, kept: int | None = None):
    """Run a standalone DartPruneSlots model; (S, D) inputs give (S',), (B, S, D) give (B, S').
    `kept` is S' (default: kept_len(...) with the model's pivot counts); kept_slots is fed as zeros."""
    sess = session_or_model
    if isinstance(sess, onnx.ModelProto):
        import onnxruntime as ort

        sess = ort.InferenceSession(sess.SerializeToString(), providers=["CPUExecutionProvider"])
    hidden, keys = np.asarray(hidden), np.asarray(keys)
    single = hidden.ndim == 2
    hidden, keys = (hidden[None], keys[None]) if single else (hidden, keys)
    B, S = hidden.shape[:2]
    if kept is None:
        meta = sess.get_modelmeta().custom_metadata_map
        kept = kept_len(S, span_start, span_len, quota, int(meta["pivots_image"]), int(meta["pivots_text"]))
    types = {i.name: _ort_dtype(i.type) for i in sess.get_inputs()}
    feeds = {"hidden": hidden, "keys": keys, "kept_slots": np.zeros((B, kept), types["kept_slots"])}
    for name, v in zip(INPUTS[2:5], (span_start, span_len, quota)):
        feeds[name] = np.asarray(v, dtype=types[name])
    (keep,) = sess.run([OUTPUT], feeds)
    return keep[0] if single else keep


def _ort_dtype(ort_type: str):
    """'tensor(int32)' -> np.int32 (the types standalone_model declares)."""
    names = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16, "tensor(bool)": np.bool_}
    return names[ort_type]


# --- which graph inputs are shape inputs ---------------------------------------------------------

# Operands whose VALUES decide an output's shape (default domain), by input index. A graph input
# reaching one of them through value-carrying ops becomes, in TensorRT, a shape input tensor (or a
# data-dependent shape). Reduce*/Squeeze/Unsqueeze axes decide the rank and dims too.
SHAPE_OPERANDS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2), "TopK": (1,), "OneHot": (1,), "Pad": (1, 3), "Split": (1,), "Resize": (2, 3),
    "Upsample": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "CenterCropPad": (1, 2), "Col2Im": (1, 2),
    "MaxUnpool": (2,), "DFT": (1, 2), "STFT": (1, 3), "BlackmanWindow": (0,), "HammingWindow": (0,),
    "HannWindow": (0,), "MelWeightMatrix": (0, 1), "Loop": (0, 1), "If": (0,),
    # data-dependent output shapes
    "NonZero": (0,), "Compress": (1,), "Unique": (0,), "NonMaxSuppression": (0, 1, 2, 3, 4),
}
SHAPE_OPERANDS.update({op: (1,) for op in (
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare")})
# Ops whose output values do not depend on their inputs' values (only on shapes): the walk stops.
VALUE_BARRIERS = {"Shape", "Size", "ConstantOfShape", "EyeLike", "RandomNormalLike", "RandomUniformLike"}


def _all_nodes(graph: onnx.GraphProto):
    """Every node, Loop/If/Scan bodies included, with the names each node's outputs depend on: its
    inputs, plus for a node with subgraphs every name used inside them (outer-scope captures)."""
    for node in graph.node:
        deps = [i for i in node.input if i]
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                deps += [i for n in _all_nodes_flat(sub) for i in n.input if i]
                deps += [o.name for o in sub.output]
                yield from _all_nodes(sub)
        yield node, deps


def _all_nodes_flat(graph: onnx.GraphProto):
    for node, _ in _all_nodes(graph):
        yield node


def shape_input_uses(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, int]]:
    """{graph input: (node, operand index)} for every graph input (initializers excluded) whose values
    reach a shape-determining operand (SHAPE_OPERANDS) after model-local functions are inlined, in
    graph input order, each with the first operand found that it reaches (for messages). A dataflow
    walk backwards from each shape operand, through every op except VALUE_BARRIERS (Shape, Size, ...)
    and into Loop/If/Scan bodies (outer-scope captures)."""
    if model.functions:
        model = inliner.inline_local_functions(model, convert_version=True)
    graph = model.graph
    nodes = list(_all_nodes(graph))
    producer = {o: (n, deps) for n, deps in nodes for o in n.output if o}
    inits = {t.name for t in graph.initializer}
    inputs = [v.name for v in graph.input if v.name not in inits]
    stack = [(n.input[i], (n, i)) for n, _ in nodes if n.domain in ("", "ai.onnx")
             for i in SHAPE_OPERANDS.get(n.op_type, ()) if i < len(n.input) and n.input[i]]
    origin: dict[str, tuple[onnx.NodeProto, int]] = {}
    while stack:
        name, use = stack.pop()
        if name in origin:
            continue
        origin[name] = use
        if name in producer and producer[name][0].op_type not in VALUE_BARRIERS:
            stack.extend((dep, use) for dep in producer[name][1])
    return {name: origin[name] for name in inputs if name in origin}


def check_no_shape_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the graph inputs whose values reach a shape-determining operand (shape_input_uses), in
    graph input order; [] when every input is an ordinary (execution) tensor."""
    return list(shape_input_uses(model))

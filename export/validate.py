"""Post-export validation: run each exported graph in ONNX Runtime on shapes other than the traced
ones and compare with the eager modules it came from.

fp32: the graph must match eager within `tol` (relative to the output's scale). fp16: eager fp16
and ONNX Runtime fp16 round differently, so both are compared with an fp32 copy of the modules:
the graph's error must be within `tol` or within 3x eager fp16's own error, whichever is larger
(the copy costs twice the fp16 weights in memory; --no-validate skips it). Integer outputs (kept
positions) must equal eager's exactly in both cases."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from export.axes import VALIDATION_TEXT

log = logging.getLogger(__name__)


class ValidationError(RuntimeError):
    """An exported graph disagrees with eager PyTorch: says which stage, tensor and by how much."""


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _close(stage: str, name: str, got: np.ndarray, want: np.ndarray, tol: float, where: str,
           ref: np.ndarray | None = None) -> None:
    """`ref` (fp16 exports): the fp32 reference both `got` and `want` approximate."""
    if got.shape != want.shape:
        raise ValidationError(f"{stage}: {name} has shape {got.shape}, eager gives {want.shape} ({where})")
    if np.issubdtype(want.dtype, np.integer):
        if got.dtype != want.dtype:
            raise ValidationError(f"{stage}: {name} is {got.dtype} in the graph, eager gives {want.dtype} ({where})")
        if not np.array_equal(got, want):
            n = int((got != want).sum())
            raise ValidationError(f"{stage}: {name} differs from eager in {n} entries ({where})")
        return
    diff = lambda x, y: float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) if x.size else 0.0  # noqa: E731
    if ref is None:
        err = diff(got, want)
        scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
        if not err <= tol * scale:
            raise ValidationError(f"{stage}: {name} differs from eager PyTorch by max |diff| {err:.3g} > "
                                  f"{tol:g} x {scale:.3g} ({where})")
        return
    err, eager_err = diff(got, ref), diff(want, ref)
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    if not err <= max(tol * scale, 3 * eager_err):
        raise ValidationError(f"{stage}: {name} is {err:.3g} from the fp32 reference, eager fp16 is "
                              f"{eager_err:.3g} (allowed: max({tol:g} x {scale:.3g}, 3 x {eager_err:.3g})) ({where})")


def validate(out: Path, modules: dict, decls: dict, examples, dims: dict, counts_for, dtype, tol: float) -> None:
    """Raise ValidationError on the first mismatch. decls: {stage: export.declare.StageDecl};
    examples: the family's export.families.VisionExamples (validation inputs of the vision stage and
    the vision tokens per image of the validation prompt); `counts_for(L, text_after)` -> spec.Counts."""
    g = torch.Generator().manual_seed(1234)
    half = dtype == torch.float16
    refs = {k: copy.deepcopy(m).float() for k, m in modules.items()} if half else {}
    ref_of = lambda k, *args: refs[k](*args) if half else None  # noqa: E731
    with torch.no_grad():
        # vision encoder: the family's inputs at other sizes than traced
        vision = decls["vision_encoder"]
        sess = _session(out / vision.file)
        for inputs in examples.validate:
            where = ", ".join(f"{t.name} {list(x.shape)}" for t, x in zip(vision.inputs, inputs))
            want = _outputs(modules["vision_encoder"](*inputs))
            up = [x.float() if x.is_floating_point() else x for x in inputs]
            ref = _outputs(ref_of("vision_encoder", *up)) if half else [None] * len(want)
            got = sess.run(None, {t.name: x.numpy() for t, x in zip(vision.inputs, inputs)})
            for t, g_, w, r in zip(vision.outputs, got, want, ref):
                _close("vision_encoder", t.name, _as_compared(g_), _as_compared(w), tol, where,
                       None if r is None else r.float().numpy())

        # embed tokens: another length (a lookup: exact in any dtype)
        ids = torch.randint(0, dims["vocab_size"], (1, 29), generator=g, dtype=torch.int32)
        want = modules["embed_tokens"](ids).float().numpy()
        (got,) = _session(out / "embed_tokens.onnx").run(None, {"input_ids": ids.numpy()})
        _close("embed_tokens", "inputs_embeds", got.astype(np.float32), want, tol, "seq 29")

        # decoder: a prompt with a full image span, another length and quota than traced, then a
        # decode step on the pruned (ragged) cache
        flat = modules["decoder"]
        names_in, names_out = flat.input_names(), flat.output_names()
        sess = _session(out / "decoder.onnx")
        (a, after), L = VALIDATION_TEXT, examples.tokens
        S = a + L + after
        c = counts_for(L, after)
        span_len = L if c.prune else 0
        embeds = (torch.randn(1, S, dims["hidden_size"], generator=g) * 0.5).to(dtype)
        pos = _positions(flat, torch.arange(S, dtype=torch.int32))  # the family's layout: (1, S) or (3, 1, S)
        past = tuple(torch.zeros(1, dims["num_kv_heads"], 0, dims["head_dim"], dtype=dtype)
                     for _ in range(2 * dims["num_layers"]))
        kept = flat.decoder.kept_slots(1, S, a, span_len, c.quota)  # (1, S')
        step_inputs = [embeds, pos, *_ints(a, span_len, c.quota), kept]
        where = f"prefill S={S}, span [{a}, {a + L}), quota {c.quota}"
        up = lambda ts: [t.float() if t.is_floating_point() else t for t in ts]  # noqa: E731
        want = flat(*step_inputs, past)
        ref = ref_of("decoder", *up(step_inputs), tuple(up(past)))
        feeds = {n: t.numpy() for n, t in zip(names_in, [*step_inputs, *past])}
        got = sess.run(None, feeds)
        _compare_decoder(names_out, got, want, tol, where, ref, pruned_from=flat.decoder.layer)
        present = tuple(want[1:1 + len(flat.present_names())])  # the KV the decode step continues from

        step = [(torch.randn(1, 1, dims["hidden_size"], generator=g) * 0.5).to(dtype),
                _positions(flat, torch.tensor([S], dtype=torch.int32)), *_ints(0, 0, 0),
                flat.decoder.kept_slots(1, 1, 0, 0, 0)]
        want2 = flat(*step, present)
        ref2 = ref_of("decoder", *up(step), tuple(up(present)))
        feeds = {n: t.numpy() for n, t in zip(names_in, [*step, *present])}
        got2 = sess.run(None, feeds)
        _compare_decoder(names_out, got2, want2, tol, f"decode step at position {S}", ref2)
    log.info("validate: all stages match eager PyTorch (tolerance %g)", tol)


def _ints(*values: int) -> list[torch.Tensor]:
    """0-d int32 tensors: the decoder's span_start, span_len and quota (INDEX_DTYPE)."""
    return [torch.tensor(v, dtype=torch.int32) for v in values]


def _as_compared(x) -> np.ndarray:
    """An output as compared: integers exactly as they are, floats as float32 (numpy or torch in)."""
    if isinstance(x, torch.Tensor):
        x = x.numpy() if not x.is_floating_point() else x.float().numpy()
    return x if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)


def _outputs(result) -> list:
    """A module's output(s) as a list of tensors."""
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _positions(flat, pos: torch.Tensor) -> torch.Tensor:
    """Batch-1 position ids in the decoder's declared layout ([B, S] or M-RoPE's [3, B, S]), all
    rows equal (plain text positions; a family's own rule is checked by its runtime tests)."""
    shape = tuple(flat.decoder.text.position_shape)
    return pos.expand(3, 1, pos.numel()) if len(shape) == 3 else pos[None]


def _compare_decoder(names, got, want, tol, where, ref=None, pruned_from: int | None = None):
    """Every decoder output vs eager (and the fp32 reference for fp16). The integer outputs (which
    tokens DART kept) first: when they differ, that is the finding, not the KV computed from them.

    fp16 prefill (`ref` given, `pruned_from` = K): rounding may flip DART's choice between candidates
    whose cosine similarities differ by less than fp16 resolves (measured: 2 of 132 kept tokens of
    a 1176-token span on llava-next-tiny). Then the kept count must still be equal and at most
    max(2, 3 %) of the kept tokens may differ; the outputs computed from the kept tokens (logits, KV
    of layers >= K) are not compared, the KV of layers < K is, and the decode step that follows is
    compared in full (it continues from eager's cache)."""
    order = sorted(range(len(names)), key=lambda i: want[i].is_floating_point())
    flipped = False
    for i in order:
        name, g_, w = names[i], got[i], want[i]
        if flipped and (name == "logits" or _layer(name) >= pruned_from):
            continue
        w = _as_compared(w)
        if name == "kept_positions" and ref is not None and pruned_from is not None:
            flipped = _near_tie_flips(g_, w, where)
            if flipped:
                continue
        r = None if ref is None or np.issubdtype(w.dtype, np.integer) else ref[i].float().numpy()
        if r is not None and r.shape != w.shape:  # the fp32 reference kept other tokens: compare with eager only
            r = None
        if flipped and name == "image_pivots":  # pivots are chosen before the harvest: still exact
            r = None
        _close("decoder", name, _as_compared(g_), w, tol, where, r)


def _layer(name: str) -> int:
    """The layer of a present_key_i / present_value_i output (-1 for the others)."""
    return int(name.rsplit("_", 1)[1]) if name.startswith("present_") else -1


def _near_tie_flips(got: np.ndarray, want: np.ndarray, where: str) -> bool:
    """True when fp16 kept a few other tokens than eager fp16 (allowed, logged); False when equal;
    ValidationError when the count differs or more than max(2, 3 %) of the kept tokens do."""
    if np.array_equal(got, want):
        return False
    if got.shape != want.shape:
        raise ValidationError(f"decoder: kept_positions has shape {got.shape}, eager gives {want.shape} ({where})")
    flips = len(set(got.ravel().tolist()) - set(want.ravel().tolist()))
    allowed = max(2, int(0.03 * want.size))
    if flips > allowed:
        raise ValidationError(f"decoder: fp16 kept {flips} of {want.size} tokens other than eager fp16 (allowed "
                              f"{allowed} near-tie flips) ({where})")
    log.warning("validate: fp16 DART kept %d of %d tokens other than eager fp16 (near-equal similarities); the "
                "outputs computed from them are not compared (%s)", flips, want.size, where)
    return True

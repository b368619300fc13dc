"""Cases and the reference the tests of both DART ONNX ops share (tests/test_onnx_op.py for DartPrune,
tests/test_onnx_op_slots.py for DartPruneSlots): the ops a body must not hold, the reference
selection, inputs full of exact ties, the degenerate spans, and one ONNX Runtime
session per op configuration. (The golden file is conftest.py's `golden` fixture.)"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from dart_ops.reference import select_keep

FORBIDDEN = {"NonZero", "Loop", "If", "Scan"}

DEGENERATE = [  # (label, S, a, L, q)
    ("no image", 50, 10, 0, 5),
    ("no image at all, S tokens", 7, 0, 0, 3),
    ("span at the very end", 60, 10, 50, 3),
    ("fewer text tokens than pivots", 62, 10, 50, 3),
    ("L < pivots_image", 30, 5, 2, 3),
    ("L == pivots_image", 30, 5, 4, 3),
    ("L == pivots_image + 1", 30, 5, 5, 3),
    ("span_start 0", 60, 0, 40, 2),
    ("whole sequence is the span", 64, 0, 64, 4),
    ("single token span", 20, 5, 1, 2),
    ("quota 0", 80, 8, 60, 0),
    ("huge quota", 80, 8, 60, 10**9),
    ("negative quota counts as 0", 80, 8, 60, -4),
    ("P*T == L - P_img", 40, 2, 28, 3),
]


def reference(hidden, keys, a, L, q, pi, pt):
    """select_keep on the fp32 upcast of the inputs; a negative quota counts as 0 (the op clamps)."""
    h = torch.from_numpy(np.asarray(hidden, np.float32))
    k = torch.from_numpy(np.asarray(keys, np.float32))
    return select_keep(h, k, a, L, max(q, 0), pivots_image=pi, pivots_text=pt, order="canonical").numpy()


def tied_case(rng, S, batch=2, dim=16, key_dim=8, n_hidden=5, n_keys=6):
    """Inputs full of exact ties: hidden rows are power-of-two multiples of a few random +-1
    vectors (norms and cosines exact in fp32 and fp16: multiples of 1/dim) and key rows are a
    few small-integer vectors (exact L1 norms). Distinct cosines are checked to be far apart."""
    while True:
        signs = rng.choice([-1.0, 1.0], size=(batch, n_hidden, dim))
        scale = rng.choice([0.5, 1.0, 2.0], size=(batch, S, 1))
        which = rng.integers(0, n_hidden, size=(batch, S))
        hidden = np.stack([signs[b][which[b]] for b in range(batch)]) * scale  # (B, S, dim)
        pool = rng.integers(-3, 4, size=(batch, n_keys, key_dim)).astype(np.float64)
        keys = np.stack([pool[b][rng.integers(0, n_keys, size=S)] for b in range(batch)])
        unit = signs / np.linalg.norm(signs, axis=-1, keepdims=True)
        cos = np.unique(np.round(unit @ unit.transpose(0, 2, 1), 12))  # every pivot-token value
        if np.all(np.diff(cos) > 1e-4):
            return hidden.astype(np.float32), keys.astype(np.float32)


def session_cache(build):
    """get(*args, **kw): one ONNX Runtime CPU session per distinct arguments, over the model that
    build(*args, **kw) returns; reused for every later call with the same arguments."""
    cache = {}

    def get(*args, **kw):
        key = (args, tuple(sorted(kw.items())))
        if key not in cache:
            model = build(*args, **kw)
            cache[key] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return cache[key]

    return get

"""dart_ops.reference.select_keep: golden cases from the original code, and hand-built inputs."""

import numpy as np
import pytest
import torch
from conftest import DATA, GOLDEN_NAME, SHARED_GOLDEN, load_golden

from dart_ops.reference import select_keep
from dart_ops.spec import effective_counts

ORDERS = [("canonical", "keep_canonical"), ("cpython", "keep_cpython")]


def _check_golden(cases):
    assert len(cases) == 24
    for c in cases:
        for order, key in ORDERS:
            got = select_keep(
                torch.from_numpy(c["sim"]), torch.from_numpy(c["keys"]), c["a"], c["L"], c["T"],
                pivots_image=c["pi"], pivots_text=c["pt"], order=order,
            ).numpy()
            want = c[key]
            assert got.shape == want.shape and np.array_equal(got, want), (c["i"], c["label"], order)


def test_golden_copy_in_tests(golden_cases):
    _check_golden(golden_cases)


def test_golden_shared():
    """The same cases read from ../shared/golden (the authoritative copy)."""
    if not SHARED_GOLDEN.exists():
        pytest.skip(f"{SHARED_GOLDEN} is absent (plain clone without ../shared); tests/data copy covers it")
    assert SHARED_GOLDEN.read_bytes() == (DATA / GOLDEN_NAME).read_bytes(), (
        "tests/data golden copy differs from ../shared/golden: copy the shared file into tests/data"
    )
    _check_golden(load_golden(SHARED_GOLDEN))


def _onehot(i, d=8):
    v = torch.zeros(d)
    v[i] = 1.0
    return v


def test_obvious_case_opposites_first_duplicates_last():
    # S=10, span [1, 9), one text token after it (9); 1 image + 1 text pivot, T = 1.
    e0, e1 = _onehot(0), _onehot(1)
    hidden = torch.stack([e1] + [e0] * 8 + [e0])  # span: all duplicates of e0 ...
    hidden[6] = -e0  # ... except one opposite (cosine -1)
    hidden[5] = hidden[7] = e1  # ... and two orthogonal (cosine 0), tied
    keys = torch.ones(10, 4)
    keys[3] = 5.0  # token 3 has the largest L1 norm in the span: the image pivot
    keep = select_keep(hidden, keys, 1, 8, 1, pivots_image=1, pivots_text=1)
    # pivot 3 takes the opposite token 6; text pivot 9 (e0) takes the lower of the tied 5 and 7.
    assert keep.tolist() == [0, 3, 5, 6, 9]


def test_exact_duplicates_are_dropped_first():
    # Span of 12: 6 exact copies of the pivot direction, 6 distinct directions. With 2+0 pivots and
    # T = 3 the 6 distinct tokens are kept and the copies go (besides the pivots themselves).
    torch.manual_seed(0)
    base = torch.randn(16)
    distinct = torch.randn(6, 16) - 3 * base
    span = torch.cat([base.repeat(6, 1), distinct])[torch.randperm(12)]
    hidden = torch.cat([torch.randn(2, 16), span, torch.randn(3, 16)])
    keys = torch.rand(17, 4)
    dup_rows = [2 + i for i in range(12) if torch.equal(span[i], base)]
    keys[dup_rows[0]] += 10  # two copies of `base` are the image pivots
    keys[dup_rows[1]] += 9
    keep = select_keep(hidden, keys, 2, 12, 3, pivots_image=2, pivots_text=0).tolist()
    distinct_rows = [2 + i for i in range(12) if not torch.equal(span[i], base)]
    assert keep == sorted([0, 1] + dup_rows[:2] + distinct_rows + [14, 15, 16])


@pytest.mark.parametrize("seed", range(6))
def test_random_counts_sorted_unique(seed):
    g = torch.Generator().manual_seed(seed)
    S = int(torch.randint(20, 300, (), generator=g))
    a = int(torch.randint(0, S // 3, (), generator=g))
    L = int(torch.randint(0, S - a + 1, (), generator=g))
    T = int(torch.randint(0, 40, (), generator=g))
    pi, pt = int(torch.randint(0, 6, (), generator=g)), int(torch.randint(0, 6, (), generator=g))
    hidden, keys = torch.randn(S, 24, generator=g), torch.randn(S, 16, generator=g)
    keep = select_keep(hidden, keys, a, L, T, pivots_image=pi, pivots_text=pt)
    assert keep.dtype == torch.long
    assert len(keep) == effective_counts(L, S - a - L, T, pi, pt).kept_len(S)
    assert torch.equal(keep, torch.unique(keep))  # strictly ascending
    outside = [i for i in range(S) if not a <= i < a + L]
    assert set(outside) <= set(keep.tolist())  # text is never pruned


@pytest.mark.parametrize(
    "a,L,S,T",
    [(5, 0, 20, 8), (5, 3, 20, 8), (5, 4, 20, 8), (0, 20, 20, 2), (3, 17, 20, 1), (2, 10, 20, 500)],
    ids=["no-image", "span<pivots", "span==pivots", "all-span", "no-text-after", "huge-quota"],
)
def test_degenerate_spans(a, L, S, T):
    hidden, keys = torch.randn(S, 8), torch.randn(S, 8)
    keep = select_keep(hidden, keys, a, L, T)
    assert len(keep) == effective_counts(L, S - a - L, T).kept_len(S)
    if L <= 4:
        assert keep.tolist() == list(range(S))


def test_batch_equals_rows():
    torch.manual_seed(3)
    hidden, keys = torch.randn(3, 90, 16), torch.randn(3, 90, 12)
    batched = select_keep(hidden, keys, 7, 70, 5)
    assert batched.shape == (3, 7 + 4 + 8 * 5 + 13)
    for b in range(3):
        assert torch.equal(batched[b], select_keep(hidden[b], keys[b], 7, 70, 5))


def test_half_precision_inputs_computed_in_fp32(golden_cases):
    c = golden_cases[2]
    h16, k16 = torch.from_numpy(c["sim"]).half(), torch.from_numpy(c["keys"]).half()
    args = (c["a"], c["L"], c["T"])
    assert torch.equal(select_keep(h16, k16, *args), select_keep(h16.float(), k16.float(), *args))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda h, k: select_keep(h, k, 15, 10, 2), "does not fit"),
        (lambda h, k: select_keep(h, k, 0, 10, -1), "quota"),
        (lambda h, k: select_keep(h, k[:5], 0, 10, 1), "differ"),
        (lambda h, k: select_keep(h[0], k, 0, 10, 1), "both be"),
        (lambda h, k: select_keep(h, k, 0, 10, 1, order="set"), "order"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(20, 4), torch.randn(20, 4))

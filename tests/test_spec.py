"""dart_ops.spec: counts, config validation, CPython set order."""

import random

import pytest

from dart_ops.spec import DartConfig, cpython_set_order, effective_counts


def test_paper_setting_keeps_68_of_576():
    c = DartConfig(keep_ratio=0.111).counts(576, 60)
    assert (c.quota, c.kept_vision, c.kept_len(35 + 576 + 60)) == (8, 68, 35 + 68 + 60)
    assert c.prune
    assert DartConfig(keep_ratio=0.111).describe(576, 60) == "keep 68 of 576 vision tokens (T=8)"


@pytest.mark.parametrize("ratio,T,kept", [(0.333, 24, 196), (0.222, 16, 132), (0.111, 8, 68)])
def test_ratio_table_576(ratio, T, kept):
    c = DartConfig(keep_ratio=ratio).counts(576, 40)
    assert (c.quota, c.kept_vision) == (T, kept)


def test_ratio_one_means_no_pruning():
    c = DartConfig(keep_ratio=1.0).counts(576, 40)
    assert not c.prune and c.kept_vision == 576 and c.kept_len(700) == 700


def test_budget_mode_and_rounding():
    assert DartConfig(keep_ratio=None, budget=128).counts(576, 10).quota == 16
    # 0.5 * 5 = 2.5 rounds half up to 3 (not to even)
    assert DartConfig(keep_ratio=0.5).budget_for(5) == 3


def test_quota_clamped_to_span():
    # P*T <= L - P_img: 8 * T <= 60 - 4 -> T = 7
    c = effective_counts(60, 20, 100, 4, 4)
    assert (c.quota, c.kept_vision, c.prune) == (0, 60, False)  # whole span survives
    c = effective_counts(61, 20, 100, 4, 4)
    assert (c.quota, c.kept_vision, c.prune) == (7, 60, True)


@pytest.mark.parametrize(
    "L,after,T,expect",
    [
        (0, 10, 8, (0, 0, 0, 0)),  # no image
        (3, 10, 8, (0, 0, 0, 3)),  # span shorter than the image pivots: all kept
        (4, 10, 8, (0, 0, 0, 4)),  # span == image pivots: all pivots, nothing free
        (100, 2, 8, (4, 2, 8, 4 + 6 * 8)),  # fewer text tokens than text pivots
        (100, 0, 8, (4, 0, 8, 4 + 4 * 8)),  # no text after the span
        (100, 10, 0, (4, 4, 0, 4)),  # quota 0: only image pivots
    ],
)
def test_degenerate_counts(L, after, T, expect):
    c = effective_counts(L, after, T, 4, 4)
    assert (c.pivots_image, c.pivots_text, c.quota, c.kept_vision) == expect


def test_no_pivot_at_all_keeps_everything():
    c = effective_counts(50, 0, 8, 0, 4)
    assert not c.prune and c.kept_vision == 50


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(keep_ratio=0.0), r"keep_ratio must be in \(0, 1\]"),
        (dict(keep_ratio=1.5), r"keep_ratio must be in \(0, 1\]"),
        (dict(keep_ratio=float("nan")), "keep_ratio must be a number"),
        (dict(layer=0), "layer"),
        (dict(layer=-1), "layer"),
        (dict(pivots_image=-1), "pivots_image"),
        (dict(pivots_image=0, pivots_text=0), "at least one pivot"),
        (dict(pivots_image=9, pivots_text=8), "<= 16"),
        (dict(keep_ratio=0.5, budget=10), "exactly one"),
        (dict(keep_ratio=None, budget=-3), "budget"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DartConfig(**kwargs)


def test_effective_counts_rejects_negative():
    with pytest.raises(ValueError, match="quota"):
        effective_counts(10, 10, -1)


def test_cpython_set_order_matches_real_sets():
    rng = random.Random(0)
    for _ in range(3000):
        n = rng.choice([1, 2, 5, 8, 12, 16, 30])
        hi = rng.choice([20, 700, 5000])
        values = [rng.randrange(hi) for _ in range(n)]
        assert cpython_set_order(values) == list(set(values)), values


def test_with_ratio_keeps_layer_and_pivots_and_validates():
    cfg = DartConfig(layer=3, pivots_image=2, pivots_text=6, keep_ratio=None, budget=40)
    other = cfg.with_ratio(0.25)
    assert (other.layer, other.pivots_image, other.pivots_text, other.keep_ratio, other.budget) == (3, 2, 6, 0.25, None)
    with pytest.raises(ValueError, match=r"keep_ratio must be in \(0, 1\]"):
        cfg.with_ratio(1.5)

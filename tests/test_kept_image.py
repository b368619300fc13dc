"""runtime/kept_image.py: region maps (LLaVA-1.5 crop and pad, Qwen2-VL) cover what the model saw
exactly once, checked against the real preprocessing; render's pixels follow the documented rules
exactly; masks(); save()'s refusals."""

from __future__ import annotations

import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from runtime import kept_image as ki
from runtime.errors import InputError
from runtime.manifest import PreprocessSpec
from runtime.preprocess import preprocess
from runtime.qwen_preprocess import QwenPreprocessSpec, patchify, smart_resize

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as export/families/llava.py records them
STD = (0.26862954, 0.26130258, 0.27577711)
CROP = PreprocessSpec(336, False, "bicubic", 1 / 255, MEAN, STD, shortest_edge=336, center_crop=True)
PAD = PreprocessSpec(336, True, "bicubic", 1 / 255, MEAN, STD)
RAW = {"rescale": 1 / 255, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # pixel values = p / 255
COLOR = (200, 100, 50)
DIMMED = (60, 30, 15)  # (3 * p + 5) // 10
WASHED = (227, 177, 152)  # (p + 255) // 2


def coverage(panel: ki.Panel, width: int, height: int, max_side: int = 10_000) -> np.ndarray:
    """(h, w) int: how many of the panel's pixel rectangles cover each pixel of the displayed copy."""
    dw, dh = ki.display_size(width, height, max_side)
    count = np.zeros((dh, dw), np.int64)
    for x0, y0, x1, y1 in ki.pixel_rects(panel.boxes, dw / width, dh / height, dw, dh):
        count[y0:y1, x0:x1] += 1
    return count


# --- region maps -----------------------------------------------------------------------------------


def test_grid_boxes_row_major_and_shared_edges():
    b = ki.grid_boxes(10.0, 20.0, 110.0, 50.0, rows=3, cols=4)
    assert b.shape == (12, 4) and b.dtype == np.float64
    np.testing.assert_array_equal(b[0], [10.0, 20.0, 35.0, 30.0])
    np.testing.assert_array_equal(b[1 * 4 + 2], [60.0, 30.0, 85.0, 40.0])  # row 1, column 2
    np.testing.assert_array_equal(b[11], [85.0, 40.0, 110.0, 50.0])
    odd = ki.grid_boxes(0.1, 0.0, 100.0 / 3, 7.7, rows=7, cols=11).reshape(7, 11, 4)
    assert (odd[:, 1:, 0] == odd[:, :-1, 2]).all() and (odd[1:, :, 1] == odd[:-1, :, 3]).all()  # bit-equal
    assert (odd[:, 0, 0] == 0.1).all() and (odd[:, -1, 2] == 100.0 / 3).all() and (odd[-1, :, 3] == 7.7).all()
    with pytest.raises(ValueError, match="at least one row"):
        ki.grid_boxes(0, 0, 1, 1, 0, 3)


def test_llava_crop_covers_the_crop_square_once():
    (panel,) = ki.llava_panels(CROP, 640, 480, grid=24)
    np.testing.assert_array_equal(panel.tokens, np.arange(576))
    # resize 640x480 -> 448x336, crop at x 56: x 80..560 of the original, all of its height, 20 px cells
    np.testing.assert_array_equal(panel.boxes[0], [80.0, 0.0, 100.0, 20.0])
    np.testing.assert_array_equal(panel.boxes[575], [540.0, 460.0, 560.0, 480.0])
    count = coverage(panel, 640, 480)
    assert (count[:, 80:560] == 1).all() and (count[:, :80] == 0).all() and (count[:, 560:] == 0).all()
    assert panel.title == "576 tokens, 24x24 over the centre crop"
    for w, h, side in ((333, 500, 10_000), (1001, 701, 10_000), (1001, 701, 257)):  # odd sizes, downscaled
        (p,) = ki.llava_panels(CROP, w, h, grid=24)
        count = coverage(p, w, h, side)
        assert set(np.unique(count).tolist()) == {0, 1}  # 0 outside the crop (none of these is square)
        cols = np.flatnonzero(count.any(axis=0))
        rows = np.flatnonzero(count.any(axis=1))  # the union is one rectangle: the crop square
        assert (count[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] == 1).all()
        assert count.sum() == (rows[-1] + 1 - rows[0]) * (cols[-1] + 1 - cols[0])


def test_llava_pad_covers_the_image_once():
    (panel,) = ki.llava_panels(PAD, 640, 480, grid=24)
    np.testing.assert_array_equal(panel.tokens, np.arange(576))
    assert panel.boxes[:, 0].min() == 0.0 and panel.boxes[:, 2].max() == 640.0
    assert panel.boxes[:, 1].min() == -80.0 and panel.boxes[:, 3].max() == 560.0  # the padded square
    assert (coverage(panel, 640, 480) == 1).all()
    for w, h, side in ((333, 500, 10_000), (1001, 701, 257), (37, 51, 10_000)):
        (p,) = ki.llava_panels(PAD, w, h, grid=24)
        assert (coverage(p, w, h, side) == 1).all()
    assert panel.title == "576 tokens, 24x24 over the padded square"


@pytest.mark.parametrize("spec", [CROP, PAD], ids=["crop", "pad"])
def test_llava_cells_match_the_preprocessing(spec):
    """A white cell painted at a token's box on black comes out of preprocess() at that token's
    14x14 patch (the other cells stay dark)."""
    w, h = 640, 480
    (panel,) = ki.llava_panels(spec, w, h, grid=24)
    raw = PreprocessSpec(spec.image_size, spec.pad_to_square, "bicubic", shortest_edge=spec.shortest_edge,
                         center_crop=True, **RAW)
    for t in (24 * 5 + 7, 24 * 20 + 1):
        x0, y0, x1, y1 = np.floor(panel.boxes[t] + 0.5).astype(int)
        im = np.zeros((h, w, 3), np.uint8)
        im[max(y0, 0):y1, max(x0, 0):x1] = 255
        x = preprocess(im, raw)[0, 0]  # (336, 336) in 0..1
        r, c = divmod(t, 24)
        assert x[r * 14 + 3:r * 14 + 11, c * 14 + 3:c * 14 + 11].min() > 0.97
        x[r * 14 - 2:r * 14 + 16, c * 14 - 2:c * 14 + 16] = 0  # the cell and the bicubic overshoot round it
        assert np.abs(x).max() < 0.03


def test_qwen_blocks_cover_the_image_once_in_the_model_order():
    spec = QwenPreprocessSpec()
    w, h = 500, 333
    rh, rw = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
    gh, gw = rh // 14, rw // 14
    (panel,) = ki.qwen_panels(w, h, (rh, rw), (gh, gw), merge=2)
    n = (gh // 2) * (gw // 2)
    np.testing.assert_array_equal(panel.tokens, np.arange(n))
    assert panel.title == f"{n} tokens, {gh // 2}x{gw // 2} blocks of 28x28 px over the {rw}x{rh} resize"
    assert (coverage(panel, w, h) == 1).all() and (coverage(panel, w, h, 200) == 1).all()
    # token t's block, painted on black, is token t's 4 patches after the real resize + patchify
    t = (gh // 2 // 2) * (gw // 2) + 3
    x0, y0, x1, y1 = np.floor(panel.boxes[t] * [rw / w, rh / h, rw / w, rh / h] + 0.5).astype(int)
    resized = np.zeros((rh, rw, 3), np.float32)
    resized[y0:y1, x0:x1] = 1.0
    patches = patchify(resized, spec)  # (gh * gw, 1176), 4 rows per token
    assert (patches[4 * t:4 * t + 4] == 1).all() and patches.sum() == 4 * 1176
    with pytest.raises(ValueError, match="does not tile"):
        ki.qwen_panels(w, h, (rh, rw), (gh + 1, gw), merge=2)


def _next(w: int, h: int):
    from runtime.llava_next_preprocess import NextPreprocessSpec, layout

    lay = layout(h, w, NextPreprocessSpec())
    return lay, ki.next_panels(lay, w, h)


@pytest.mark.parametrize("w, h", [(672, 672), (640, 480), (333, 1000), (1000, 333), (37, 51)])
def test_llava_next_panels_cover_base_and_tiles_once(w, h):
    """Base: 24 x 24 over the whole image, tokens 0..575. Tiles: every kept map cell once, its token
    the pack order's offset; the newline tokens, and only they, have no region. An image of a
    pinpoint's aspect (672 x 672) is covered by the tiles exactly once."""
    lay, (base, tiles) = _next(w, h)
    np.testing.assert_array_equal(base.tokens, np.arange(576))
    assert (coverage(base, w, h) == 1).all()
    rows, cols = lay.rows[1] - lay.rows[0], lay.cols[1] - lay.cols[0]
    newlines = {576 + r * (cols + 1) + cols for r in range(rows)}
    assert len(tiles.tokens) == rows * cols == len(set(tiles.tokens.tolist()))
    assert set(tiles.tokens.tolist()) | newlines == set(range(576, lay.tokens))
    assert not set(tiles.tokens.tolist()) & newlines
    cov = coverage(tiles, w, h)
    assert cov.max() == 1  # no pixel in two tile cells
    if (w, h) == (672, 672):
        assert (cov == 1).all()
    else:  # unpadding keeps whole feature rows: at most one 14 px canvas row short of the image at each end
        assert cov.mean() > 0.9


@pytest.mark.parametrize("w, h", [(640, 480), (333, 1000)])
def test_llava_next_tile_cells_match_the_preprocessing(w, h):
    """A white tile cell painted on black comes out of the NeXT preprocessing in that token's crop, at
    its 14 x 14 patch (map position (r, c): crop 1 + (r // 24) * gw + c // 24)."""
    from runtime.llava_next_preprocess import NextPreprocessSpec
    from runtime.llava_next_preprocess import preprocess as next_preprocess

    lay, (_, tiles) = _next(w, h)
    cols, gw = lay.cols[1] - lay.cols[0], lay.tiles[1]
    raw = NextPreprocessSpec(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    for i in (len(tiles.tokens) // 3, len(tiles.tokens) // 2 + 7):
        off = int(tiles.tokens[i]) - 576
        r, c = lay.rows[0] + off // (cols + 1), lay.cols[0] + off % (cols + 1)
        x0, y0, x1, y1 = np.floor(tiles.boxes[i] + 0.5).astype(int)
        im = np.zeros((h, w, 3), np.uint8)
        im[max(y0, 0):y1, max(x0, 0):x1] = 255
        x = next_preprocess(im, raw)[0][1 + (r // 24) * gw + c // 24, 0]  # (336, 336)
        pr, pc = r % 24, c % 24
        assert x[pr * 14 + 4:pr * 14 + 10, pc * 14 + 4:pc * 14 + 10].min() > 0.9, (w, h, i)
        x[max(pr * 14 - 3, 0):pr * 14 + 17, max(pc * 14 - 3, 0):pc * 14 + 17] = 0
        assert np.abs(x).max() < 0.1


# --- render ----------------------------------------------------------------------------------------


def _checker(n: int = 576, cols: int = 24) -> np.ndarray:
    r, c = np.divmod(np.arange(n), cols)
    return (r + c) % 2 == 0


def test_dim_and_wash_rules_on_every_value():
    p = np.arange(256, dtype=np.uint8)
    want_dim = [math.floor(Fraction(3 * int(v), 10) + Fraction(1, 2)) for v in p]  # 0.3 p, half up
    np.testing.assert_array_equal(ki.dim(p), want_dim)
    np.testing.assert_array_equal(ki.wash(p), [(int(v) + 255) // 2 for v in p])
    assert ki.dim(p).dtype == ki.wash(p).dtype == np.uint8


def test_render_pixels_follow_the_rules():
    img = Image.new("RGB", (336, 336), COLOR)
    (panel,) = ki.llava_panels(CROP, 336, 336, grid=24)  # 14 px cells over the whole image
    kept = _checker()
    pivots = np.zeros(576, bool)
    pivots[[0, 24 * 5 + 7]] = True  # both kept cells
    out = ki.render(img, [panel], kept, pivots, "ratio 0.5: kept 288/576 vision tokens (2 pivots outlined)")
    assert out.mode == "RGB"
    assert out.size[1] == 2 * ki.MARGIN + ki.TITLE_H + 336 + ki.CAPTION_H  # image height grows
    a = np.asarray(out)
    top, left = ki.MARGIN + ki.TITLE_H, ki.MARGIN
    copy = a[top:top + 336, left:left + 336]
    want = np.empty((336, 336, 3), np.uint8)
    for t in range(576):
        r, c = divmod(t, 24)
        want[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = COLOR if kept[t] else DIMMED
    for t in np.flatnonzero(pivots):
        r, c = divmod(t, 24)
        cell = want[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14]
        cell[:2], cell[-2:], cell[:, :2], cell[:, -2:] = (ki.PIVOT_COLOR,) * 4
    np.testing.assert_array_equal(copy, want)  # every pixel of the copy
    assert tuple(copy[5 * 14 + 7, 7 * 14 + 7]) == COLOR  # a pivot's centre: untouched
    assert tuple(copy[5 * 14, 7 * 14 + 7]) == ki.PIVOT_COLOR and tuple(copy[5 * 14 + 1, 7 * 14 + 13]) == ki.PIVOT_COLOR
    assert tuple(copy[7, 14 + 7]) == DIMMED and tuple(copy[7, 2 * 14 + 7]) == COLOR
    title_band = a[ki.MARGIN:top]
    caption_band = a[top + 336:]
    assert (title_band < 128).any() and (caption_band < 128).any()  # text was drawn
    assert (a[:, :ki.MARGIN] == 255).all()  # the white margin


def test_render_washes_what_no_token_saw_and_lays_panels_side_by_side():
    img = Image.new("RGB", (448, 336), COLOR)
    (crop,) = ki.llava_panels(CROP, 448, 336, grid=24)  # the crop: x 56..392
    second = ki.Panel("all pruned", crop.boxes, crop.tokens)
    kept = np.ones(576, bool)
    out = np.asarray(ki.render(img, [crop, second], kept, np.zeros(576, bool), "c"))
    top = ki.MARGIN + ki.TITLE_H
    a = out[top:top + 336, ki.MARGIN:ki.MARGIN + 448]
    assert (a[:, :56] == WASHED).all() and (a[:, 392:] == WASHED).all() and (a[:, 56:392] == COLOR).all()
    x2 = ki.MARGIN + 448 + ki.GAP
    np.testing.assert_array_equal(out[top:top + 336, x2:x2 + 448], a)  # the second copy
    assert out.shape[1] == 2 * ki.MARGIN + 2 * 448 + ki.GAP


def test_render_downscales_and_covers_every_pixel():
    img = Image.new("RGB", (1000, 700), COLOR)
    (panel,) = ki.llava_panels(PAD, 1000, 700, grid=24)
    kept = np.zeros(576, bool)
    out = np.asarray(ki.render(img, [panel], kept, np.zeros(576, bool), "all pruned", max_side=500))
    top = ki.MARGIN + ki.TITLE_H
    assert out.shape[0] == 2 * ki.MARGIN + ki.TITLE_H + 350 + ki.CAPTION_H
    assert (out[top:top + 350, ki.MARGIN:ki.MARGIN + 500] == DIMMED).all()


def test_render_refuses_inconsistent_arguments():
    img = Image.new("RGB", (336, 336), COLOR)
    (panel,) = ki.llava_panels(CROP, 336, 336, grid=24)
    with pytest.raises(ValueError, match="outside the span of 100"):
        ki.render(img, [panel], np.ones(100, bool), np.zeros(100, bool), "c")
    with pytest.raises(ValueError, match="differ in length"):
        ki.render(img, [panel], np.ones(576, bool), np.zeros(5, bool), "c")
    with pytest.raises(ValueError, match="at least one panel"):
        ki.render(img, [], np.ones(576, bool), np.zeros(576, bool), "c")


# --- masks, save -----------------------------------------------------------------------------------


def test_masks_maps_sequence_indices_into_the_span():
    kept, piv = ki.masks(10, 5, [0, 1, 5, 7, 14, 15, 20], np.array([[7, 3, 15]]))
    np.testing.assert_array_equal(np.flatnonzero(kept), [0, 2, 9])
    np.testing.assert_array_equal(np.flatnonzero(piv), [2])
    kept, piv = ki.masks(3, 0, [], [])
    assert kept.shape == piv.shape == (3,) and not kept.any() and not piv.any()
    _, piv = ki.masks(3, 0, [1], None)
    assert not piv.any()


def test_save_writes_png_and_jpeg_and_refuses_bad_paths(tmp_path):
    img = Image.new("RGB", (20, 10), COLOR)
    ki.save(img, tmp_path / "k.png")
    with Image.open(tmp_path / "k.png") as back:
        assert back.format == "PNG" and (np.asarray(back) == COLOR).all()
    ki.save(img, tmp_path / "k.JPG")
    with Image.open(tmp_path / "k.JPG") as back:
        assert back.format == "JPEG" and back.size == (20, 10)
    cases = [(tmp_path / "missing" / "k.png", "directory .* does not exist"),
             (tmp_path, "it is a directory"),
             (tmp_path / "k.xyz", "Pillow cannot write '.xyz' files"),
             (tmp_path / "noext", "a name without a suffix")]
    for path, msg in cases:
        with pytest.raises(InputError, match=msg) as e:
            ki.save(img, path)
        assert "\n" not in str(e.value)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InputError, match="it is a directory"):
        ki.save(img, tmp_path / "dir.png")
    assert (tmp_path / "dir.png").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "k.JPG", "k.png"]


def test_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import runtime.kept_image")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- through the runtime --------------------------------------------------------------------------


def test_generate_output_draws_what_the_decoder_kept(tiny_engine):
    """llava-tiny at 0.111 on examples/sample.png (480 x 320, drawn at full size): inside every
    token's cell, kept tokens show the input pixels and pruned ones the dim rule; the 4 image
    pivots returned by the decoder are kept tokens; a text-only request has nothing to draw."""
    from pathlib import Path

    import runtime
    from runtime.steps import Request

    engine_dir, _ = tiny_engine
    pipe = runtime.load(engine_dir)
    path = Path(__file__).resolve().parents[1] / "examples" / "sample.png"
    out = pipe.generate("What is in the picture?", image=path, keep_ratio=0.111, max_new_tokens=2)
    src = np.asarray(Image.open(path).convert("RGB"))
    pic = np.asarray(out.kept_image())
    copy = pic[ki.MARGIN + ki.TITLE_H:ki.MARGIN + ki.TITLE_H + src.shape[0], ki.MARGIN:ki.MARGIN + src.shape[1]]
    (panel,) = pipe.rules.regions(pipe.prepare(Request("x", image=path)).vision)
    a = pipe.prepare(Request("What is in the picture?", image=path)).span[0]
    kept = {i - a for i in out.kept_positions if a <= i < a + 576}
    assert len(out.image_pivots) == 4 and {i - a for i in out.image_pivots} <= kept
    assert 0 < len(kept) < 576 // 4
    for t, (x0, y0, x1, y1) in zip(panel.tokens, np.floor(panel.boxes + 0.5).astype(int)):
        inner = (slice(y0 + 3, y1 - 3), slice(x0 + 3, x1 - 3))  # inside the cell, clear of pivot outlines
        want = src[inner] if t in kept else ki.dim(src[inner])
        assert np.array_equal(copy[inner], want), t
    with pytest.raises(InputError, match="nothing to draw"):
        pipe.generate("What is in the picture?", max_new_tokens=1).kept_image()


@pytest.mark.parametrize("argv, message", [
    (["--show-kept", "k.png"], "--show-kept needs --image"),
    (["--image", "x.png", "--show-kept", "k.txt"], "Pillow cannot write '.txt' files"),
    (["--image", "x.png", "--show-kept", "no/such/dir/k.png"], "directory no/such/dir does not exist"),
])
def test_show_kept_flag_errors_before_any_work(argv, message, capsys):
    from runtime.run import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--engine-dir", "e", "--prompt", "p", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err

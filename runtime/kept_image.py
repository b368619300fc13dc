"""What DART kept, as a picture (numpy + Pillow only).

A family says where each vision token looks: a list of Panels, each a set of boxes in the ORIGINAL
image's pixel coordinates (the RGB image the user gave, before any resize, crop or pad) with the
token each box belongs to (its offset in the image span, 0..L-1). render() draws one copy of the
image per panel, side by side:

    kept token's cell     pixels untouched
    pruned token's cell   pixel -> (3 * pixel + 5) // 10 per channel (0.3 x, rounded half up): DIM
    no token's cell       pixel -> (pixel + 255) // 2 per channel (washed out): pixels the model never
                          saw, e.g. outside LLaVA-1.5's centre crop
    image pivot           a 2-px outline of PIVOT_COLOR inside its cell (drawn over the cell)

Boxes become pixel rectangles by rounding each scaled edge half up (floor(x * scale + 0.5)) and
clipping to the displayed image; grid_boxes gives neighbouring cells bit-identical float edges, so
neighbours meet exactly: no pixel is shared and none is left between them. A pixel in a kept and a
pruned cell (overlapping boxes, which no family here produces) stays untouched.

Layout (white background, PIL's default font): MARGIN px around everything; a TITLE_H band above
the copies holds each panel's title; copy i sits at x = MARGIN + sum of earlier column widths +
i * GAP, y = MARGIN + TITLE_H (a column is as wide as its copy, or its title if that is wider); a
CAPTION_H band below the copies holds the caption. Region maps per family:

    LLaVA-1.5    llava_panels: a grid x grid cell grid over the processed square (the centre crop, or
                 the padded square), mapped back to the original image
    Qwen2-VL     qwen_panels: merge x merge patch blocks (28 x 28 px) over the resized image, mapped back
    LLaVA-NeXT   runtime/families/llava_next.py: the base grid over the whole image + the unpadded
                 tile grid (newline tokens have no region)
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from runtime.errors import InputError
from runtime.manifest import PreprocessSpec
from runtime.preprocess import resize_size

log = logging.getLogger(__name__)

PIVOT_COLOR = (255, 0, 255)  # magenta outline of an image pivot's cell
OUTLINE = 2  # px, drawn inside the cell
MARGIN = 8  # px of white around the picture
GAP = 8  # px between two copies
TITLE_H = 16  # px band above the copies (panel titles)
CAPTION_H = 18  # px band below the copies (the caption)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


@dataclass(frozen=True)
class Panel:
    """One copy of the image in the picture: box i (x0, y0, x1, y1 in original pixels, float64;
    may reach outside the image where the processor padded) is the region of the vision token at
    offset tokens[i] of the image span."""

    title: str  # e.g. "576 tokens, 24x24 over the centre crop"
    boxes: np.ndarray  # (n, 4) float64
    tokens: np.ndarray  # (n,) int64


# --- region maps -----------------------------------------------------------------------------------


def grid_boxes(x0: float, y0: float, x1: float, y1: float, rows: int, cols: int) -> np.ndarray:
    """(rows * cols, 4) float64: equal cells over the rectangle, row-major (cell r, c at r * cols + c).
    Neighbouring cells share bit-identical edges; the outer edges are exactly x0, y0, x1, y1."""
    if rows < 1 or cols < 1:
        raise ValueError(f"a grid needs at least one row and one column, got {rows}x{cols}")
    xs = _edges(x0, x1, cols)  # (cols + 1,)
    ys = _edges(y0, y1, rows)  # (rows + 1,)
    gx0, gy0 = np.meshgrid(xs[:-1], ys[:-1])  # (rows, cols) each
    gx1, gy1 = np.meshgrid(xs[1:], ys[1:])
    return np.stack([gx0, gy0, gx1, gy1], axis=-1).reshape(rows * cols, 4)


def _edges(a: float, b: float, n: int) -> np.ndarray:
    e = a + (b - a) * (np.arange(n + 1, dtype=np.float64) / n)  # (n + 1,)
    e[0], e[-1] = a, b
    return e


def llava_panels(spec: PreprocessSpec, width: int, height: int, grid: int) -> list[Panel]:
    """LLaVA-1.5: the grid x grid patch grid (image_size // 14; tokens.image_seq_len = grid^2) over
    the processed image_size square, in original coordinates, with runtime/preprocess.py's geometry:
    [pad to a centred square of the longer side] -> resize (shortest edge, or the square, to
    resize_edge) -> crop image_size^2 at ((resized - image_size) // 2)."""
    w, h, size = width, height, spec.image_size
    if spec.pad_to_square:
        side = max(w, h)
        ox, oy = (side - w) // 2, (side - h) // 2  # where expand2square pastes the image
        rw = rh = spec.resize_edge
        sx, sy = side / rw, side / rh  # canvas px per resized px
        where = "padded square" if rw == size else "centre crop of the padded square"
    else:
        ox = oy = 0
        rw, rh = resize_size(w, h, spec.resize_edge)
        sx, sy = w / rw, h / rh
        where = "centre crop"
    left, top = (rw - size) // 2, (rh - size) // 2  # the crop, in resized px
    x0, x1 = left * sx - ox, (left + size) * sx - ox
    y0, y1 = top * sy - oy, (top + size) * sy - oy
    boxes = grid_boxes(x0, y0, x1, y1, grid, grid)  # (grid^2, 4)
    return [Panel(f"{grid * grid} tokens, {grid}x{grid} over the {where}", boxes,
                  np.arange(grid * grid, dtype=np.int64))]


def qwen_panels(width: int, height: int, resized_hw: tuple[int, int], grid_hw: tuple[int, int],
                merge: int) -> list[Panel]:
    """Qwen2-VL / 2.5-VL: the image is resized to resized_hw (smart_resize), cut into grid_hw patches;
    a token is a merge x merge block of them, row-major over (gh / merge) x (gw / merge). The blocks
    tile the resized image, so in original coordinates they tile the whole image."""
    (rh, rw), (gh, gw) = resized_hw, grid_hw
    if gh % merge or gw % merge or rh % gh or rw % gw:
        raise ValueError(f"grid {gh}x{gw} (merge {merge}) does not tile a {rw}x{rh} resize")
    rows, cols = gh // merge, gw // merge
    bh, bw = rh // gh * merge, rw // gw * merge  # px per block side in the resized image
    boxes = grid_boxes(0.0, 0.0, float(width), float(height), rows, cols)  # (rows * cols, 4)
    title = f"{rows * cols} tokens, {rows}x{cols} blocks of {bw}x{bh} px over the {rw}x{rh} resize"
    return [Panel(title, boxes, np.arange(rows * cols, dtype=np.int64))]


def next_panels(lay, width: int, height: int) -> list[Panel]:
    """LLaVA-NeXT (runtime.llava_next_preprocess.NextLayout `lay` of a width x height image): the base
    crop's grid x grid tokens over the whole image (it is the image resized to a square, aspect not
    kept), and the tile tokens: the kept rows and columns of the tile feature map (a grid cell is
    crop / grid px of the pinpoint canvas, where the image was resized to fit and centred), mapped back
    through the resize. Token offsets follow the pack order: base, then per kept row its columns and
    a newline token, which has no region."""
    from runtime.llava_next_preprocess import patch_output_size

    g = lay.grid
    base = Panel(f"{g * g} base tokens, {g}x{g} over the whole image",
                 grid_boxes(0.0, 0.0, float(width), float(height), g, g), np.arange(g * g, dtype=np.int64))
    (bh, bw), (r0, r1), (c0, c1) = lay.best, lay.rows, lay.cols
    nh, nw = patch_output_size(height, width, lay.best)
    top, left = (bh - nh) // 2, (bw - nw) // 2  # where the resized image sits on the canvas
    cell = bh / (lay.tiles[0] * g)  # canvas px per map cell (crop / grid)
    sx, sy = width / nw, height / nh  # canvas px -> original px
    rows, cols = r1 - r0, c1 - c0
    if rows == 0 or cols == 0:
        return [base]
    boxes = grid_boxes((c0 * cell - left) * sx, (r0 * cell - top) * sy, (c1 * cell - left) * sx,
                       (r1 * cell - top) * sy, rows, cols)  # (rows * cols, 4)
    tokens = g * g + np.arange(rows)[:, None] * (cols + 1) + np.arange(cols)[None, :]  # (rows, cols)
    tiles = Panel(f"{rows * cols} tile tokens, {rows}x{cols} over the {lay.tiles[0]}x{lay.tiles[1]} tiles "
                  f"(+{rows} newline tokens)", boxes, tokens.reshape(-1).astype(np.int64))
    return [base, tiles]


# --- what was kept ---------------------------------------------------------------------------------


def masks(span_len: int, span_start: int, kept_positions: Iterable[int],
          pivot_positions: Iterable[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(kept (L,) bool, pivots (L,) bool) over the image span [span_start, span_start + L) from
    sequence indices of the unpruned prompt; indices outside the span are ignored."""

    def offsets(positions) -> np.ndarray:
        p = np.asarray(list(positions) if positions is not None else [], dtype=np.int64).reshape(-1)
        p = p - span_start
        return p[(p >= 0) & (p < span_len)]

    kept = np.zeros(span_len, dtype=bool)
    pivots = np.zeros(span_len, dtype=bool)
    kept[offsets(kept_positions)] = True
    pivots[offsets(pivot_positions)] = True
    return kept, pivots


# --- drawing ---------------------------------------------------------------------------------------


def display_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) of a copy: scaled down (never up) so the longer side is <= max_side, aspect kept."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def pixel_rects(boxes: np.ndarray, sx: float, sy: float, width: int, height: int) -> np.ndarray:
    """(n, 4) int64 pixel rectangles [x0, x1) x [y0, y1) of boxes (original px) in a copy scaled by
    (sx, sy) of size width x height: each edge floor(edge * scale + 0.5), clipped to the copy. A box
    outside the copy comes out empty (x0 >= x1 or y0 >= y1)."""
    scaled = np.asarray(boxes, np.float64) * np.array([sx, sy, sx, sy])  # (n, 4)
    r = np.floor(scaled + 0.5)
    r[:, 0::2] = np.clip(r[:, 0::2], 0, width)
    r[:, 1::2] = np.clip(r[:, 1::2], 0, height)
    return r.astype(np.int64)


def dim(pixels: np.ndarray) -> np.ndarray:
    """A pruned token's pixels: (3 * p + 5) // 10, i.e. 0.3 p rounded half up (uint8 in, uint8 out)."""
    return ((pixels.astype(np.int32) * 3 + 5) // 10).astype(np.uint8)


def wash(pixels: np.ndarray) -> np.ndarray:
    """Pixels no token covers: (p + 255) // 2 (uint8 in, uint8 out)."""
    return ((pixels.astype(np.int32) + 255) // 2).astype(np.uint8)


def draw_panel(copy: np.ndarray, rects: np.ndarray, tokens: np.ndarray, kept: np.ndarray,
               pivots: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8: `copy` with pruned cells dimmed, uncovered pixels washed out and pivots
    outlined; rects (n, 4) from pixel_rects, tokens (n,) their span offsets."""
    state = np.zeros(copy.shape[:2], np.int8)  # 0 no cell, 1 pruned, 2 kept (kept wins an overlap)
    for (x0, y0, x1, y1), t in zip(rects, tokens, strict=True):
        cell = state[y0:y1, x0:x1]
        np.maximum(cell, 2 if kept[t] else 1, out=cell)
    out = copy.copy()
    out[state == 1] = dim(copy[state == 1])
    out[state == 0] = wash(copy[state == 0])
    for (x0, y0, x1, y1) in rects[pivots[tokens]]:
        if x1 > x0 and y1 > y0:
            _outline(out, x0, y0, x1, y1)
    return out


def _outline(a: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> None:
    """A PIVOT_COLOR border OUTLINE px wide inside [x0, x1) x [y0, y1) of a (h, w, 3) array."""
    t = OUTLINE
    a[y0:min(y0 + t, y1), x0:x1] = PIVOT_COLOR
    a[max(y1 - t, y0):y1, x0:x1] = PIVOT_COLOR
    a[y0:y1, x0:min(x0 + t, x1)] = PIVOT_COLOR
    a[y0:y1, max(x1 - t, x0):x1] = PIVOT_COLOR


def render(image: Image.Image, panels: Sequence[Panel], kept: np.ndarray, pivots: np.ndarray, caption: str,
           max_side: int = 768) -> Image.Image:
    """The RGB picture (module doc): one copy of `image` (the image the panels were computed for, at
    its original size) per panel, each at most max_side px on its longer side, a title above each
    and `caption` below. kept, pivots: (L,) bool over the image span (masks())."""
    kept, pivots = np.asarray(kept, bool).reshape(-1), np.asarray(pivots, bool).reshape(-1)
    _check(panels, kept, pivots, max_side)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    w, h = rgb.size
    dw, dh = display_size(w, h, max_side)
    shown = rgb if (dw, dh) == (w, h) else rgb.resize((dw, dh), Image.Resampling.BICUBIC)
    base = np.asarray(shown)  # (dh, dw, 3) uint8
    sx, sy = dw / w, dh / h
    copies = [draw_panel(base, pixel_rects(p.boxes, sx, sy, dw, dh), p.tokens, kept, pivots) for p in panels]
    log.info("kept image: %d panel(s) of %dx%d, %d/%d vision tokens kept, %d pivots", len(panels), dw, dh,
             int(kept.sum()), kept.size, int(pivots.sum()))
    return _compose(copies, [p.title for p in panels], caption)


def _check(panels: Sequence[Panel], kept: np.ndarray, pivots: np.ndarray, max_side: int) -> None:
    """ValueError (a caller's bug, not a user's input) for inconsistent arguments."""
    if not panels:
        raise ValueError("render needs at least one panel")
    if kept.shape != pivots.shape:
        raise ValueError(f"kept {kept.shape} and pivots {pivots.shape} differ in length")
    if max_side < 16:
        raise ValueError(f"max_side must be >= 16, got {max_side}")
    for p in panels:
        boxes, tokens = np.asarray(p.boxes), np.asarray(p.tokens)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or tokens.shape != (boxes.shape[0],):
            raise ValueError(f"panel {p.title!r}: boxes {boxes.shape} and tokens {tokens.shape} do not match")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= kept.size):
            raise ValueError(f"panel {p.title!r}: token offsets {tokens.min()}..{tokens.max()} outside the "
                             f"span of {kept.size}")


def _compose(copies: list[np.ndarray], titles: list[str], caption: str) -> Image.Image:
    """White canvas: titles band, copies side by side, caption band (module doc's layout)."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(s: str) -> int:
        return int(np.ceil(probe.textlength(s, font=font)))

    dh = copies[0].shape[0]
    cols = [max(c.shape[1], text_w(t)) for c, t in zip(copies, titles, strict=True)]
    width = max(2 * MARGIN + sum(cols) + GAP * (len(cols) - 1), 2 * MARGIN + text_w(caption))
    height = 2 * MARGIN + TITLE_H + dh + CAPTION_H
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = MARGIN
    for copy, title, col in zip(copies, titles, cols, strict=True):
        canvas.paste(Image.fromarray(copy), (x, MARGIN + TITLE_H))
        draw.text((x, MARGIN + 1), title, fill=TEXT_COLOR, font=font)
        x += col + GAP
    draw.text((MARGIN, MARGIN + TITLE_H + dh + 4), caption, fill=TEXT_COLOR, font=font)
    return canvas


# --- writing ---------------------------------------------------------------------------------------


def path_problem(path: Path) -> str | None:
    """Why the picture cannot be written to `path` (None: it can), without touching the file: checked
    before any work (python -m runtime.run --show-kept) and again by save."""
    if path.is_dir():
        return "it is a directory; give a file name ending in .png or .jpg"
    if not path.parent.is_dir():
        return f"directory {path.parent} does not exist; create it first"
    ext = path.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        kind = f"'{ext}' files" if ext else "a name without a suffix"
        return f"Pillow cannot write {kind}; use a name ending in .png or .jpg"
    return None


def save(img: Image.Image, path: str | Path) -> Path:
    """Write the picture; the format follows the suffix (.png, .jpg, ... whatever Pillow writes).
    InputError (one line) for a directory, a missing parent directory or a suffix Pillow cannot
    write, or a failed write (the picture is encoded in memory first)."""
    path = Path(path)
    what = f"cannot write the kept-token picture to {path}"
    problem = path_problem(path)
    if problem:
        raise InputError(f"{what}: {problem}")
    fmt = Image.registered_extensions()[path.suffix.lower()]
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)  # encoded in memory first: a failure leaves no file behind
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{what}: Pillow cannot write this picture as {fmt} ({exc}); use .png or .jpg") from exc
    try:
        path.write_bytes(buf.getvalue())
    except OSError as exc:
        raise InputError(f"{what}: {exc.strerror or exc}") from exc
    log.info("kept image: wrote %s (%d bytes)", path, buf.tell())
    return path

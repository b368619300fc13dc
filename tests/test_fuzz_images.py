"""Seeded fuzzing of runtime.preprocess with broken and odd image files.

Small real files in many formats and modes (PNG, JPEG, GIF, BMP, WebP, TIFF, ICO, PPM, TGA) are
mutated with a fixed seed: random bytes, truncations, bit flips, overwritten spans, and header
sizes patched to extremes (0, 1, 65535, 2^31 - 1, random; PNG with and without a valid CRC). Every
case goes through preprocess(path), preprocess(PIL image opened lazily) and load_image(path).
The only outcomes allowed: an InputError with a one-line message, or a finite float32
(1, 3, S, S) array (an RGB PIL image for load_image). Anything else is a bug: another exception
type, a traceback-sized message, NaNs, a crash of the interpreter (the test would die with it).
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from runtime import InputError
from runtime.preprocess import load_image, preprocess

SEED = 20251129
N_CASES = 300
SIZE = 32  # a small vision input keeps each successful case cheap; the geometry is tested elsewhere
SPECS = [
    {"image_size": SIZE, "pad_to_square": False, "resample": "bicubic", "rescale": 1 / 255,
     "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "shortest_edge": 40, "center_crop": True},
    {"image_size": SIZE, "pad_to_square": True, "resample": "bilinear", "rescale": 1 / 255,
     "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
]
EXTREMES = [0, 1, 2, 7, 255, 256, 4097, 65535, 100_000, 2**31 - 1]


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _seeds(rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """(extension, bytes) of small valid files in many formats and modes."""
    rgb = Image.fromarray(rng.integers(0, 256, (17, 23, 3), np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (17, 23, 4), np.uint8))
    grey = rgb.convert("L")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    exif = rgb.getexif()
    exif[0x0112] = 6
    frames = [pal, pal.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return [
        (".png", _save(rgb, "PNG")), (".png", _save(rgba, "PNG")), (".png", _save(pal, "PNG")),
        (".png", _save(grey.convert("LA"), "PNG")), (".png", _save(rgb.convert("1"), "PNG")),
        (".png", _save(Image.fromarray(rng.integers(0, 65536, (9, 13)).astype(np.uint16)), "PNG")),
        (".jpg", _save(rgb, "JPEG", quality=90)), (".jpg", _save(rgb, "JPEG", progressive=True)),
        (".jpg", _save(rgb.convert("CMYK"), "JPEG")), (".jpg", _save(grey, "JPEG")),
        (".jpg", _save(rgb, "JPEG", exif=exif.tobytes())),
        (".gif", _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40)),
        (".bmp", _save(rgb, "BMP")), (".bmp", _save(pal.convert("P"), "BMP")),
        (".webp", _save(rgb, "WEBP", quality=80)), (".webp", _save(rgba, "WEBP", lossless=True)),
        (".tif", _save(rgb, "TIFF")), (".tif", _save(grey.convert("F"), "TIFF")),
        (".tif", _save(rgb.convert("CMYK"), "TIFF", compression="tiff_lzw")),
        (".ico", _save(rgba, "ICO")), (".ppm", _save(rgb, "PPM")), (".tga", _save(rgba, "TGA")),
    ]


def _patch_size(data: bytes, ext: str, rng: np.random.Generator) -> bytes:
    """Header width/height set to extreme values, where the format's header is simple."""
    b = bytearray(data)
    w, h = (int(rng.choice(EXTREMES)) if rng.random() < 0.7 else int(rng.integers(1, 70000))
            for _ in range(2))
    if ext == ".png":
        b[16:24] = struct.pack(">II", w, h)
        if rng.random() < 0.7:  # a valid CRC, so Pillow gets past the chunk check
            b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    elif ext == ".gif":
        b[6:10] = struct.pack("<HH", w & 0xFFFF, h & 0xFFFF)
    elif ext == ".bmp":
        top_down = -1 if rng.random() < 0.3 else 1  # a negative height is a top-down BMP
        b[18:26] = struct.pack("<ii", min(w, 2**31 - 1), min(h, 2**31 - 1) * top_down)
    elif ext == ".jpg" and (at := max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))) > 0:  # SOF0 / SOF2
        b[at + 5:at + 9] = struct.pack(">HH", h & 0xFFFF, w & 0xFFFF)
    else:
        return _flip(data, rng)
    return bytes(b)


def _flip(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 17))):
        i = int(rng.integers(0, len(b)))
        b[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def _mutate(data: bytes, ext: str, rng: np.random.Generator) -> tuple[str, bytes]:
    kind = int(rng.integers(0, 6))
    if kind == 0:
        return "random", rng.integers(0, 256, int(rng.integers(0, 3000)), np.uint8).tobytes()
    if kind == 1:
        return "truncated", data[: int(rng.integers(0, len(data)))]
    if kind == 2:
        return "bitflips", _flip(data, rng)
    if kind == 3:
        b = bytearray(data)
        i, n = int(rng.integers(0, len(b))), int(rng.integers(1, 64))
        b[i:i + n] = rng.integers(0, 256, n, np.uint8).tobytes()
        return "overwritten", bytes(b)
    if kind == 4:
        return "header-size", _patch_size(data, ext, rng)
    return "intact", data


def _outcome(fn, *args) -> str:
    """"ok" or "refused" for fn(*args); fails the test on anything else."""
    try:
        out = fn(*args)
    except InputError as e:
        message = str(e)
        assert message and "\n" not in message, repr(message)
        return "refused"
    if fn is preprocess:
        assert out.shape == (1, 3, SIZE, SIZE) and out.dtype == np.float32 and np.isfinite(out).all()
    else:
        assert isinstance(out, Image.Image) and out.mode == "RGB"
    return "ok"


@pytest.mark.filterwarnings("ignore")  # Pillow warns about some corrupt files; only outcomes matter here
def test_fuzzed_images_give_input_error_or_valid_pixels(tmp_path):
    rng = np.random.default_rng(SEED)
    seeds = _seeds(rng)
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for case in range(N_CASES):
        ext, data = seeds[case % len(seeds)]
        label, data = _mutate(data, ext, rng)
        path = tmp_path / f"case{case}{ext}"
        path.write_bytes(data)
        spec = SPECS[case % 2]
        where = f"case {case} ({label} {ext}, seed {SEED})"
        try:
            results = [_outcome(preprocess, path, spec), _outcome(load_image, path)]
            try:
                lazy = Image.open(path)  # Pillow's own open; decoding happens inside preprocess
            except Exception:  # noqa: BLE001 - not ours to judge: Pillow refused to open it
                lazy = None
            if lazy is not None:
                results.append(_outcome(preprocess, lazy, spec))
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from e
        except Exception as e:  # the bug this test exists to find
            raise AssertionError(f"{where}: {type(e).__name__}: {e}") from e
        assert results[0] == results[1], f"{where}: preprocess {results[0]} but load_image {results[1]}"
        counts[f"{label}:{results[0]}"] = counts.get(f"{label}:{results[0]}", 0) + 1
    ok = sum(n for k, n in counts.items() if k.endswith(":ok"))
    refused = sum(n for k, n in counts.items() if k.endswith(":refused"))
    # both outcomes happen often: the cases are neither all trivially valid nor all rejected at once
    assert ok >= 60 and refused >= 80, counts
    assert counts.get("intact:ok", 0) >= 30, counts
    assert time.perf_counter() - t0 < 60, "fuzz cases got slow; a decoder may have lost its bound"

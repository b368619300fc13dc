"""runtime.preprocess against the checkpoint's own Hugging Face image processor (PIL backend), for
both preprocessing styles: llava-tiny's CLIPImageProcessor (shortest edge 336 + center crop 336,
as llava-hf/llava-1.5-7b-hf declares) and LlavaImageProcessor(do_pad=True) (LLaVA's pad to square).

The reference for a path is what a transformers user gets from `processor(images=path)` (which is
`load_image(path)` then the processor); for a PIL image, `processor(images=image)`. Every pixel
value is compared with np.array_equal: the runtime resizes with the same Pillow calls (or, for
extreme sizes, with Pillow's own integer arithmetic) and rescales/normalises in the same float
order, so no tolerance is needed. The exporter's manifest entry (export.families.llava
.preprocess_spec) is what drives the runtime here, so the test covers export -> manifest -> runtime.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runtime.preprocess as pre
from runtime import EngineError, InputError
from runtime.manifest import PreprocessSpec, parse_preprocess

pytest.importorskip("transformers")
from transformers.image_utils import load_image as hf_load_image

from export.families.llava import CLIP_MEAN, CLIP_STD, preprocess_spec, tiny_pad_processor, tiny_processor

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample.png"
RNG_SEED = 7


def _variants() -> dict:
    """name -> HF image processor: the two styles at 336, and each with a resize of 380 before the
    336 crop (non-zero crop offsets) -- one of them bilinear, with rescale and normalise off."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    crop = {"height": 336, "width": 336}
    return {
        "crop": tiny_processor().image_processor,
        "pad": tiny_pad_processor().image_processor,
        "crop380-bilinear-raw": CLIPImageProcessor(size={"shortest_edge": 380}, crop_size=crop, resample=2,
                                                   do_rescale=False, do_normalize=False),
        "pad380": LlavaImageProcessor(do_pad=True, size={"shortest_edge": 380}, crop_size=crop,
                                      image_mean=CLIP_MEAN, image_std=CLIP_STD),
    }


@pytest.fixture(scope="module")
def variants():
    """name -> (HF processor, the manifest's preprocess dict the exporter writes for it)."""
    return {name: (ip, preprocess_spec(ip, 336)) for name, ip in _variants().items()}


def hf(ip, image) -> np.ndarray:
    return np.asarray(ip(images=image, return_tensors="np")["pixel_values"])  # (1, 3, S, S)


def _noise(rng, h, w, c=3):
    return rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def _exif_jpeg(path: Path, orientation: int, rng) -> Path:
    im = Image.fromarray(_noise(rng, 30, 50))
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), quality=95)
    return path


@pytest.fixture(scope="module")
def mode_files(tmp_path_factory) -> dict[str, Path]:
    """One small file per mode/format a user may hand in (all generated, no downloads)."""
    d = tmp_path_factory.mktemp("modes")
    rng = np.random.default_rng(RNG_SEED)
    rgba = np.dstack([_noise(rng, 40, 60), _noise(rng, 40, 60, 0)])
    rgba[:12, :, 3] = 0  # fully transparent band over non-black colours; the rest partly transparent
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756
    p_key = Image.fromarray(rng.integers(0, 4, (40, 60), np.uint8), "P")
    p_key.putpalette(palette)
    p_key.info["transparency"] = 1  # one transparent palette index
    p_alpha = p_key.copy()
    p_alpha.info["transparency"] = bytes([0, 128, 255, 40])  # per-entry alpha (tRNS bytes)
    l_key = Image.fromarray(_noise(rng, 40, 60, 0))
    l_key.info["transparency"] = int(np.asarray(l_key)[0, 0])
    rgb = _noise(rng, 40, 60)
    rgb_key = Image.fromarray(rgb)
    rgb_key.info["transparency"] = tuple(int(v) for v in rgb[0, 0])
    images = {
        "rgb.png": Image.fromarray(rgb), "rgb.bmp": Image.fromarray(rgb), "rgba.png": Image.fromarray(rgba),
        "rgba.webp": Image.fromarray(rgba), "la.png": Image.fromarray(rgba[..., 2:], "LA"),
        "p_key.png": p_key, "p_key.gif": p_key, "p_alpha.png": p_alpha, "l.png": Image.fromarray(rgb[..., 0]),
        "l_key.png": l_key, "rgb_key.png": rgb_key, "1.png": Image.fromarray(rgb[..., 0] > 128),
        "i16.png": Image.fromarray(rng.integers(0, 65536, (40, 60)).astype(np.uint16)),  # mode I;16
        "i16_low.png": Image.fromarray(rng.integers(0, 256, (40, 60)).astype(np.uint16)),
        "i32.tif": Image.fromarray(rng.integers(-50, 400, (40, 60)).astype(np.int32)),  # mode I
        "f32.tif": Image.fromarray(rng.normal(120, 90, (40, 60)).astype(np.float32)),  # mode F
        "cmyk.jpg": Image.fromarray(np.dstack([rgb, rgb[..., 0]]), "CMYK"),
    }
    files = {}
    for name, im in images.items():
        im.save(d / name, **({"lossless": True} if name.endswith(".webp") else {}))
        files[name] = d / name
    for orientation in (3, 6):
        files[f"exif{orientation}.jpg"] = _exif_jpeg(d / f"exif{orientation}.jpg", orientation, rng)
    return files


MODE_FILES = [
    "rgb.png", "rgb.bmp", "rgba.png", "rgba.webp", "la.png", "p_key.png", "p_key.gif", "p_alpha.png", "l.png",
    "l_key.png", "rgb_key.png", "1.png", "i16.png", "i16_low.png", "i32.tif", "f32.tif", "cmyk.jpg",
    "exif3.jpg", "exif6.jpg",
]


@pytest.mark.parametrize("name", MODE_FILES)
def test_modes_match_hf(name, mode_files, variants):
    """Every mode, by path and as a PIL image, for both styles: equal to the HF processor."""
    path = mode_files[name]
    for ip, spec in (variants["crop"], variants["pad"]):
        by_path = pre.preprocess(path, spec)
        assert by_path.shape == (1, 3, 336, 336) and by_path.dtype == np.float32
        np.testing.assert_array_equal(by_path, hf(ip, hf_load_image(str(path))))
        np.testing.assert_array_equal(pre.preprocess(Image.open(path), spec), hf(ip, Image.open(path)))
    if name == "rgb.png":  # processor(images=path) loads with load_image: the same reference
        ip, spec = variants["crop"]
        np.testing.assert_array_equal(pre.preprocess(path, spec), hf(ip, str(path)))


def test_alpha_exif_and_16bit_semantics(mode_files, variants, caplog):
    """The behaviours the equality above pins, stated directly (crop style, a 336 px image is not
    resized, so pixels are checkable by hand)."""
    _, spec = variants["crop"]
    rgba = np.zeros((336, 336, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)  # colour under alpha 0
    mean, std = np.float32(CLIP_MEAN), np.float32(CLIP_STD)
    white = (np.float32(255 * (1 / 255)) - mean) / std  # rescale in float64, then float32, as HF
    under = ((np.array([10, 200, 30]) * (1 / 255)).astype(np.float32) - mean) / std
    as_pil = pre.preprocess(Image.fromarray(rgba), spec)  # PIL: composited on white
    np.testing.assert_array_equal(as_pil[0, :, 5, 5], white)
    path = mode_files["rgba.png"].with_name("clear.png")
    Image.fromarray(rgba).save(path)
    by_path = pre.preprocess(path, spec)  # path: load_image's convert("RGB") drops alpha
    np.testing.assert_array_equal(by_path[0, :, 5, 5], under)
    # EXIF orientation 6 (rotate 90 degrees clockwise) is applied for paths, not for PIL images
    exif6 = mode_files["exif6.jpg"]
    upright = Image.open(exif6).transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(pre.preprocess(exif6, spec), pre.preprocess(upright, spec))
    assert not np.array_equal(pre.preprocess(exif6, spec), pre.preprocess(Image.open(exif6), spec))
    # 16-bit: Pillow clips to 255 (as for transformers): 40000 is white, 100 stays 100; logged
    i16 = np.full((336, 336), 40000, np.uint16)
    i16[:10, :10] = 100
    Image.fromarray(i16).save(path)
    with caplog.at_level(logging.WARNING, logger="runtime.preprocess"):
        x = pre.preprocess(path, spec)
    assert "mode I;16" in caplog.text
    assert (x[0, :, 20:, 20:] == white[:, None, None]).all()
    np.testing.assert_array_equal(x[0, :, 5, 5], ((np.float32(100 * (1 / 255)) - mean) / std))


GEOMETRY = [(1, 1), (5, 3), (3, 5), (336, 336), (337, 335), (480, 320), (320, 480), (2000, 7), (7, 2000),
            (901, 13)]


@pytest.mark.parametrize("w, h", GEOMETRY)
def test_geometry_matches_hf(w, h, variants):
    """Sizes from 1x1 to 2000:7 for all four processors (crop offsets, pad, upsampling)."""
    a = _noise(np.random.default_rng(w * 7919 + h), h, w)
    for ip, spec in variants.values():
        np.testing.assert_array_equal(pre.preprocess(a, spec), hf(ip, Image.fromarray(a)))


def _blocks(rng, h, w):
    """Hard-edged 0/255 blocks: bicubic overshoot is clipped, so the pass order shows."""
    cells = rng.integers(0, 2, (h // 9 + 1, w // 5 + 1, 3)).astype(np.uint8) * 255
    return np.kron(cells, np.ones((9, 5, 1), np.uint8))[:h, :w]


@pytest.mark.parametrize("w, h", [(1, 1), (2, 3), (3, 2), (480, 320), (320, 480), (2000, 7), (7, 2000),
                                  (40, 1500), (1500, 40), (97, 1301)])
def test_bounded_path_equals_pillow(w, h, variants, monkeypatch):
    """The bounded computation (used past MAX_IMAGE_PIXELS intermediates) forced on ordinary
    images gives exactly Pillow's result, for both styles, both orientations, up- and downsampling."""
    rng = np.random.default_rng(w * 31 + h)
    images = [_noise(rng, h, w), _blocks(rng, h, w)]
    specs = {name: spec for name, (_, spec) in variants.items()}
    want = {(name, i): pre.preprocess(a, spec) for name, spec in specs.items() for i, a in enumerate(images)}
    monkeypatch.setattr(pre, "_EXACT_PIXELS", 0)
    for (name, i), exact in want.items():
        np.testing.assert_array_equal(pre.preprocess(images[i], specs[name]), exact, err_msg=f"{name} {i}")


def test_exporter_records_the_processor(tiny_llava, tmp_path):
    """_loaded on llava-tiny records center crop (as the 7B checkpoint declares); with
    LlavaImageProcessor(do_pad=True) it records pad to square. Both parse, and drive the runtime to
    the numbers of the processor a user gets back with AutoProcessor.from_pretrained(checkpoint)
    on examples/sample.png."""
    from transformers import AutoProcessor

    from export.families import families

    family = families()["llava"]
    for processor, pad in ((tiny_processor(), False), (tiny_pad_processor(), True)):
        loaded = family.loaded("llava-tiny", tiny_llava, processor)
        assert loaded.preprocess == {
            "image_size": 336, "pad_to_square": pad, "resample": "bicubic", "rescale": 1 / 255,
            "mean": CLIP_MEAN, "std": CLIP_STD, "shortest_edge": 336, "center_crop": True,
        }
        spec = parse_preprocess(json.loads(json.dumps(loaded.preprocess)))  # through the manifest's JSON
        processor.save_pretrained(tmp_path / f"pad{pad}")
        reloaded = AutoProcessor.from_pretrained(tmp_path / f"pad{pad}").image_processor
        assert preprocess_spec(reloaded, 336) == loaded.preprocess
        np.testing.assert_array_equal(pre.preprocess(SAMPLE, spec), hf(reloaded, str(SAMPLE)))


def test_exporter_refuses_what_the_runtime_cannot_do():
    from transformers import CLIPImageProcessor

    base = {"size": {"shortest_edge": 336}, "crop_size": 336}
    for kwargs, message in (
        ({"size": {"height": 336, "width": 336}}, "resizes the shortest edge"),
        ({"do_resize": False}, "resize off"),
        ({"do_center_crop": False}, "no center crop"),
        ({"crop_size": {"height": 336, "width": 300}}, "crops a square"),
        ({"crop_size": 400}, "larger than the resize"),
        ({"resample": 0}, "resample nearest"),
        ({"do_convert_rgb": False}, "do_convert_rgb=False"),
    ):
        with pytest.raises(ValueError, match=message) as err:
            preprocess_spec(CLIPImageProcessor(**{**base, **kwargs}), 336)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="vision tower of 224"):
        preprocess_spec(CLIPImageProcessor(**base), 224)


def test_runtime_refuses_a_spec_it_cannot_run():
    spec = {"image_size": 336, "pad_to_square": False, "resample": "bicubic", "rescale": 1 / 255,
            "mean": CLIP_MEAN, "std": CLIP_STD, "shortest_edge": 336, "center_crop": True}
    img = np.zeros((4, 4, 3), np.uint8)
    for change, message in (({"resample": "nearest"}, "'preprocess.resample' must be one of bicubic, bilinear"),
                            ({"shortest_edge": 300}, "'preprocess.shortest_edge' 300 is smaller"),
                            ({"center_crop": False}, "'preprocess.center_crop' is false")):
        with pytest.raises(EngineError, match=message):  # a manifest's dict: refused while parsing
            pre.preprocess(img, {**spec, **change})
        direct = PreprocessSpec(**{**spec, "mean": tuple(CLIP_MEAN), "std": tuple(CLIP_STD), **change})
        with pytest.raises(EngineError, match=message):  # a spec built in code: refused by preprocess
            pre.preprocess(img, direct)
    old_manifest = PreprocessSpec(336, True, "bicubic", 1 / 255, tuple(CLIP_MEAN), tuple(CLIP_STD))
    assert old_manifest.resize_edge == 336 and old_manifest.center_crop  # pad, resize 336, crop = identity


# --- bounded memory --------------------------------------------------------------------------------

_CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
import numpy as np
from runtime.errors import InputError
from runtime.preprocess import preprocess
specs = json.loads(sys.argv[1])
out = {}
for path in sys.argv[2:]:
    for name, spec in specs.items():
        t = time.perf_counter()
        try:
            x = preprocess(path, spec)
            out[f"{path}|{name}"] = [list(x.shape), str(x.dtype), bool(np.isfinite(x).all()),
                                     float(x.std()), time.perf_counter() - t]
        except InputError as e:
            out[f"{path}|{name}"] = ["InputError", str(e), time.perf_counter() - t]
print(json.dumps(out))
"""


def _png_header(path: Path, w: int, h: int) -> Path:
    """A 1-bit PNG whose header says w x h, with a few bytes of pixel data: decoding it would fail
    ("truncated"), so a refusal that names the size limit was made from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_extreme_sizes_in_bounded_memory(tmp_path, variants):
    """30000x1, 100000x1, 1x30000 and 1x100000 PNGs (transformers would build a 10^10-pixel pad
    canvas, or a 336 x 33.6e6 resize before the crop) run for both styles under a 2 GiB
    address-space limit, each in well under 5 s (about 0.1 s here); images past MAX_IMAGE_PIXELS or
    MAX_IMAGE_SIDE are refused with one line from the header, before decoding."""
    rng = np.random.default_rng(RNG_SEED)
    paths = []
    for w, h in ((30000, 1), (100000, 1), (1, 30000), (1, 100000)):
        paths.append(tmp_path / f"{w}x{h}.png")
        Image.fromarray(_noise(rng, h, w)).save(paths[-1])
    over_pixels = _png_header(tmp_path / "9000x8000.png", 9000, 8000)  # 72e6 px: past our cap, not Pillow's
    bomb = _png_header(tmp_path / "30000x30000.png", 30000, 30000)  # past Pillow's DecompressionBombError
    over_side = _png_header(tmp_path / "300000x2.png", 300000, 2)
    specs = {name: spec for name, (_, spec) in variants.items() if name in ("crop", "pad")}
    env = {**os.environ, "PYTHONPATH": str(REPO), **{v: "1" for v in (
        "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(specs), *map(str, paths),
                           str(over_pixels), str(bomb), str(over_side)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    for path in paths:
        for name in specs:
            shape, dtype, finite, std, seconds = results[f"{path}|{name}"]
            assert (shape, dtype, finite) == ([1, 3, 336, 336], "float32", True), (path, name)
            assert std > 0 and seconds < 5, (path, name, std, seconds)
    refusals = ((over_pixels, "is 9000x8000 = 72000000 pixels, over the runtime's limit MAX_IMAGE_PIXELS"),
                (bomb, "decompression bomb .*MAX_IMAGE_PIXELS = 67108864"),
                (over_side, "is 300000x2, a side over the runtime's limit MAX_IMAGE_SIDE = 262144"))
    for path, message in refusals:
        for name in specs:
            kind, text, seconds = results[f"{path}|{name}"]
            assert kind == "InputError" and "\n" not in text and seconds < 1, (path, text, seconds)
            assert text.startswith((f"cannot read image {path}: ", f"image {path} is")), text
            assert re.search(message, text), text


def test_pixel_cap_for_pil_and_arrays(variants):
    _, spec = variants["crop"]
    with pytest.raises(InputError, match="image is 9000x8000 = 72000000 pixels, over .* MAX_IMAGE_PIXELS"):
        pre.preprocess(Image.new("1", (9000, 8000)), spec)
    big = np.broadcast_to(np.zeros(3, np.uint8), (8000, 9000, 3))  # no memory behind it
    with pytest.raises(InputError, match="image array is 9000x8000 = 72000000 pixels"):
        pre.preprocess(big, spec)
    with pytest.raises(InputError, match="a side over the runtime's limit MAX_IMAGE_SIDE"):
        pre.preprocess(np.broadcast_to(np.zeros(3, np.uint8), (1, 300000, 3)), spec)
    with pytest.raises(InputError, match="image array is 0x4: an image needs at least one pixel"):
        pre.preprocess(np.zeros((4, 0, 3), np.uint8), spec)

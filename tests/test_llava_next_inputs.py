"""LLaVA-NeXT inputs (runtime.llava_next_preprocess, export.families.llava_next_spec) against
transformers 5.24 itself:
- preprocess == LlavaNextImageProcessorPil's pixel_values (np.array_equal) on generated images of many
  sizes, RGBA / palette-transparency / grey / array / path inputs and examples/sample.png, for
  llava-v1.6's pinpoints and a custom list, and with bilinear, no rescale, no normalisation;
- the token count four ways: NextLayout.tokens, families.md's formula, len(pack_index), the prompt
  LlavaNextProcessor expands; and pack_index == LlavaNextModel.pack_image_features (the rows it
  packs, read back from features whose values are their row ids), also on a scan of sizes;
- token_range / crop_range reached and never passed in a scan; spec and processor-reading errors.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runtime.llava_next_preprocess as lnp
import runtime.preprocess as pre
from runtime.errors import InputError
from runtime.llava_next_preprocess import (
    DEFAULT_PINPOINTS,
    NextPreprocessSpec,
    crop_range,
    layout,
    pack_index,
    preprocess,
    select_best_resolution,
    token_range,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextModel,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.image_utils import load_image as hf_load_image

from export.families.llava import TINY_TOKENIZER
from export.families.llava_next_spec import default_image_processor, preprocess_spec

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample.png"
CUSTOM_PINPOINTS = [[336, 336], [1344, 336], [336, 1344], [672, 1008], [1008, 672]]
PROMPT = "<image>\nWhat is in the image?"


def _noise(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def _gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.dstack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256]).astype(np.uint8)


def _images() -> dict:
    """name -> PIL image, array or path (W x H in the names)."""
    rgba = np.dstack([_noise(60, 90, seed=1), _noise(60, 90, 0, seed=2)])
    rgba[:20, :, 3] = 0  # a fully transparent band over non-black colours; the rest partly transparent
    p = Image.fromarray(np.random.default_rng(3).integers(0, 4, (70, 50), np.uint8), "P")
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    p.info["transparency"] = 1  # one transparent palette index
    pil = Image.fromarray
    return {
        "37x51": pil(_noise(51, 37, seed=4)), "336x336": pil(_gradient(336, 336)),
        "640x480": pil(_noise(480, 640, seed=5)), "480x640": pil(_gradient(640, 480)),
        "1600x900": pil(_noise(900, 1600, seed=6)), "1000x333": pil(_gradient(333, 1000)),
        "333x1000": pil(_noise(1000, 333, seed=7)), "2000x2000": pil(_gradient(2000, 2000)),
        "672x672": pil(_noise(672, 672, seed=8)), "1x1": pil(_noise(1, 1, seed=9)),
        "3x200": pil(_noise(200, 3, seed=10)), "1008x1": pil(_noise(1, 1008, seed=11)),
        "rgba": pil(rgba), "p_key": p, "grey": pil(_noise(40, 300, 0, seed=12)),
        "array": _noise(123, 456, seed=13), "sample": SAMPLE,
    }


IMAGES = _images()


def _size(image) -> tuple[int, int]:
    """(height, width) of an entry of IMAGES."""
    if isinstance(image, np.ndarray):
        return image.shape[:2]
    if isinstance(image, Path):
        with Image.open(image) as im:
            return im.size[::-1]
    return image.size[::-1]


def _processor(ip) -> LlavaNextProcessor:
    """LlavaNextProcessor over `ip` with llava-tiny's tokenizer (<image> is one token), as a
    llava-v1.6 checkpoint sets it up (CLIP's CLS counted, then dropped: strategy "default")."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TINY_TOKENIZER), bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _custom_ip():
    ip = default_image_processor()
    ip.image_grid_pinpoints = CUSTOM_PINPOINTS
    return ip


def _hf_model(pinpoints) -> LlavaNextModel:
    """A tiny LlavaNextModel whose config has llava-v1.6's geometry (336 px, patch 14) and `pinpoints`;
    only its pack_image_features is used."""
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=8, intermediate_size=16,
                              num_hidden_layers=1, num_attention_heads=2)
    text = LlamaConfig(vocab_size=1024, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                          image_token_index=1023)
    return LlavaNextModel(cfg).eval()


@pytest.fixture(scope="module")
def setups():
    """name -> (processor, spec dict read from its image processor, tiny HF model)."""
    out = {}
    for name, ip in (("default", default_image_processor()), ("custom", _custom_ip())):
        out[name] = (_processor(ip), preprocess_spec(ip), _hf_model(ip.image_grid_pinpoints))
    return out


def hf_run(processor, image):
    """(pixel_values (crops, 3, 336, 336), number of image tokens in the expanded prompt)."""
    hf_image = hf_load_image(str(image)) if isinstance(image, Path) else image
    out = processor(text=PROMPT, images=hf_image, return_tensors="np")
    n = int((np.asarray(out["input_ids"]) == processor.image_token_id).sum())
    return np.asarray(out["pixel_values"])[0], n


def hf_packed_ids(model, lay) -> np.ndarray:
    """The feature rows LlavaNextModel.pack_image_features packs for an image of lay's size: features
    (crops, 576, 2) hold (row id, -row id), the newline (crops * 576, -crops * 576)."""
    n = lay.crops * lay.base_tokens
    ids = torch.arange(n, dtype=torch.float32).reshape(lay.crops, lay.base_tokens, 1)
    feats = torch.cat([ids, -ids], dim=-1)  # (crops, 576, 2)
    newline = torch.tensor([float(n), -float(n)])
    with torch.no_grad():
        packed, lens = model.pack_image_features([feats], torch.tensor([lay.original]), "default",
                                                 image_newline=newline)
    out = packed[0]  # (L, 2)
    assert torch.equal(out[:, 1], -out[:, 0]) and lens.tolist() == [out.shape[0]]
    return out[:, 0].numpy().astype(np.int64)


def notes_tokens(h, w, pinpoints, grid=24, crop=336) -> int:
    """families.md section 4's formula, written out independently."""
    bh, bw = hf_select_best_resolution((h, w), pinpoints)
    ch, cw = grid * bh // crop, grid * bw // crop
    if w / h > cw / ch:
        hh, ww = ch - 2 * ((ch - int(round(h * cw / w, 7))) // 2), cw
    else:
        hh, ww = ch, cw - 2 * ((cw - int(round(w * ch / h, 7))) // 2)
    return grid * grid + hh * (ww + 1)


# --- pixels and tokens, image by image -------------------------------------------------------------


@pytest.mark.parametrize("setup", ["default", "custom"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_pixels_and_tokens_equal_transformers(name, setup, setups):
    processor, spec, model = setups[setup]
    image = IMAGES[name]
    want, n_prompt = hf_run(processor, image)
    got, lay = preprocess(image, spec)
    # one image: no batch padding, so the processor's crops are exactly this image's
    assert got.dtype == np.float32 and got.shape == want.shape == (lay.crops, 3, 336, 336)
    assert np.array_equal(got, want)
    h, w = _size(image)
    assert lay.original == (h, w)
    idx = pack_index(lay)
    assert idx.dtype == np.int32  # the vision graph's Gather indices (docs/TENSORRT_10.3.md section 7)
    assert lay.tokens == len(idx) == n_prompt == notes_tokens(h, w, processor.image_processor.image_grid_pinpoints)
    assert np.array_equal(idx, hf_packed_ids(model, lay))


def test_notes_examples():
    """families.md section 4's counts (W x H)."""
    want = {(672, 672): 2928, (640, 480): 2340, (1600, 900): 1948, (480, 320): 1464, (336, 336): 1176,
            (1000, 333): 2328, (333, 1000): 2376, (2000, 2000): 2928}
    got = {(w, h): layout(h, w, NextPreprocessSpec()).tokens for w, h in want}
    assert got == want


def test_layout_of_examples():
    """The geometry behind a few counts: pinpoint, tiles, the kept window of the 48 x 48 (or 24 x 72)
    map. A 1008 x 1 image unpads to no row at all (the base alone); a 1 x 1008 one to no column,
    each of its 72 rows still ending in a newline."""
    spec = NextPreprocessSpec()
    got = {(w, h): (lay.best, lay.tiles, lay.rows, lay.cols, lay.crops, lay.tokens)
           for w, h in [(640, 480), (480, 320), (1008, 1), (1, 1008), (1009, 1)] for lay in [layout(h, w, spec)]}
    assert got == {
        (640, 480): ((672, 672), (2, 2), (6, 42), (0, 48), 5, 576 + 36 * 49),
        (480, 320): ((336, 672), (1, 2), (0, 24), (6, 42), 3, 576 + 24 * 37),
        (1008, 1): ((336, 1008), (1, 3), (12, 12), (0, 72), 4, 576),
        (1, 1008): ((1008, 336), (3, 1), (0, 72), (12, 12), 4, 576 + 72),
        (1009, 1): ((336, 672), (1, 2), (12, 12), (0, 48), 3, 576),  # no pinpoint keeps a row: least waste
    }


def test_pack_index_by_hand():
    """640 x 480: base 0..575, then map row 6 (crop 1 row 6, crop 2 row 6), newline 2880, ..."""
    idx = pack_index(layout(480, 640, NextPreprocessSpec()))
    assert np.array_equal(idx[:576], np.arange(576))
    row6 = np.concatenate([576 + 6 * 24 + np.arange(24), 2 * 576 + 6 * 24 + np.arange(24), [2880]])
    assert np.array_equal(idx[576:576 + 49], row6)
    last = np.concatenate([3 * 576 + 17 * 24 + np.arange(24), 4 * 576 + 17 * 24 + np.arange(24), [2880]])
    assert np.array_equal(idx[-49:], last)  # map row 41: crops 3, 4, patch row 17


def test_bilinear_without_rescale_or_normalise():
    """Other processor settings: bilinear, do_rescale and do_normalize off (HF's pixels stay uint8;
    the values are equal)."""
    ip = LlavaNextImageProcessorPil(size={"height": 336, "width": 336}, crop_size=None, do_center_crop=False,
                                    resample=2, do_rescale=False, do_normalize=False,
                                    image_grid_pinpoints=CUSTOM_PINPOINTS)
    spec = preprocess_spec(ip)
    assert (spec["resample"], spec["rescale"], spec["mean"], spec["std"], spec["shortest_edge"]) == \
        ("bilinear", 1.0, [0.0] * 3, [1.0] * 3, 336)
    for name in ("640x480", "333x1000", "rgba", "sample"):
        image = IMAGES[name]
        want = ip(images=hf_load_image(str(image)) if isinstance(image, Path) else image,
                  return_tensors="np")["pixel_values"][0]
        assert np.array_equal(preprocess(image, spec)[0], want), name


def test_alpha_is_composited_on_white():
    """A fully transparent pixel becomes white, not its hidden colour (pitfall 5)."""
    rgba = np.zeros((336, 672, 4), np.uint8)  # transparent black; exactly the (336, 672) pinpoint
    x, lay = preprocess(Image.fromarray(rgba), dict(NextPreprocessSpec().to_json(), rescale=1 / 255,
                                                    mean=[0.0] * 3, std=[1.0] * 3))
    assert lay.best == (336, 672) and np.all(x == np.float32(1.0))


# --- a scan of sizes --------------------------------------------------------------------------------


def _scan_sizes() -> list[tuple[int, int]]:
    """(h, w): a geometric grid 1 .. 8500 px both ways, and the extreme aspects 1 x n, n x 1, 2 x n."""
    sides = sorted({round(1.19 ** k) for k in range(53)} | {335, 336, 337, 671, 672, 673, 1007, 1008, 1009})
    sizes = {(h, w) for h in sides for w in sides}
    for n in range(1, 3001):
        sizes |= {(1, n), (n, 1), (2, n), (n, 2)}
    return sorted(sizes)


SCAN = _scan_sizes()


@pytest.mark.parametrize("setup", ["default", "custom"])
def test_scan_counts_and_ranges(setup, setups):
    """Every size of the scan: our layout equals transformers' processor count and select_best_resolution;
    the fewest and most tokens and crops are token_range / crop_range, reached."""
    processor, spec, _ = setups[setup]
    pinpoints = processor.image_processor.image_grid_pinpoints
    tokens, crops = [], []
    for h, w in SCAN:
        lay = layout(h, w, spec)
        assert select_best_resolution(h, w, pinpoints) == hf_select_best_resolution((h, w), pinpoints)
        assert lay.tokens == processor._get_number_of_features(h, w, 336, 336) - 1, (h, w)
        tokens.append(lay.tokens)
        crops.append(lay.crops)
    assert (min(tokens), max(tokens)) == token_range(spec)
    assert (min(crops), max(crops)) == crop_range(spec)


def test_ranges():
    """(576, 2928) tokens and (3, 5) crops at llava-v1.6's pinpoints; the custom list: a 336 x 336
    pinpoint gives 2 crops, 1008 x 672 (3 x 2 crops, a 72 x 48 map) the most tokens. With an odd
    grid (27 per side) the fewest is a parity bound: a 54-row map may unpad to 0 rows."""
    assert token_range(NextPreprocessSpec()) == (576, 2928)
    assert crop_range(NextPreprocessSpec()) == (3, 5)
    custom = NextPreprocessSpec(pinpoints=CUSTOM_PINPOINTS)
    assert token_range(custom) == (576, 576 + 72 * 49) and crop_range(custom) == (2, 7)
    odd = NextPreprocessSpec(crop_size=378, shortest_edge=378, pinpoints=((378, 756), (756, 378)))
    assert odd.grid == 27 and token_range(odd) == (729, 729 + 54 * 28)


@pytest.mark.parametrize("setup", ["default", "custom"])
def test_pack_index_equals_transformers_on_extreme_sizes(setup, setups):
    """pack_index == pack_image_features on the sizes of the scan that unpad most (0, 1 or 2 rows or
    columns kept) and a spread of others."""
    _, spec, model = setups[setup]
    lays = [layout(h, w, spec) for h, w in SCAN]
    thin = [lay for lay in lays if min(lay.rows[1] - lay.rows[0], lay.cols[1] - lay.cols[0]) <= 2]
    picked = thin[::max(1, len(thin) // 40)] + lays[::max(1, len(lays) // 40)]
    assert any(lay.tokens == 576 for lay in picked)
    for lay in picked:
        assert np.array_equal(pack_index(lay), hf_packed_ids(model, lay)), lay


# --- bounds -----------------------------------------------------------------------------------------


def test_narrow_tall_image(setups):
    """1 x 200000 px: the base resize runs Pillow's vertical pass first (Pillow 13), or the bounded
    resampler (earlier Pillow, whose horizontal pass would hold 336 x 200000 px); equal either way."""
    processor, spec, model = setups["default"]
    image = Image.fromarray(_noise(200000, 1, seed=14))
    want, n = hf_run(processor, image)
    got, lay = preprocess(image, spec)
    assert np.array_equal(got, want) and lay.tokens == n == 576 + 24
    assert np.array_equal(pack_index(lay), hf_packed_ids(model, lay))


def test_pillow_pass_order_probe():
    """Pillow 13 introduced the vertical-pass-first order (12.1's Resample.c has no such branch)."""
    major = int(Image.__version__.split(".")[0])
    assert lnp._pillow_orders_passes() == (major >= 13)


@pytest.mark.parametrize("name", ["37x51", "640x480", "1600x900", "333x1000", "3x200", "2000x2000"])
def test_bounded_base_equals_horizontal_first_pillow(name, setups, monkeypatch):
    """The bounded path (taken past _EXACT_PIXELS when Pillow runs the horizontal pass first) forced on
    ordinary images: the base equals Pillow's horizontal-then-vertical resize, the tiles the processor's."""
    processor, spec, _ = setups["default"]
    image = IMAGES[name]
    want, _ = hf_run(processor, image)
    pillow_vertical_first = lnp._vertical_pass_first(image.size, (336, 336))
    monkeypatch.setattr(pre, "_EXACT_PIXELS", 0)
    monkeypatch.setattr(lnp, "_pillow_orders_passes", lambda: False)
    got, _ = preprocess(image, spec)
    assert np.array_equal(got[1:], want[1:])
    bicubic = Image.Resampling.BICUBIC
    two_pass = np.asarray(image.resize((336, image.height), bicubic).resize((336, 336), bicubic))
    base = ((two_pass.astype(np.float64) / 255).astype(np.float32) - np.float32(spec["mean"])) / \
        np.float32(spec["std"])
    assert np.array_equal(got[0], base.transpose(2, 0, 1))
    if not pillow_vertical_first:
        assert np.array_equal(got[0], want[0])  # this Pillow also runs the horizontal pass first here


def test_bad_images():
    spec = NextPreprocessSpec()
    with pytest.raises(InputError, match="positive integers"):
        layout(0, 5, spec)
    with pytest.raises(InputError, match="MAX_IMAGE_SIDE"):
        preprocess(Image.new("RGB", (1, pre.MAX_IMAGE_SIDE + 1)), spec)
    with pytest.raises(InputError, match="at least one pixel"):
        preprocess(np.zeros((0, 4, 3), np.uint8), spec)


# --- specs ------------------------------------------------------------------------------------------


def test_spec_json_round_trip():
    spec = NextPreprocessSpec()
    raw = spec.to_json()
    assert "kind" not in raw and raw["pinpoints"] == [list(p) for p in DEFAULT_PINPOINTS]
    assert NextPreprocessSpec.from_json(json.loads(json.dumps(raw))) == spec and spec.grid == 24
    listed = NextPreprocessSpec(pinpoints=[[336, 672]], mean=[0.5] * 3, std=[0.5] * 3)  # lists -> tuples
    assert listed.pinpoints == ((336, 672),) and listed.mean == (0.5,) * 3 and hash(listed)


_DROP = object()


def _mutated(**changes) -> dict:
    raw = NextPreprocessSpec().to_json()
    for key, value in changes.items():
        if value is _DROP:
            del raw[key]
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("raw, message", [
    ([], "expected an object"),
    (_mutated(patch=_DROP), r"missing \['patch'\]"),
    (_mutated(kind="llava_next"), r"unknown \['kind'\]"),
    (_mutated(crop_size="336"), "crop_size must be a positive integer"),
    (_mutated(crop_size=True), "crop_size must be a positive integer"),
    (_mutated(patch=0), "patch must be a positive integer"),
    (_mutated(crop_size=330, shortest_edge=330), "multiple of patch 14"),
    (_mutated(shortest_edge=224), "shortest_edge 224 != crop_size 336"),
    (_mutated(pinpoints=[]), "non-empty"),
    (_mutated(pinpoints="336x672"), "list of \\[height, width\\] pairs"),
    (_mutated(pinpoints=[336, 672]), "list of \\[height, width\\] pairs"),
    (_mutated(pinpoints=[[336]]), "not a \\[height, width\\] pair"),
    (_mutated(pinpoints=[[336, -672]]), "not a \\[height, width\\] pair"),
    (_mutated(pinpoints=[[336, 672.0]]), "not a \\[height, width\\] pair"),
    (_mutated(pinpoints=[[336, 500]]), "not a multiple of crop_size 336"),
    (_mutated(pinpoints=[[336 * 9, 336 * 8]]), "over the runtime's limits"),
    (_mutated(crop_size=1008, shortest_edge=1008, pinpoints=[[1008 * 5, 1008 * 4]]), "over the runtime's limits"),
    (_mutated(mean=[0.5, 0.5]), "mean must be 3 finite numbers"),
    (_mutated(mean="0.5"), "mean must be a list of 3 numbers"),
    (_mutated(std=[1.0, 0.0, 1.0]), "std must be positive"),
    (_mutated(std=[1.0, math.nan, 1.0]), "std must be 3 finite numbers"),
    (_mutated(rescale=0), "rescale must be a positive finite number"),
    (_mutated(resample="lanczos"), "resample 'lanczos' is not one the runtime reproduces"),
])
def test_spec_errors(raw, message):
    with pytest.raises(ValueError, match=message) as info:
        NextPreprocessSpec.from_json(raw)
    assert "\n" not in str(info.value) and str(info.value).startswith("LLaVA-NeXT preprocess spec: ")


def test_default_processor_spec():
    """llava-v1.6-mistral-7b-hf's preprocessing is the spec's defaults."""
    assert preprocess_spec(default_image_processor()) == NextPreprocessSpec().to_json()


@pytest.mark.parametrize("settings, message", [
    ({"do_convert_rgb": False}, "do_convert_rgb=False"),
    ({"size": {"shortest_edge": 224}}, "size 224 != crop_size 336"),
    ({"size": {"shortest_edge": 448}, "do_center_crop": False}, "size 448 != crop_size 336 .*left at 336"),
    ({"size": {"height": 336, "width": 672}}, re.escape("size {'height': 336, 'width': 672} is not a square side")),
    ({"size": {"shortest_edge": 336, "longest_edge": 672}}, "is not a square side"),
    ({"crop_size": {"height": 336, "width": 300}}, "crop_size .* is not a square side"),
    ({"resample": 0}, "resample nearest"),
    ({"resample": 1}, "resample lanczos"),
    ({"image_grid_pinpoints": [[500, 672]]}, r"pinpoint \[500, 672\] is not a multiple of crop_size 336"),
    ({"image_grid_pinpoints": []}, "pinpoints must be a non-empty list"),
])
def test_preprocess_spec_refuses(settings, message):
    ip = default_image_processor()
    for key, value in settings.items():
        setattr(ip, key, value)
    with pytest.raises(ValueError, match=message) as info:
        preprocess_spec(ip)
    assert "\n" not in str(info.value) and str(info.value).startswith("LlavaNextImageProcessorPil: ")


def test_runtime_module_is_torch_free():
    code = """
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
import numpy as np
from runtime.llava_next_preprocess import NextPreprocessSpec, pack_index, preprocess, token_range
x, lay = preprocess(np.zeros((480, 640, 3), np.uint8), NextPreprocessSpec().to_json())
bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m]]
assert not bad, bad
print(x.shape, lay.tokens, len(pack_index(lay)), token_range(NextPreprocessSpec()))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(5, 3, 336, 336) 2340 2340 (576, 2928)"

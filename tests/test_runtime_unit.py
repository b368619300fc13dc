"""Unit tests of the torch-free runtime, with no exported engine: tiny engine directories are built
here from onnx.helper graphs (a fake decoder with the real interface), a WordLevel tokenizer and a
hand-written manifest.

The fake decoder (K = 1, two layers, one KV head) "prunes" like DART's interface says: it keeps
the text, plus the first pivots_image + P * quota vision tokens of the span. Its logits mix the
last fed token, the mean of layer 0's KV (every token so far: the KV plumbing), layer 1 minus
layer 0 KV sums (the pruned tokens) and a table row picked by max(position_ids) % 7 (positions),
so the generated tokens depend on all of them. A numpy re-implementation gives the expected tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import runtime
from runtime import EngineError, InputError
from runtime.manifest import read_manifest, sha256_file
from runtime.pipeline import load
from runtime.preprocess import expand2square, pad_color, preprocess
from runtime.prompt import PromptBuilder, expand_image_tokens, find_span
from runtime.sampling import Sampler, nucleus
from runtime.stage import OrtStage

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]

# --- the fake engine -------------------------------------------------------------------------------

V, D, L, IMG = 16, 8, 8, 8  # vocab, hidden (= head_dim, one KV head), vision tokens, image size
P_IMG, P_TXT = 1, 1
IMAGE_ID, BOS, EOS = 15, 1, 2
POS_PERIOD = 7
WORDS = ["<pad>", "<s>", "</s>", "USER:", "ASSISTANT:", "what", "is", "this", "cat", "dog", "a", "the",
         "red", "blue", "[UNK]", "<image>"]
TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
TEMPLATE_TEXT = "USER: {prompt} ASSISTANT:"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = lambda *shape, scale=1.0: (rng.normal(size=shape) * scale).astype(np.float32)
    weights = {
        "W_v": w(3 * IMG * IMG // L, D, scale=0.3),  # pixels -> image features
        "W_e": w(V, D),  # token embeddings
        "W_last": w(D, V),  # last fed token -> logits
        "W_o": w(D, V, scale=0.3),  # (layer-1 KV sum - layer-0 KV sum) = -(pruned tokens) -> logits
        "W_m": w(D, V),  # mean of layer-0 KV (every token so far) -> logits
        "W_pos": w(POS_PERIOD, V, scale=2.0),  # max(position_ids) % POS_PERIOD -> logits
    }
    weights["W_pos"][:, EOS] -= 6.0  # eos rarely wins (tests that need it make another token eos)
    weights["W_pos"][:, IMAGE_ID] -= 100.0  # never generate the image token
    return weights


def _save(graph, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnxruntime 1.31 refuses onnx 1.23's default IR 14
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _vision_graph(w):
    nodes = [
        helper.make_node("Reshape", ["pixel_values", "shape"], ["patches"]),  # (B, L, 3*IMG*IMG/L)
        helper.make_node("MatMul", ["patches", "W_v"], ["image_features"]),  # (B, L, D)
    ]
    return helper.make_graph(
        nodes, "vision_encoder",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, IMG, IMG])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", L, D])],
        [_const("shape", np.array([0, L, -1], np.int64)), _const("W_v", w["W_v"])],
    )


def _embed_graph(w):
    return helper.make_graph(
        [helper.make_node("Gather", ["W_e", "input_ids"], ["inputs_embeds"], axis=0)], "embed_tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "seq"])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", D])],
        [_const("W_e", w["W_e"])],
    )


def _decoder_graph(w):
    n = helper.make_node
    nodes = [
        n("Unsqueeze", ["inputs_embeds", "ax1"], ["x4"]),  # (B, 1, S, D)
        n("Concat", ["past_key_0", "x4"], ["present_key_0"], axis=2),
        n("Concat", ["past_value_0", "x4"], ["present_value_0"], axis=2),
        n("Gather", ["position_ids", "zero"], ["pos"], axis=0),  # (S,)
        n("Add", ["span_start", "span_len"], ["span_end"]),
        n("GreaterOrEqual", ["pos", "span_start"], ["ge"]),
        n("Less", ["pos", "span_end"], ["lt"]),
        n("And", ["ge", "lt"], ["in_span"]),
        n("Mul", ["quota", "n_piv"], ["harvest"]),
        n("Add", ["harvest", "n_img"], ["n_keep"]),
        n("Add", ["span_start", "n_keep"], ["keep_end"]),
        n("Less", ["pos", "keep_end"], ["harvested"]),
        n("Not", ["harvested"], ["not_harvested"]),
        n("And", ["in_span", "not_harvested"], ["drop"]),
        n("Not", ["drop"], ["keep"]),
        n("Compress", ["position_ids", "keep"], ["kept_positions"], axis=1),  # (B, S')
        n("Compress", ["x4", "keep"], ["xk"], axis=2),  # (B, 1, S', D)
        n("Concat", ["past_key_1", "xk"], ["present_key_1"], axis=2),
        n("Concat", ["past_value_1", "xk"], ["present_value_1"], axis=2),
        n("ReduceSum", ["present_key_0", "ax12"], ["h0"], keepdims=0),  # (B, D)
        n("ReduceSum", ["present_value_1", "ax12"], ["h1"], keepdims=0),
        n("Sub", ["h1", "h0"], ["pruned"]),
        n("MatMul", ["pruned", "W_o"], ["t_pruned"]),  # (B, V)
        n("ReduceMean", ["present_value_0"], ["m0"], axes=[1, 2], keepdims=0),  # opset 17: axes attribute
        n("MatMul", ["m0", "W_m"], ["t_mean"]),
        n("Gather", ["inputs_embeds", "minus1"], ["x_last"], axis=1),  # (B, D)
        n("MatMul", ["x_last", "W_last"], ["t_last"]),
        n("ReduceMax", ["position_ids"], ["pmax"], keepdims=0),
        n("Mod", ["pmax", "period"], ["phase"]),
        n("Gather", ["W_pos", "phase"], ["t_pos"], axis=0),  # (V,)
        n("Add", ["t_pruned", "t_mean"], ["s1"]),
        n("Add", ["s1", "t_last"], ["s2"]),
        n("Add", ["s2", "t_pos"], ["logits"]),
    ]
    kv = lambda name, past: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 1, past, D])
    scalar = lambda name: helper.make_tensor_value_info(name, TensorProto.INT32, [])
    inputs = [  # kept_slots: only the real decoder reads its length; the fake computes its own
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "seq", D]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT32, ["batch", "seq"]),
        scalar("span_start"), scalar("span_len"), scalar("quota"),
        helper.make_tensor_value_info("kept_slots", TensorProto.INT32, ["batch", "kept"]),
        kv("past_key_0", "past_full"), kv("past_value_0", "past_full"),
        kv("past_key_1", "past_kept"), kv("past_value_1", "past_kept"),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", V]),
        kv("present_key_0", "full"), kv("present_value_0", "full"),
        kv("present_key_1", "kept"), kv("present_value_1", "kept"),
        helper.make_tensor_value_info("kept_positions", TensorProto.INT32, ["batch", "kept"]),
    ]
    inits = [
        _const("ax1", np.array([1], np.int64)), _const("ax12", np.array([1, 2], np.int64)),
        _const("zero", np.array(0, np.int64)), _const("n_piv", np.array(P_IMG + P_TXT, np.int32)),
        _const("n_img", np.array(P_IMG, np.int32)), _const("minus1", np.array(-1, np.int64)),
        _const("period", np.array(POS_PERIOD, np.int32)),
    ] + [_const(k, w[k]) for k in ("W_o", "W_m", "W_last", "W_pos")]
    return helper.make_graph(nodes, "decoder", inputs, outputs, inits)


def make_tokenizer(path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<s>", "</s>", "<image>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.save(str(path))


def _spec(name, dtype, shape):
    return {"name": name, "dtype": dtype, "shape": shape}


def make_manifest(files: dict[str, Path], eos=EOS, keep_ratio: float = 0.5, **overrides) -> dict:
    kv = lambda name, past: _spec(name, "float32", ["batch", 1, past, D])
    m = {
        "format": "dart-vlm-engine", "format_version": 3, "family": "llava", "model": "fake-tiny",
        "dtype": "float32", "opset": 17,
        "dart": {"layer": 1, "pivots_image": P_IMG, "pivots_text": P_TXT, "keep_ratio": keep_ratio, "max_span": 3840},
        "files": {name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for name, p in files.items()},
        "stages": {
            "vision_encoder": {"file": "vision_encoder.onnx",
                               "inputs": [_spec("pixel_values", "float32", ["batch", 3, IMG, IMG])],
                               "outputs": [_spec("image_features", "float32", ["batch", L, D])]},
            "embed_tokens": {"file": "embed_tokens.onnx",
                             "inputs": [_spec("input_ids", "int32", ["batch", "seq"])],
                             "outputs": [_spec("inputs_embeds", "float32", ["batch", "seq", D])]},
            "decoder": {"file": "decoder.onnx",
                        "inputs": [_spec("inputs_embeds", "float32", ["batch", "seq", D]),
                                   _spec("position_ids", "int32", ["batch", "seq"]),
                                   _spec("span_start", "int32", []), _spec("span_len", "int32", []),
                                   _spec("quota", "int32", []), _spec("kept_slots", "int32", ["batch", "kept"]),
                                   kv("past_key_0", "past_full"), kv("past_value_0", "past_full"),
                                   kv("past_key_1", "past_kept"), kv("past_value_1", "past_kept")],
                        # outputs may carry derived dims that dynamic_axes does not declare
                        "outputs": [_spec("logits", "float32", ["batch", V]),
                                    kv("present_key_0", "seq + past_full"), kv("present_value_0", "seq + past_full"),
                                    kv("present_key_1", "kept + past_kept"), kv("present_value_1", "kept + past_kept"),
                                    _spec("kept_positions", "int32", ["batch", "kept"])]},
        },
        "decoder": {"num_layers": 2, "num_kv_heads": 1, "head_dim": D, "hidden_size": D, "vocab_size": V},
        "dynamic_axes": {"batch": {"min": 1, "opt": 1, "max": 4}, "seq": {"min": 1, "opt": 16, "max": 24},
                         "past_full": {"min": 0, "opt": 16, "max": 40}, "past_kept": {"min": 0, "opt": 8, "max": 40},
                         "kept": {"min": 1, "opt": 8, "max": 24}},
        "max_context": 40,
        "tokens": {"image_token": "<image>", "image_token_id": IMAGE_ID, "image_seq_len": L,
                   "bos_token_id": BOS, "eos_token_id": eos, "pad_token_id": 0},
        "preprocess": {"image_size": IMG, "pad_to_square": True, "resample": "bicubic",
                       "rescale": 1 / 255, "mean": CLIP_MEAN, "std": CLIP_STD},
        "prompt": {"template": TEMPLATE, "template_text_only": TEMPLATE_TEXT, "add_special_tokens": True},
        "tools": {"dart_vlm": "0.1.0"},
    }
    m.update(overrides)
    return m


def build_engine(d: Path, seed: int = 0, **manifest_overrides) -> Path:
    """A complete fake engine directory at `d`."""
    d.mkdir(parents=True, exist_ok=True)
    w = _weights(seed)
    _save(_vision_graph(w), d / "vision_encoder.onnx")
    _save(_embed_graph(w), d / "embed_tokens.onnx")
    _save(_decoder_graph(w), d / "decoder.onnx")
    make_tokenizer(d / "tokenizer.json")
    names = ["vision_encoder.onnx", "embed_tokens.onnx", "decoder.onnx", "tokenizer.json"]
    write_manifest(d, make_manifest({n: d / n for n in names}, **manifest_overrides))
    return d


def write_manifest(d: Path, manifest: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))


def reference_generate(ids, pixel_values, ratio, max_new_tokens, eos=EOS, seed=0):
    """The fake engine's greedy answer, in numpy: (tokens, kept_positions)."""
    from dart_ops.spec import DartConfig

    w = {k: v.astype(np.float64) for k, v in _weights(seed).items()}
    emb = w["W_e"][ids]  # (S, D)
    a, span = find_span(ids, IMAGE_ID)
    if span:
        emb[a:a + span] = pixel_values.astype(np.float64).reshape(L, -1) @ w["W_v"]
    S = len(ids)
    c = DartConfig(1, P_IMG, P_TXT, keep_ratio=ratio).counts(span, S - a - span)
    pos = np.arange(S)
    keep = ~((pos >= a) & (pos < a + span) & (pos >= a + P_IMG + (P_IMG + P_TXT) * c.quota)) if c.prune \
        else np.ones(S, bool)
    pruned = -emb[~keep].sum(0)  # layer-1 KV sum - layer-0 KV sum, unchanged by decode steps
    seen = list(emb)  # layer-0 KV: every fed embedding
    last = emb[-1]
    tokens = []
    for t in range(max_new_tokens):
        logits = pruned @ w["W_o"] + np.mean(seen, 0) @ w["W_m"] + last @ w["W_last"]
        tok = int(np.argmax(logits + w["W_pos"][(S - 1 + t) % POS_PERIOD]))
        if tok == eos:
            break
        tokens.append(tok)
        last = w["W_e"][tok]
        seen.append(last)
    return tokens, pos[keep].tolist()


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return build_engine(tmp_path_factory.mktemp("engine") / "fake")


@pytest.fixture(scope="module")
def pipe(engine):
    return load(engine)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A 40x24 RGB PNG (not square, so padding matters)."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(path)
    return path


def _copy_engine(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --- manifest --------------------------------------------------------------------------------------


def test_manifest_reads_fake_engine(engine):
    m = read_manifest(engine)
    assert m.dart.layer == 1 and m.tokens.image_seq_len == L and m.tokens.eos_token_ids == (EOS,)
    assert m.stages["decoder"].input("past_key_1").shape == ("batch", 1, "past_kept", D)
    assert m.max_seq == 24 and m.preprocess.mean == tuple(CLIP_MEAN)


def test_manifest_missing_dir_and_manifest(tmp_path):
    with pytest.raises(EngineError, match="is not an engine directory .*export.build"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(EngineError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_manifest_bad_json_and_wrong_version(engine, tmp_path):
    d = _copy_engine(engine, tmp_path / "e")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        read_manifest(d)
    m = json.loads((engine / "manifest.json").read_text())
    write_manifest(d, {**m, "format_version": 4})
    with pytest.raises(EngineError, match=r"version 4.*version 3.*re-export") as e:
        read_manifest(d)
    assert "\n" not in str(e.value)
    write_manifest(d, {**m, "format": "something-else"})
    with pytest.raises(EngineError, match="'something-else'"):
        read_manifest(d)


def test_manifest_missing_key_names_it(engine, tmp_path):
    d = _copy_engine(engine, tmp_path / "e")
    m = json.loads((engine / "manifest.json").read_text())
    del m["tokens"]["image_seq_len"]
    write_manifest(d, m)
    with pytest.raises(EngineError, match=r"missing key 'tokens.image_seq_len'"):
        read_manifest(d)
    m = json.loads((engine / "manifest.json").read_text())
    m["dynamic_axes"].pop("past_kept")
    write_manifest(d, m)
    with pytest.raises(EngineError, match="'past_kept' that dynamic_axes does not declare"):
        read_manifest(d)


def test_manifest_sha_mismatch_and_missing_file(engine, tmp_path):
    d = _copy_engine(engine, tmp_path / "e")
    data = bytearray((d / "decoder.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (d / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"decoder.onnx was modified after export \(sha256 mismatch\)"):
        read_manifest(d)
    read_manifest(d, verify=False)  # the hash check is what caught it
    (d / "decoder.onnx").write_bytes(bytes(data) + b"x")
    with pytest.raises(EngineError, match=r"decoder.onnx was modified after export \(size"):
        read_manifest(d)
    (d / "decoder.onnx").unlink()
    with pytest.raises(EngineError, match="decoder.onnx is missing"):
        read_manifest(d)


def test_manifest_listed_extra_file_missing(engine, tmp_path):
    d = _copy_engine(engine, tmp_path / "e")
    m = json.loads((engine / "manifest.json").read_text())
    m["files"]["decoder.onnx.data"] = {"sha256": "0" * 64, "bytes": 3}
    write_manifest(d, m)
    with pytest.raises(EngineError, match="decoder.onnx.data is listed in manifest.json but missing"):
        read_manifest(d)


def test_sha256_file_streams(tmp_path):
    p = tmp_path / "big.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # crosses chunk boundaries
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


# --- stage -----------------------------------------------------------------------------------------


def _identity_model(path: Path) -> Path:
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
    )
    _save(g, path)
    return path


def test_ort_stage_runs(tmp_path):
    stage = OrtStage(_identity_model(tmp_path / "id.onnx"), ["cpu"], threads=1)
    assert stage.input_names == ["x"] and stage.output_names == ["y"] and stage.name == "id"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = stage.run({"x": x})
    assert list(out) == ["y"]
    np.testing.assert_array_equal(out["y"], x)


def test_ort_stage_bad_provider_and_file(tmp_path):
    path = _identity_model(tmp_path / "id.onnx")
    with pytest.raises(EngineError, match="unknown provider 'quantum'"):
        OrtStage(path, ["quantum"])
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(EngineError, match="not available.*onnxruntime-gpu"):
            OrtStage(path, ["ort-tensorrt"])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EngineError, match="bad.onnx: onnxruntime cannot load it"):
        OrtStage(bad)


# --- preprocess ------------------------------------------------------------------------------------


def _spec336():
    from runtime.manifest import PreprocessSpec

    return PreprocessSpec(336, True, "bicubic", 1 / 255, tuple(CLIP_MEAN), tuple(CLIP_STD))


def test_expand2square_by_hand():
    a = np.zeros((2, 5, 3), np.uint8)
    a[..., 0] = 200  # a red 5-wide, 2-high strip
    sq = np.asarray(expand2square(Image.fromarray(a), (1, 2, 3)))
    assert sq.shape == (5, 5, 3)
    want = np.empty((5, 5, 3), np.uint8)
    want[:] = (1, 2, 3)
    want[1:3] = a  # (5 - 2) // 2 = 1 row above, 2 below
    np.testing.assert_array_equal(sq, want)
    tall = np.asarray(expand2square(Image.fromarray(np.full((4, 1, 3), 9, np.uint8)), (0, 0, 0)))
    assert tall.shape == (4, 4, 3) and (tall[:, 1] == 9).all() and tall[:, [0, 2, 3]].sum() == 0
    # LLaVA's colour: int(255 * mean), truncated (122, 116, 104 for CLIP's mean)
    assert pad_color(tuple(CLIP_MEAN)) == (122, 116, 104)


def test_preprocess_matches_transformers(photo):
    """A manifest without shortest_edge / center_crop (pad to square, resize 336, crop = the whole
    square) gives transformers' numbers bit for bit: CLIP's processor on the padded image, and
    LlavaImageProcessor(do_pad=True) on the raw one (same PIL resize, same float order).
    tests/test_preprocess.py covers the center-crop style, modes and sizes."""
    pytest.importorskip("transformers")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    ours = preprocess(photo, _spec336())
    assert ours.shape == (1, 3, 336, 336) and ours.dtype == np.float32
    img = Image.open(photo).convert("RGB")
    padded = expand2square(img, pad_color(tuple(CLIP_MEAN)))
    clip = CLIPImageProcessorPil(do_center_crop=False, size={"height": 336, "width": 336}, do_convert_rgb=True)
    np.testing.assert_array_equal(ours, np.asarray(clip(images=padded, return_tensors="np")["pixel_values"]))
    llava = LlavaImageProcessorPil(do_pad=True, do_center_crop=False, size={"height": 336, "width": 336})
    np.testing.assert_array_equal(ours, np.asarray(llava(images=img, return_tensors="np")["pixel_values"]))


@pytest.mark.parametrize("width", [10, 11])
def test_center_crop_by_hand(width):
    """Shortest edge already 6 (the resize is the identity), crop 6: columns (width - 6) // 2 on,
    as transformers' center_crop; rescale in float64 then float32, normalise in float32."""
    a = np.random.default_rng(width).integers(0, 256, (6, width, 3), dtype=np.uint8)
    spec = {"image_size": 6, "pad_to_square": False, "resample": "bicubic", "rescale": 1 / 255,
            "mean": CLIP_MEAN, "std": CLIP_STD, "shortest_edge": 6, "center_crop": True}
    left = (width - 6) // 2  # 2 for both widths
    x = (a[:, left:left + 6] * (1 / 255)).astype(np.float32)
    want = ((x - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(preprocess(a, spec), want)


def test_preprocess_accepts_path_pil_array(photo):
    spec = _spec336()
    img = Image.open(photo)
    by_path = preprocess(str(photo), spec)
    as_dict = {"image_size": 336, "pad_to_square": True, "resample": "bicubic", "rescale": 1 / 255,
               "mean": CLIP_MEAN, "std": CLIP_STD}  # the manifest's "preprocess" object also works
    np.testing.assert_array_equal(by_path, preprocess(photo, as_dict))
    np.testing.assert_array_equal(by_path, preprocess(photo, spec))
    np.testing.assert_array_equal(by_path, preprocess(img, spec))
    np.testing.assert_array_equal(by_path, preprocess(np.asarray(img.convert("RGB")), spec))
    rgba = img.convert("RGBA")  # opaque: compositing on white changes nothing
    np.testing.assert_array_equal(by_path, preprocess(rgba, spec))


def test_preprocess_bad_images(tmp_path):
    spec = _spec336()
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"definitely not a jpeg")
    with pytest.raises(InputError, match=f"cannot read image {junk}: "):
        preprocess(junk, spec)
    with pytest.raises(InputError, match="cannot read image .*missing.png: No such file"):
        preprocess(tmp_path / "missing.png", spec)
    with pytest.raises(InputError, match=r"\(H, W, 3\) uint8"):
        preprocess(np.zeros((4, 4), np.uint8), spec)
    with pytest.raises(InputError, match="must be a path"):
        preprocess(42, spec)


# --- prompt ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builder(engine):
    m = read_manifest(engine)
    return PromptBuilder(engine / "tokenizer.json", m.prompt, m.tokens)


def test_prompt_build_and_expand(builder):
    ids = builder.encode("what is this", with_image=True)
    assert ids == [BOS, 3] + [IMAGE_ID] * L + [5, 6, 7, 4]
    assert find_span(ids, IMAGE_ID) == (2, L)
    text_only = builder.encode("what is this", with_image=False)
    assert text_only == [BOS, 3, 5, 6, 7, 4] and find_span(text_only, IMAGE_ID) == (0, 0)
    assert builder.decode([BOS, 8, EOS, 9]) == "cat dog"  # special tokens skipped


def test_prompt_no_special_tokens(engine):
    from runtime.manifest import PromptSpec

    m = read_manifest(engine)
    b = PromptBuilder(engine / "tokenizer.json", PromptSpec(TEMPLATE, TEMPLATE_TEXT, False), m.tokens)
    assert b.encode("a cat", with_image=False) == [3, 10, 8, 4]


def test_expand_image_tokens_rules():
    one = [1, 3, IMAGE_ID, 5]
    assert expand_image_tokens(one, IMAGE_ID, 4) == [1, 3] + [IMAGE_ID] * 4 + [5]
    full = [1] + [IMAGE_ID] * 4 + [5]
    assert expand_image_tokens(full, IMAGE_ID, 4) == full  # already expanded: kept
    assert expand_image_tokens([1, 5], IMAGE_ID, 4) == [1, 5]
    with pytest.raises(InputError, match="3 image tokens"):
        expand_image_tokens([1] + [IMAGE_ID] * 3 + [5], IMAGE_ID, 4)
    with pytest.raises(InputError, match="not one contiguous run"):
        expand_image_tokens([IMAGE_ID, 5, IMAGE_ID], IMAGE_ID, 4)
    with pytest.raises(InputError, match="not one contiguous run"):
        find_span([IMAGE_ID, IMAGE_ID, 5, IMAGE_ID], IMAGE_ID)
    assert find_span(np.array([0, 0, IMAGE_ID, IMAGE_ID]), IMAGE_ID) == (2, 2)


def test_prompt_must_not_contain_image_token(builder):
    with pytest.raises(InputError, match="must not contain '<image>'"):
        builder.encode("<image> what is this", with_image=True)


def test_tokenizer_must_match_manifest_image_id(engine):
    import dataclasses

    m = read_manifest(engine)
    with pytest.raises(EngineError, match="maps the image token '<image>' to 15, but the manifest says 3"):
        PromptBuilder(engine / "tokenizer.json", m.prompt, dataclasses.replace(m.tokens, image_token_id=3))


# --- sampling --------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    s = Sampler(0.0)
    for _ in range(5):
        logits = rng.normal(size=50).astype(np.float32)
        assert s(logits) == int(np.argmax(logits))
    assert s(np.array([1.0, 3.0, 3.0])) == 1  # ties: lowest id


def test_sampling_seeded_and_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    draw = lambda seed: _many(Sampler(1.0, 1.0, seed=seed), logits, 200)
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    freq = np.bincount(_many(Sampler(1.0, seed=0), logits, 20000), minlength=3) / 20000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.02)
    # temperature sharpens: at T = 0.25 the top token gets 0.5^4 / sum(p^4) = 0.8398
    freq = np.bincount(_many(Sampler(0.25, seed=0), logits, 20000), minlength=3) / 20000
    assert abs(freq[0] - 0.5 ** 4 / (0.5 ** 4 + 0.3 ** 4 + 0.2 ** 4)) < 0.02


def _many(sampler, logits, n):
    return [sampler(logits) for _ in range(n)]


def test_top_p():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=100)
    assert set(_many(Sampler(1.0, top_p=1e-6, seed=1), logits, 200)) == {int(np.argmax(logits))}
    p = np.array([0.1, 0.4, 0.3, 0.2])
    np.testing.assert_allclose(nucleus(p, 0.65), [0, 4 / 7, 3 / 7, 0])  # 0.4 + 0.3 >= 0.65
    np.testing.assert_allclose(nucleus(p, 0.7), [0, 4 / 7, 3 / 7, 0])  # exactly reached
    np.testing.assert_allclose(nucleus(p, 1.0), p)
    got = set(_many(Sampler(1.0, top_p=0.65, seed=2), np.log(p), 500))
    assert got == {1, 2}


@pytest.mark.parametrize("temperature, top_p", [(-1.0, 1.0), (float("nan"), 1.0), (1.0, 0.0), (1.0, 1.5)])
def test_sampling_bad_args(temperature, top_p):
    with pytest.raises(InputError):
        Sampler(temperature, top_p)


# --- pipeline on the fake engine -------------------------------------------------------------------


def test_generate_matches_reference(pipe, photo):
    pv = preprocess(photo, pipe.manifest.preprocess)
    ids = pipe.prompt.encode("what is this", with_image=True)
    answers = {}
    for ratio in (0.5, 0.25, 1.0):
        want, want_kept = reference_generate(ids, pv, ratio, 10, eos=EOS)
        assert len(want) == 10  # no early eos: the comparison is not vacuous
        out = pipe.generate("what is this", image=photo, keep_ratio=ratio, max_new_tokens=10)
        assert out.token_ids == want and out.kept_positions == want_kept and out.keep_ratio == ratio
        assert out.text == pipe.prompt.decode(want)
        assert out.first_logits.shape == (V,) and int(np.argmax(out.first_logits)) == want[0]
        answers[ratio] = out.token_ids
    assert answers[1.0] != answers[0.25] != answers[0.5]  # pruning changes the answer
    # ratio 0.5 of 8 vision tokens: budget 4, T = 4 // 2 = 2, keep 1 + 2 * 2 = 5 of 8
    out = pipe.generate("what is this", image=photo, max_new_tokens=3)  # manifest default 0.5
    t = out.timings
    assert (t["prompt_tokens"], t["vision_tokens"], t["kept_vision_tokens"], t["kept_tokens"]) == (14, 8, 5, 11)
    assert out.kept_positions == [0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13]
    for key in ("vision_ms", "embed_ms", "prefill_ms", "decode_ms", "total_ms", "tokens_per_s", "new_tokens"):
        assert key in t and t[key] >= 0


def test_generate_stops_at_eos(engine, tmp_path, photo):
    pipe_no_eos = load(build_engine(tmp_path / "no_eos", eos=None))
    full = pipe_no_eos.generate("what is this", image=photo, max_new_tokens=12).token_ids
    assert len(full) == 12
    stop = full[4]
    first = full.index(stop)
    pipe = load(build_engine(tmp_path / "eos", eos=stop))
    out = pipe.generate("what is this", image=photo, max_new_tokens=12)
    assert out.token_ids == full[:first]  # eos not included
    assert out.timings["new_tokens"] == first


def test_generate_input_paths_agree(pipe, photo):
    ref = pipe.generate("a red cat", image=photo, max_new_tokens=6)
    pv = preprocess(photo, pipe.manifest.preprocess)
    ids_one = pipe.prompt.tokenizer.encode(TEMPLATE.format(prompt="a red cat")).ids  # one image token
    assert ids_one.count(IMAGE_ID) == 1
    for kwargs in (
        {"input_ids": ids_one, "pixel_values": pv},
        {"input_ids": np.array([pipe.prompt.expand(ids_one)]), "image": photo},  # expanded, [1, S]
        {"prompt": "a red cat", "image": Image.open(photo)},
    ):
        out = pipe.generate(max_new_tokens=6, **kwargs)
        assert out.token_ids == ref.token_ids and out.kept_positions == ref.kept_positions


def test_generate_text_only(pipe):
    ids = pipe.prompt.encode("the blue dog", with_image=False)
    want, kept = reference_generate(ids, None, 0.5, 5)
    out = pipe.generate("the blue dog", max_new_tokens=5)
    assert len(want) == 5
    assert out.token_ids == want and out.kept_positions == kept == list(range(len(ids)))
    assert out.timings["vision_tokens"] == out.timings["kept_vision_tokens"] == 0


def test_generate_streams_text(pipe, photo):
    pieces = []
    out = pipe.generate("what is this", image=photo, max_new_tokens=8, stream=pieces.append)
    assert "".join(pieces) == out.text and len(pieces) == len(out.token_ids) == 8
    assert pieces[0] == pipe.prompt.decode(out.token_ids[:1])


def test_streamer_holds_back_partial_characters():
    from runtime.pipeline import _Streamer

    texts = {1: "a", 2: "a \ufffd", 3: "a \u00e9", 4: "a \u00e9 b"}  # byte-level BPE: é arrives in 2 tokens
    pieces = []
    s = _Streamer(lambda ids: texts[len(ids)], pieces.append)
    for n in range(1, 5):
        s.push(list(range(n)))
    s.finish(texts[4])
    assert pieces == ["a", " \u00e9", " b"]


def test_generate_sampling_seeded(pipe, photo):
    a = pipe.generate("what is this", image=photo, temperature=1.5, top_p=0.9, seed=3, max_new_tokens=8)
    b = pipe.generate("what is this", image=photo, temperature=1.5, top_p=0.9, seed=3, max_new_tokens=8)
    assert a.token_ids == b.token_ids


def test_generate_bad_inputs(pipe, photo):
    with pytest.raises(InputError, match="give a prompt"):
        pipe.generate()
    with pytest.raises(InputError, match="not both"):
        pipe.generate("x", input_ids=[1, 2])
    for r in (1.5, 0.0, -0.1, float("nan")):
        with pytest.raises(InputError, match=r"keep ratio must be in \(0, 1\]"):
            pipe.generate("what", image=photo, keep_ratio=r)
    with pytest.raises(InputError, match="image tokens but no image"):
        pipe.generate(input_ids=[BOS, IMAGE_ID, 5])
    with pytest.raises(InputError, match="no image token"):
        pipe.generate(input_ids=[BOS, 5], image=photo)
    with pytest.raises(InputError, match=r"prompt has 30 tokens; this engine was exported for at most 24 "
                                         r"\(re-export with --max-seq\)"):
        pipe.generate(input_ids=[5] * 30)
    # S + max_new_tokens > max_context 40 is capped with a warning, not refused (test_runtime_errors.py)
    assert pipe.generate(input_ids=[5] * 20, max_new_tokens=30).timings["max_new_tokens"] == 20
    with pytest.raises(InputError, match=r"input_ids must be in \[0, 16\)"):
        pipe.generate(input_ids=[5, 99])
    with pytest.raises(InputError, match="batch 1 only"):
        pipe.generate(input_ids=[[5, 6], [5, 6]])
    with pytest.raises(InputError, match=r"pixel_values must be a float array \[1, 3, 8, 8\]"):
        pipe.generate("what", pixel_values=np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(InputError, match="cannot read image"):
        pipe.generate("what", image=photo.with_name("nope.png"))


def test_load_rejects_graph_manifest_mismatch(engine, tmp_path):
    d = _copy_engine(engine, tmp_path / "e")
    m = json.loads((d / "manifest.json").read_text())
    m["stages"]["embed_tokens"]["inputs"][0]["name"] = "ids"
    write_manifest(d, m)
    with pytest.raises(EngineError, match="embed_tokens.onnx: graph inputs .* differ from manifest.json"):
        load(d)


# --- torch-free import, CLI ------------------------------------------------------------------------


def _run_py(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *([("-c"), code] if code else []), *args], cwd=REPO, env=env,
                          check=False, capture_output=True, text=True, timeout=120)


def test_runtime_runs_without_torch(engine, photo):
    code = f"""
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
import runtime, runtime.pipeline, runtime.run
out = runtime.load({str(engine)!r}).generate("what is this", image={str(photo)!r}, max_new_tokens=4)
assert len(out.token_ids) == 4, out
bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx") and sys.modules[m]]
assert not bad, bad
print("ok")
"""
    r = _run_py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_cli_help():
    r = _run_py("", "-m", "runtime.run", "--help")
    assert r.returncode == 0 and "--engine-dir" in r.stdout and "examples:" in r.stdout


@pytest.mark.parametrize("ratio", ["1.5", "abc", "0"])
def test_cli_bad_ratio(ratio, capsys):
    from runtime.run import main

    with pytest.raises(SystemExit) as e:
        main(["--engine-dir", "x", "--prompt", "hi", "--ratio", ratio])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --ratio") and "Traceback" not in err


def test_cli_missing_engine_dir(tmp_path):
    r = _run_py("", "-m", "runtime.run", "--engine-dir", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "not an engine directory" in r.stderr


def test_cli_answers(engine, photo, capsys):
    from runtime.run import main

    args = ["--engine-dir", str(engine), "--image", str(photo), "--prompt", "what is this", "--max-new-tokens", "5"]
    assert main(args) == 0
    cap = capsys.readouterr()
    want = load(engine).generate("what is this", image=photo, max_new_tokens=5)
    assert cap.out == want.text + "\n"
    assert cap.err.startswith("kept 11 of 14 prompt tokens (5 of 8 vision tokens) | vision ")
    assert main(args + ["--json", "--ratio", "1.0"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["keep_ratio"] == 1.0 and obj["kept_positions"] == list(range(14))
    assert set(obj) == {"token_ids", "text", "kept_positions", "timings", "keep_ratio", "keep_tokens", "precision",
                        "image_pivots"}
    assert obj["image_pivots"] == []  # ratio 1.0: nothing pruned, no pivots
    assert obj["precision"] == {"vision_encoder": "float32", "embed_tokens": "float32", "decoder": "float32"}
    assert obj["keep_tokens"] is None
    assert main(args + ["--image", str(photo.with_name("nope.png"))]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read image") and err.count("\n") == 1


def test_public_api():
    assert {"load", "Pipeline", "GenerateOutput", "EngineError", "InputError"} <= set(runtime.__all__)
    assert runtime.load is load and issubclass(runtime.InputError, ValueError)

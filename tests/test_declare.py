"""Stage declarations (export/declare.py): the manifest's signatures, tracing inputs and dynamic
shapes derive from them, and the post-export check catches an axis the exporter baked."""

import shutil

import onnx
import pytest
import torch

from dart_ops.spec import DartConfig
from export.axes import declare
from export.declare import StageDecl, TensorDecl, check_graph, dynamic_shapes, example_inputs, signature
from export.validate import ValidationError
from runtime.manifest import Axis


@pytest.fixture(scope="module")
def llava_decls():
    from dart_ops.spec import DartConfig
    from export import families, stages

    family = families.resolve("llava-tiny")
    loaded = family.load("llava-tiny", torch.float32)
    flat = family.stage_modules(loaded, DartConfig(keep_ratio=0.111))["decoder"]
    return family.stage_decls(loaded, flat, stages.decoder_dims(flat), "float32")


def test_llava_decls_give_the_manifest_signatures(llava_decls, tiny_engine):
    _, manifest = tiny_engine
    assert {name: signature(d).to_json() for name, d in llava_decls.items()} == manifest["stages"]
    # and those are LLaVA-1.5's shapes (tiny: 336 px, 576 vision tokens, hidden 64, 2 KV heads of 16, K = 2)
    spec = {name: signature(d) for name, d in llava_decls.items()}
    assert spec["vision_encoder"].inputs[0].shape == ("images", 3, 336, 336)
    assert spec["vision_encoder"].outputs[0].shape == ("images", 576, 64)
    dec = spec["decoder"]
    assert [t.name for t in dec.inputs[:6]] == ["inputs_embeds", "position_ids", "span_start", "span_len", "quota",
                                                "kept_slots"]
    assert dec.input("position_ids").shape == ("batch", "seq")
    # every integer input and output int32 (TensorRT 10.3, runtime.manifest.INDEX_DTYPE); the pruned length
    # is kept_slots' dim, the scalars are 0-d data
    ints = [t for t in (*dec.inputs, *dec.outputs, *spec["embed_tokens"].inputs) if "float" not in t.dtype]
    assert {t.name: t.dtype for t in ints} == {n: "int32" for n in (
        "position_ids", "span_start", "span_len", "quota", "kept_slots", "kept_positions", "image_pivots", "input_ids")}
    assert dec.input("quota").shape == () and dec.input("kept_slots").shape == ("batch", "kept")
    assert dec.input("past_value_1").shape == ("batch", 2, "past_full", 16)
    assert dec.input("past_key_2").shape == ("batch", 2, "past_kept", 16)
    assert next(t for t in dec.outputs if t.name == "kept_positions").shape == ("batch", "kept")
    assert dec.outputs[-1].name == "image_pivots" and dec.outputs[-1].shape == ("batch", 4)  # pivots_image


def test_example_inputs_and_dynamic_shapes():
    # a Qwen2-VL-like decoder: 3-row M-RoPE positions [3, B, S]
    decl = StageDecl("decoder", "decoder.onnx", outputs=(), inputs=(
        TensorDecl("inputs_embeds", "float32", ("batch", "seq", 8)),
        TensorDecl("position_ids", "int64", (3, "batch", "seq"), example="positions"),
        TensorDecl("quota", "int64", ()),
    ))
    embeds, pos, quota = example_inputs(decl, {"batch": 2, "seq": 5}, {"quota": 3})
    assert embeds.shape == (2, 5, 8) and embeds.dtype == torch.float32
    assert pos.shape == (3, 2, 5) and pos.dtype == torch.int64
    assert torch.equal(pos, torch.arange(5).expand(3, 2, 5))
    assert quota.shape == () and int(quota) == 3
    axes = declare(max_batch=4, max_seq=64, max_context=128,
                   vision={"vision_tokens": Axis(16, 16, 16, "vision_tokens")}, max_span=24, dart=DartConfig(2, 4, 4))
    shapes = dynamic_shapes(decl, axes)
    assert sorted(shapes[0]) == [0, 1] and sorted(shapes[1]) == [1, 2] and shapes[2] is None
    assert shapes[0][0] is shapes[1][1]  # one Dim per axis name, shared between inputs
    assert shapes[0][1].__name__ == "seq" and (shapes[0][1].min, shapes[0][1].max) == (1, 64)
    with pytest.raises(ValueError, match=r"decoder: inputs use axes \['seq'\] that are not declared"):
        dynamic_shapes(decl, {"batch": Axis(1, 1, 4, "batch")})


def test_check_graph_passes_on_the_export(llava_decls, tiny_engine):
    engine, _ = tiny_engine
    for decl in llava_decls.values():
        check_graph(decl, engine / decl.file)  # raises on a mismatch


def _edited(src, dst, edit):
    model = onnx.load(str(src))
    edit(model.graph.input[0].type.tensor_type.shape.dim)
    onnx.save(model, str(dst))
    return dst


def test_check_graph_catches_a_baked_axis(llava_decls, tiny_engine, tmp_path):
    engine, _ = tiny_engine
    decl = llava_decls["embed_tokens"]

    def bake_seq(dims):  # what the exporter does when it specialises an axis to the traced size
        dims[1].dim_value = 17
    path = _edited(engine / decl.file, tmp_path / decl.file, bake_seq)
    with pytest.raises(ValidationError, match=r"embed_tokens: input input_ids dim 1 \(axis 'seq'\) was baked to 17"):
        check_graph(decl, path)


def test_check_graph_catches_a_wrong_fixed_dim_and_names(llava_decls, tiny_engine, tmp_path):
    engine, _ = tiny_engine
    decl = llava_decls["vision_encoder"]

    def free_height(dims):
        dims[2].dim_param = "height"
    path = _edited(engine / decl.file, tmp_path / decl.file, free_height)
    with pytest.raises(ValidationError, match=r"vision_encoder: input pixel_values dim 2 is 'height' in the graph, "
                                              r"declared 336"):
        check_graph(decl, path)
    renamed = StageDecl(decl.name, decl.file, (TensorDecl("pixels", "float32", decl.inputs[0].dims),), decl.outputs)
    shutil.copy(engine / decl.file, tmp_path / decl.file)
    with pytest.raises(ValidationError, match=r"graph inputs \['pixel_values'\] differ from the declared \['pixels'\]"):
        check_graph(renamed, tmp_path / decl.file)

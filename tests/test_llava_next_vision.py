"""LLaVA-NeXT presets (export/families/llava_next_presets.py) and vision stage
(export/families/llava_next_vision.py): the stage against transformers' get_image_features (which
packs with pack_image_features), its ONNX graph (crops and vision_tokens dynamic) against the stage,
the tiny presets' processors, generation and checkpoint round trip, the 7b-shape parameter count."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from PIL import Image

from dart_ops.eager import EagerDart
from dart_ops.onnx_op_slots import check_no_shape_inputs
from dart_ops.spec import DartConfig
from export.axes import Axis
from export.check_trt import check_model, inline
from export.declare import check_graph, dynamic_shapes
from export.families.llava_next_presets import (
    CHAT_TEMPLATES,
    PINPOINTS,
    RANDOM_PRESETS,
    build_random_model,
    random_config,
    tiny_processor,
)
from export.families.llava_next_vision import (
    example_inputs,
    hf_pack_index,
    make_stage,
    num_crops,
    stage_decl,
    stage_io,
)
from export.stages import _export, eager_attention

# (height, width) -> (crops, L): the best pinpoint [336, 672] (landscape), [1008, 336] (portrait),
# [672, 672] (square); L = 576 + h' (w' + 1) (notes/families.md section 4).
SIZES = {(320, 640): (3, 1752), (1000, 333): (4, 2376), (700, 700): (5, 2928)}
TRACE = (1000, 333)  # 4 crops, L 2376; validated on the other two sizes
TINY = ("llava-next-tiny", "llava-next-vicuna-tiny")
QUESTION = "What is shown in this image?"
RENDERED = {"llava-next-tiny": f"[INST] <image>\n{QUESTION} [/INST]",
            "llava-next-vicuna-tiny": f"USER: <image>\n{QUESTION} ASSISTANT:"}


@pytest.fixture(scope="module")
def tiny():
    return build_random_model("llava-next-tiny")


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _prompt(processor, image: Image.Image, question: str = QUESTION) -> dict:
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    return processor(images=image, text=text, return_tensors="pt")


# --- vision stage vs transformers -------------------------------------------------------------------


@pytest.mark.parametrize("size", list(SIZES))
def test_stage_equals_hf_image_features(tiny, size):
    pixels, index = example_inputs(tiny, *size, seed=3)
    assert (pixels.shape[0], index.shape[0]) == SIZES[size]
    with torch.no_grad():
        (want,) = tiny.model.get_image_features(pixels, image_sizes=torch.tensor([size])).pooler_output  # (L, D)
        got = make_stage(tiny)(pixels, index)
    assert got.shape == (1, *want.shape) == (1, SIZES[size][1], 64)
    assert (got[0] - want).abs().max().item() <= 1e-6


def test_pack_index_layout():
    """Square 700 px: 4 tiles as a 48 x 48 map, no unpadding: base rows 0..575, then each map row
    (24 features from each of 2 tiles) followed by the newline row 5 * 576."""
    index = hf_pack_index(random_config("llava-next-tiny"), 700, 700)
    newline = 5 * 576
    assert index.dtype == torch.int32  # as the graph declares it and the runtime feeds it
    assert torch.equal(index[:576], torch.arange(576))
    rows = index[576:].reshape(48, 49)
    assert (rows[:, 48] == newline).all() and int((index == newline).sum()) == 48
    r = torch.arange(48)[:, None]
    c = torch.arange(48)[None, :]
    tile = 1 + (r // 24) * 2 + c // 24  # crop of map cell (r, c); crop 0 is the base image
    assert torch.equal(rows[:, :48], tile * 576 + (r % 24) * 24 + c % 24)


def test_pack_index_unpads_to_the_aspect():
    """The 336 x 672 pinpoint gives a 24 x 48 map of tiles 1 and 2. 320 x 640 has the map's aspect:
    all 24 rows stay. 250 x 640 fills 18.75 rows: unpad_image keeps rows 3..20 (h' = 18)."""
    config = random_config("llava-next-tiny")
    assert num_crops(config, 320, 640) == num_crops(config, 250, 640) == 3
    assert hf_pack_index(config, 320, 640).shape[0] == 576 + 24 * 49
    index = hf_pack_index(config, 250, 640)
    assert index.shape[0] == 576 + 18 * 49
    rows = index[576:].reshape(18, 49)
    r, c = torch.arange(3, 21)[:, None], torch.arange(48)[None, :]
    assert torch.equal(rows[:, :48], (1 + c // 24) * 576 + r * 24 + c % 24) and (rows[:, 48] == 3 * 576).all()


def test_feature_layer_list_concatenates_like_hf():
    import transformers

    config = random_config("llava-next-tiny")
    config.vision_feature_layer = [-3, -2]
    torch.manual_seed(0)
    hf = transformers.LlavaNextForConditionalGeneration(config).eval()
    pixels, index = example_inputs(hf, 320, 640, seed=4)
    with torch.no_grad():
        (want,) = hf.model.get_image_features(pixels, image_sizes=torch.tensor([[320, 640]])).pooler_output
        got = make_stage(hf)(pixels, index)
    assert make_stage(hf).layers == (-3, -2)
    assert (got[0] - want).abs().max().item() <= 1e-6


def test_stage_adds_no_weights(tiny):
    inner = tiny.model
    shared = {id(p) for m in (inner.vision_tower, inner.multi_modal_projector) for p in m.parameters()}
    assert {id(p) for p in make_stage(tiny).parameters()} == shared | {id(inner.image_newline)}


# --- ONNX: crops and vision_tokens dynamic ----------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny):
    stage = make_stage(tiny)
    decl = stage_decl(336, 64)
    axes = {"crops": Axis(3, 5, 5, "crops"), "vision_tokens": Axis(576, 2928, 2936, "vision_tokens")}
    with eager_attention(tiny), torch.no_grad():
        model = _export(stage, example_inputs(tiny, *TRACE), dynamic_shapes(decl, axes), decl.input_names(),
                        decl.output_names(), 18)
    return stage, decl, model


def test_stage_io():
    io = stage_io(336, 64, "float16")
    assert io.inputs == (("pixel_values", "float16", ("crops", 3, 336, 336)),
                         ("pack_index", "int32", ("vision_tokens",)))
    assert io.output == ("image_features", "float16", (1, "vision_tokens", 64))


def test_onnx_axes_stay_symbolic(exported, tmp_path):
    _, decl, model = exported
    onnx.save(model, str(tmp_path / "vision_encoder.onnx"))
    check_graph(decl, tmp_path / "vision_encoder.onnx")  # raises if a declared axis was baked
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert dims == {"pixel_values": ["crops", 3, 336, 336], "pack_index": ["vision_tokens"]}
    (out,) = model.graph.output
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == [1, "vision_tokens", 64]


def test_onnx_equals_stage_on_other_sizes(tiny, exported):
    stage, _, model = exported
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for size in (s for s in SIZES if s != TRACE):  # 3 and 5 crops, L 1176 and 2928 (traced: 4, 2376)
        pixels, index = example_inputs(tiny, *size, seed=5)
        with torch.no_grad():
            want = stage(pixels, index).numpy()
        (got,) = session.run(None, {"pixel_values": pixels.numpy(), "pack_index": index.numpy()})
        assert got.shape == want.shape == (1, SIZES[size][1], 64)
        assert np.abs(got - want).max() <= 1e-5, size


def test_onnx_is_tensorrt_friendly(exported):
    _, _, model = exported
    assert [f.line() for f in check_model(model, "vision_encoder.onnx") if f.severity == "error"] == []
    ops = {n.op_type for n in inline(model).graph.node}
    assert not ops & {"TopK", "Sort", "NonZero", "Loop", "If", "Split"}, ops


def test_onnx_pack_index_is_an_int32_gather_index(exported):
    """docs/TENSORRT_10.3.md sections 3 and 7: pack_index is int32 and read only as the indices of one
    Gather, with no Cast to int64 or GatherND anywhere; no input's values reach a shape."""
    _, _, model = exported
    dtypes = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    assert dtypes == {"pixel_values": TensorProto.FLOAT, "pack_index": TensorProto.INT32}
    nodes = inline(model).graph.node
    assert [(n.op_type, i) for n in nodes for i, x in enumerate(n.input) if x == "pack_index"] == [("Gather", 1)]
    casts = [onnx.helper.get_node_attr_value(n, "to") for n in nodes if n.op_type == "Cast"]
    assert TensorProto.INT64 not in casts and "GatherND" not in {n.op_type for n in nodes}
    assert check_no_shape_inputs(model) == []


# --- presets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(RANDOM_PRESETS))
def test_preset_structure(preset):
    config = random_config(preset)
    text = config.text_config
    assert config.model_type == "llava_next" and config.image_grid_pinpoints == PINPOINTS
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert text.model_type == RANDOM_PRESETS[preset].text_model_type
    assert getattr(text, "sliding_window", None) is None and text.max_position_embeddings >= 4096 + 512
    assert RANDOM_PRESETS[preset].chat_template in CHAT_TEMPLATES


def test_7b_shape_parameter_count():
    """CLIP ViT-L/14-336 (303.5M) + projector (21.0M) + image_newline + Mistral-7B with 32064 tokens."""
    model = build_random_model("llava-next-7b-shape", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 7_566_747_648
    text = model.config.text_config
    assert (text.num_key_value_heads, text.intermediate_size, text.rope_parameters["rope_theta"]) == (8, 14336, 1e6)


@pytest.mark.parametrize("preset", TINY)
def test_tiny_processor_renders_and_expands(preset):
    processor = tiny_processor(preset)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert processor.apply_chat_template(conv, add_generation_prompt=True) == RENDERED[preset]
    assert type(processor.image_processor).__name__ == "LlavaNextImageProcessorPil"
    config = random_config(preset)
    for size, (crops, n) in SIZES.items():
        batch = _prompt(processor, _image(*size))
        ids = batch["input_ids"][0]
        assert batch["pixel_values"].shape == (1, crops, 3, 336, 336)
        assert int((ids == config.image_token_id).sum()) == n == hf_pack_index(config, *size).shape[0]
        assert batch["image_sizes"].tolist() == [list(size)] and int(ids[0]) == 1  # <s>


@pytest.mark.parametrize("preset", TINY)
def test_tiny_generates_and_prunes(preset):
    """weight_scale 12: on a 2928-token prompt, 20 greedy tokens are not one repeated token, and
    heavy pruning (ratio 0.111: 324 of 2928 vision tokens) changes them. Eager DART at 1.0 equals
    HF generate."""
    hf, processor = build_random_model(preset), tiny_processor(preset)
    batch = _prompt(processor, _image(700, 700))
    assert int((batch["input_ids"] == hf.config.image_token_id).sum()) == 2928
    eager = EagerDart(hf, DartConfig())
    image_kwargs = {"image_sizes": batch["image_sizes"]}
    full, pruned = (eager.generate(batch["input_ids"], batch["pixel_values"], keep_ratio=r, max_new_tokens=20,
                                   image_kwargs=image_kwargs).token_ids for r in (1.0, 0.111))
    assert len(set(full)) > 1 and full != pruned
    with torch.no_grad():
        hf_tokens = hf.generate(**batch, max_new_tokens=5, do_sample=False)[0, batch["input_ids"].shape[1]:]
    assert hf_tokens.tolist() == full[:5]


def test_tiny_checkpoint_round_trip(tiny, tmp_path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = tiny_processor("llava-next-tiny")
    tiny.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    hf = LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlavaNextProcessor"
    assert type(loaded.image_processor).__name__ == "LlavaNextImageProcessorPil"
    assert loaded.chat_template == processor.chat_template == CHAT_TEMPLATES["mistral-instruct"]
    assert (loaded.patch_size, loaded.num_additional_image_tokens, loaded.vision_feature_select_strategy) == (
        14, 1, "default")
    want, got = tiny.state_dict(), hf.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    image = _image(320, 640)
    a, b = _prompt(processor, image), _prompt(loaded, image)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(hf(**b).logits[0, -1], tiny(**a).logits[0, -1])

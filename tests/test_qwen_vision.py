"""Qwen2-VL / Qwen2.5-VL vision stage: numpy grid tables (runtime/qwen_vision.py) against
transformers' own helpers, the export wrappers (export/families/qwen_vision.py) against HF's vision
tower, and their ONNX graphs (patches and windows dynamic) against the wrappers."""

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from dart_ops.onnx_op_slots import check_no_shape_inputs
from export.check_trt import check_model, inline
from export.families.qwen_vision import (
    Qwen25VisionStage,
    example_inputs,
    make_stage,
    stage_io,
    torch_dynamic_shapes,
    vision_config,
)
from export.stages import _export
from runtime.errors import InputError
from runtime.qwen_vision import (
    QwenVisionConfig,
    padded_windows,
    vision_inputs,
    vision_position_ids,
    window_layout,
)

GRIDS = [(8, 12), (16, 22), (20, 10), (6, 6), (4, 4)]
LARGE = (64, 80)  # 80 windows
TRACE = (16, 22)  # 2 windows: a traced size of 1 would be specialised away
OTHER = [(8, 12), (20, 10), (6, 6), (4, 4)]  # validation grids, none of them the traced one
Q25 = QwenVisionConfig("qwen2_5_vl")
TOL = 1e-5
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "bos_token_id": 0, "eos_token_id": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
VISION = {
    "qwen2_vl": {"depth": 3, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
    "qwen2_5_vl": {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "num_heads": 2,
                   "fullatt_block_indexes": [2]},
}


def _tiny(kind: str):
    """A seeded tiny model (real patch 14 / temporal 2 / merge 2 / window 112) whose vision weights
    are redrawn large enough that attention is far from uniform, so a wrong window shows."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    config_cls, model_cls = {"qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
                             "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}[kind]
    config = config_cls(vision_config=VISION[kind], text_config=TEXT)
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.model.visual.named_parameters():
            scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1
            centre = 1.0 if ("norm" in name or "ln_q" in name) else 0.0
            p.copy_(centre + scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny(request):
    return _tiny(request.param)


def _hf_features(model, pixels, gh, gw):
    with torch.no_grad():
        return model.model.visual(pixels, grid_thw=torch.tensor([[1, gh, gw]])).pooler_output  # (M, D)


# --- numpy tables vs transformers.vision_utils ---------------------------------------------------------

@pytest.mark.parametrize("gh, gw", GRIDS + [LARGE])
def test_position_ids_equal_transformers(gh, gw):
    want = get_vision_position_ids(torch.tensor([[1, gh, gw]]), 2).numpy()
    got = vision_position_ids(gh, gw, 2)
    assert got.dtype == np.int32 and np.array_equal(got, want)


@pytest.mark.parametrize("window_size", [112, 56])  # 4 and 2 merge units a side: sizes come from the config
@pytest.mark.parametrize("gh, gw", GRIDS + [LARGE, (16, 16)])  # 16x16: divisible, HF pads a whole window
def test_window_layout_equals_transformers(gh, gw, window_size):
    cfg = QwenVisionConfig("qwen2_5_vl", window_size=window_size)
    want_index, want_cu = get_vision_window_index(torch.tensor([[1, gh, gw]]), 2, window_size, 14)
    index, cu = window_layout(gh, gw, cfg)
    assert np.array_equal(index, want_index.numpy()) and index.dtype == np.int32
    assert np.array_equal(cu, want_cu.numpy()) and cu.dtype == np.int32
    inputs = vision_inputs(gh, gw, cfg)
    assert np.array_equal(inputs["reverse_index"], torch.argsort(want_index).numpy())
    tables = padded_windows(cu, cfg.window_patches)
    assert all(np.array_equal(inputs[k], v) for k, v in tables.items())
    # The padded layout holds each permuted patch exactly once, in order, and nothing else.
    N, P = gh * gw, (window_size // 14) ** 2
    assert tables["win_gather"].shape == (len(cu) - 1, P) == tables["win_valid"].shape
    assert np.array_equal(tables["win_gather"].reshape(-1)[tables["win_unpad"]], np.arange(N))
    assert np.array_equal(tables["win_valid"].sum(1), np.diff(cu))
    assert np.array_equal(np.flatnonzero(tables["win_valid"].reshape(-1)), np.sort(tables["win_unpad"]))


def test_padded_windows_by_hand():
    """Grid 10x10 patches = 5x5 merge units: windows of 4x4, 4x1, 1x4 and 1x1 units (64, 16, 16, 4 patches)."""
    t = vision_inputs(10, 10, Q25)
    assert np.array_equal(t["window_index"], [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18,  # 4x4
                                              4, 9, 14, 19, 20, 21, 22, 23, 24])
    assert np.array_equal(t["reverse_index"][[0, 4, 5, 19, 20, 24]], [0, 16, 4, 19, 20, 24])
    assert t["win_gather"].shape == (4, 64) and t["win_valid"].dtype == bool
    assert np.array_equal(t["win_gather"][0], np.arange(64))
    assert np.array_equal(t["win_gather"][3], np.r_[96, 97, 98, 99, np.zeros(60, np.int32)])
    assert np.array_equal(t["win_valid"].sum(1), [64, 16, 16, 4]) and t["win_valid"][2, :16].all()
    assert np.array_equal(t["win_unpad"], np.r_[np.arange(80), np.arange(128, 144), np.arange(192, 196)])


def test_vision_inputs_order_and_types():
    q2 = QwenVisionConfig("qwen2_vl")
    assert list(vision_inputs(4, 6, q2)) == stage_io(q2, 64).input_names()[1:]
    t = vision_inputs(4, 6, Q25)
    assert list(t) == stage_io(Q25, 64).input_names()[1:]
    assert {k: v.dtype for k, v in t.items()} == {**dict.fromkeys(t, np.dtype(np.int32)), "win_valid": bool}
    assert {name: dtype for name, dtype, _ in stage_io(Q25, 64).inputs[1:]} == {
        **dict.fromkeys(t, "int32"), "win_valid": "bool"}  # the declaration says what the runtime feeds
    assert q2.patch_dim == 1176 and Q25.window_units == 4 and Q25.window_patches == 64


@pytest.mark.parametrize("gh, gw", [(5, 6), (4, 0), (-2, 4)])
def test_bad_grid_is_an_input_error(gh, gw):
    with pytest.raises(InputError, match="multiple of the merge size 2"):
        vision_inputs(gh, gw, Q25)


def test_int32_tables_are_bounded():
    """The int32 tables cannot overflow: more patches than MAX_PATCHES (2^26, one per pixel of the
    largest image) is refused before anything is allocated, and so are window tables past int32."""
    side = 1 << 13  # 8192 x 8192 = 2^26 patches: the limit itself passes the check
    with pytest.raises(InputError, match="more than MAX_PATCHES = 67108864"):
        vision_inputs(side, side + 2, Q25)
    with pytest.raises(ValueError, match="2 windows of 1073741824 patches overflow the int32"):
        padded_windows(np.array([0, 4, 8], np.int32), 1 << 30)  # refused before any (Wn, P) table exists


def test_runtime_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "from runtime.qwen_vision import vision_inputs, QwenVisionConfig; "
            "print(len(vision_inputs(8, 10, QwenVisionConfig('qwen2_5_vl'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "6"


# --- eager wrappers vs HF's vision tower -----------------------------------------------------------------

def test_vision_config_from_hf(tiny):
    cfg = vision_config(tiny.config)
    assert cfg.kind == tiny.config.model_type and (cfg.patch, cfg.merge, cfg.temporal) == (14, 2, 2)
    assert cfg.kind == "qwen2_vl" or cfg.window_size == 112


def test_wrapper_adds_no_weights(tiny):
    stage = make_stage(tiny)
    assert stage.visual is tiny.model.visual
    assert {id(p) for p in stage.parameters()} == {id(p) for p in tiny.model.visual.parameters()}


def test_eager_wrapper_equals_hf(tiny):
    stage, cfg = make_stage(tiny), vision_config(tiny.config)
    grids = GRIDS + ([LARGE] if cfg.kind == "qwen2_5_vl" else [])  # full attention over 5120 patches: slow
    for gh, gw in grids:
        args = example_inputs(cfg, gh, gw, seed=gh * gw)
        want = _hf_features(tiny, args[0], gh, gw)
        with torch.no_grad():
            got = stage(*args)
        assert got.shape == (gh * gw // 4, 64)
        assert (got - want).abs().max().item() <= TOL, (gh, gw)


def test_window_attention_matters():
    """The parity above could not pass with the windows ignored: full attention everywhere differs."""
    model = _tiny("qwen2_5_vl")
    stage = make_stage(model)
    assert isinstance(stage, Qwen25VisionStage) and stage.full_blocks == {2}
    args = example_inputs(Q25, *TRACE)
    stage.full_blocks = frozenset(range(4))
    with torch.no_grad():
        assert (stage(*args) - _hf_features(model, args[0], *TRACE)).abs().max().item() > 1e-2


# --- ONNX: dynamic patches and windows --------------------------------------------------------------------

BOUNDS = {"patches": (16, 16384), "merged": (4, 4096), "windows": (1, 1024)}


@pytest.fixture(scope="module")
def exported(tiny):
    stage, cfg = make_stage(tiny), vision_config(tiny.config)
    io = stage_io(cfg, 64)
    used = {d for _, _, dims in io.inputs for d in dims if isinstance(d, str)}
    shapes = torch_dynamic_shapes(io, {a: BOUNDS[a] for a in used})
    model = _export(stage, example_inputs(cfg, *TRACE), shapes, io.input_names(), [io.output[0]], 18)
    return stage, cfg, io, model


def test_onnx_inputs_stay_symbolic(exported):
    _, _, io, model = exported
    graph_inputs = {v.name: v.type.tensor_type.shape.dim for v in model.graph.input}
    assert list(graph_inputs) == io.input_names()
    for name, _, dims in io.inputs:
        got = graph_inputs[name]
        assert len(got) == len(dims)
        for want, dim in zip(dims, got):
            if isinstance(want, str):
                assert not dim.HasField("dim_value") and dim.dim_param == want, (name, dim)
            else:
                assert dim.dim_value == want, (name, dim)


def test_onnx_equals_eager_on_other_grids(exported):
    stage, cfg, io, model = exported
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    grids = OTHER + ([LARGE] if cfg.kind == "qwen2_5_vl" else [])
    for gh, gw in grids:
        args = example_inputs(cfg, gh, gw, seed=7)
        with torch.no_grad():
            want = stage(*args).numpy()
        feeds = {name: t.numpy() for name, t in zip(io.input_names(), args)}
        if cfg.kind == "qwen2_5_vl":  # the window count really varies
            assert feeds["win_gather"].shape[0] == {(8, 12): 2, (20, 10): 6, (6, 6): 1, (4, 4): 1, LARGE: 80}[gh, gw]
        got = session.run(None, feeds)[0]
        assert got.shape == want.shape and np.abs(got - want).max() <= TOL, (gh, gw)


def test_onnx_passes_tensorrt_check(exported):
    _, _, _, model = exported
    findings = check_model(model, "vision_encoder.onnx")
    assert [f.line() for f in findings if f.severity == "error"] == []
    ops = {n.op_type for n in inline(model).graph.node}
    assert not ops & {"TopK", "Sort", "ArgMax", "NonZero", "Loop", "If", "Split"}, ops
    assert onnx.checker.check_model(model) is None


INDEX_TABLES = ("window_index", "reverse_index", "win_gather", "win_unpad")
INPUT_DTYPES = {"pixel_values": TensorProto.FLOAT, "vision_position_ids": TensorProto.INT32,
                **dict.fromkeys(INDEX_TABLES, TensorProto.INT32), "win_valid": TensorProto.BOOL}


def test_onnx_integer_inputs_are_int32_gather_indices(exported):
    """docs/TENSORRT_10.3.md sections 3 and 7: every integer input is int32, each window table is read
    only as a Gather's indices, and no Cast to int64 or GatherND is left anywhere (the positions are
    only cast to float); no input's values reach a shape (TensorRT would make it a shape input)."""
    _, cfg, _, model = exported
    got = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    assert got == {name: INPUT_DTYPES[name] for name in got} and len(got) == (7 if cfg.kind == "qwen2_5_vl" else 2)
    nodes = inline(model).graph.node
    for name in (t for t in INDEX_TABLES if t in got):
        assert {(n.op_type, i) for n in nodes for i, x in enumerate(n.input) if x == name} == {("Gather", 1)}, name
    casts = [onnx.helper.get_node_attr_value(n, "to") for n in nodes if n.op_type == "Cast"]
    assert TensorProto.INT64 not in casts and "GatherND" not in {n.op_type for n in nodes}
    assert check_no_shape_inputs(model) == []

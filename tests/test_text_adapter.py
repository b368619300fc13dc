"""One DART decoder over several text stacks (dart_ops.text_adapter): tiny random Mistral, Qwen2 and
Qwen2-VL (M-RoPE, position_ids [3, B, S]) models. Unpruned, DartDecoder equals the HF model's own
forward (prefill and a decode step); pruned, it keeps exactly what the reference selects from HF's
own layer K-1 states; a 3-row position input with equal rows equals the 1-D stack."""

import pytest
import torch

from dart_ops.decoder import DartDecoder
from dart_ops.eager import EagerDart
from dart_ops.reference import select_keep
from dart_ops.spec import DartConfig, find_span
from dart_ops.text_adapter import MRopeAdapter, TextAdapter, for_model, register

transformers = pytest.importorskip("transformers")

SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 1024,
         "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
A, LH, LW, AFTER = 5, 8, 10, 20  # prompt: 5 text tokens, an 8x10 "image" span, 20 text tokens
L = LH * LW
S = A + L + AFTER
TOL = {"atol": 1e-5, "rtol": 1e-5}


class _QwenVLText(torch.nn.Module):
    """Qwen2-VL's text stack + an LM head: the decoder part of Qwen2VLForConditionalGeneration."""

    def __init__(self, **extra):
        super().__init__()
        from transformers import Qwen2VLTextConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim 16
        self.model = Qwen2VLTextModel(Qwen2VLTextConfig(**SIZES, rope_parameters=rope, **extra))
        self.lm_head = torch.nn.Linear(SIZES["hidden_size"], SIZES["vocab_size"], bias=False)

    def forward(self, input_ids, position_ids):
        h = self.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        return self.lm_head(h)  # (B, S, V)


def _build(kind: str, seed: int = 0, **extra):
    """A tiny random model; 2-D weights x8 so that logits (and greedy tokens) vary."""
    torch.manual_seed(seed)
    if kind == "mistral":
        config = transformers.MistralConfig(**SIZES, **{"sliding_window": None, **extra})
        model = transformers.MistralForCausalLM(config)
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES, **extra))
    else:
        model = _QwenVLText(**extra)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return {kind: _build(kind) for kind in ("mistral", "qwen2", "qwen2_vl")}


def _mrope_positions() -> tuple[torch.Tensor, int]:
    """(3, 1, S) M-RoPE ids as Qwen2-VL's get_rope_index lays them out for text, one LH x LW
    image (rows T, H, W), text; and rope_delta = max + 1 - S (negative)."""
    text0 = torch.arange(A).expand(3, A)
    rows = torch.arange(LH).repeat_interleave(LW)  # row-major over the merged grid
    cols = torch.arange(LW).repeat(LH)
    image = torch.stack([torch.zeros(L, dtype=torch.long), rows, cols]) + A
    text1 = torch.arange(AFTER).expand(3, AFTER) + A + max(LH, LW)
    pos = torch.cat([text0, image, text1], dim=1)[:, None]  # (3, 1, S)
    return pos, int(pos.max()) + 1 - S


def _inputs(kind: str, seed: int = 0):
    """ids (1, S), the prompt's position ids in the model's layout, and the decode offset."""
    ids = torch.randint(3, SIZES["vocab_size"], (1, S), generator=torch.Generator().manual_seed(seed))
    if kind == "qwen2_vl":
        pos, delta = _mrope_positions()
        return ids, pos, delta
    return ids, torch.arange(S)[None], 0


def _adapter(model):
    return for_model(model.model, model.lm_head)


def _hf_logits(model, ids, pos):
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos)
    return out if isinstance(model, _QwenVLText) else out.logits  # (1, S, V)


def _scalars(*xs):
    return [torch.tensor(x) for x in xs]


# --- the registry ---------------------------------------------------------------------------------


def test_registry_picks_the_adapter_and_reads_kv_dims(models):
    want = {"num_layers": 4, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 64, "vocab_size": 256}
    one_d, mrope = ("batch", "seq"), (3, "batch", "seq")
    for kind, cls, shape in [("mistral", TextAdapter, one_d), ("qwen2", TextAdapter, one_d),
                             ("qwen2_vl", MRopeAdapter, mrope)]:
        text = _adapter(models[kind])
        assert type(text) is cls and text.position_shape == shape
        assert text.kv_dims() == want
        assert text.embed is models[kind].model.embed_tokens and text.norm is models[kind].model.norm
        assert text.sliding_window is None


def test_registry_refuses_unknown_planned_and_duplicate_types(models):
    model = models["qwen2"]
    old = model.model.config.model_type
    try:
        model.model.config.model_type = "gpt2"
        with pytest.raises(ValueError, match="no DART text adapter for model_type 'gpt2'.*llama, mistral"):
            _adapter(model)
        model.model.config.model_type = "qwen3_vl_text"
        with pytest.raises(NotImplementedError, match="deepstack"):
            _adapter(model)
    finally:
        model.model.config.model_type = old
    with pytest.raises(ValueError, match="already registered"):
        register("mistral")(TextAdapter)
    with pytest.raises(TypeError, match="lm_head"):
        DartDecoder(model.model)


def test_adapter_refuses_a_config_that_does_not_match_the_modules():
    model = _build("qwen2")
    model.model.config.num_key_value_heads = 4
    with pytest.raises(ValueError, match=r"num_key_value_heads \* head_dim 64 \(modules: 32\)"):
        _adapter(model)


def test_sliding_window_is_read_from_the_config():
    assert _adapter(_build("mistral", sliding_window=64)).sliding_window == 64
    # Qwen2 applies its window only to layers declared "sliding_attention" (none by default).
    assert _adapter(_build("qwen2", sliding_window=64)).sliding_window is None
    windowed = _build("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0)
    assert _adapter(windowed).sliding_window == 64


def test_position_layout_is_checked(models):
    text = _adapter(models["qwen2"])
    h = torch.zeros(1, 5, 64)
    with pytest.raises(ValueError, match=r"position_ids of shape \['batch', 'seq'\], got \[3, 1, 5\]"):
        text.rotary(h, torch.zeros(3, 1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[3, 'batch', 'seq'\], got \[1, 5\]"):
        _adapter(models["qwen2_vl"]).rotary(h, torch.zeros(1, 5, dtype=torch.long))


# --- parity with the HF model ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen2_vl"])
def test_unpruned_equals_hf_forward_prefill_and_decode(models, kind):
    model = models[kind]
    text = _adapter(model)
    dec = DartDecoder(text, layer=2)
    ids, pos, delta = _inputs(kind)
    nxt = torch.tensor([[7]])
    with torch.no_grad():
        low, high = dec.empty_past(1, torch.float32)
        logits, low, high, kept, _ = dec(text.embed(ids), pos, *_scalars(A, 0, 0), low, high)
        # decode one token at S + delta (all three rows for M-RoPE) on the prefill's cache
        step = text.positions(torch.tensor([[S + delta]]))
        step_logits, low2, high2, *_ = dec(text.embed(nxt), step, *_scalars(0, 0, 0), low, high)
    hf = _hf_logits(model, ids, pos)
    torch.testing.assert_close(logits, hf[:, -1], **TOL)
    assert kept.tolist() == [list(range(S))]
    assert [k.shape[2] for k, _ in low2 + high2] == [S + 1] * 4

    # HF's decode rule (compute_3d_position_ids): S + t + rope_delta, the same in every row
    hf_pos = torch.cat([pos, torch.full_like(pos[..., :1], S + delta)], -1)
    hf_step = _hf_logits(model, torch.cat([ids, nxt], 1), hf_pos)
    torch.testing.assert_close(step_logits, hf_step[:, -1], **TOL)


def _hf_layer_states(model, ids, pos, K):
    """Layer K-1's output through the final norm and its post-RoPE keys (B, S, Hkv*dh), from HF."""
    stack = model.model
    with torch.no_grad():
        out = stack(input_ids=ids, position_ids=pos, output_hidden_states=True, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    keys = cache.layers[K - 1].keys  # (B, Hkv, S, dh)
    return stack.norm(out.hidden_states[K]), keys.transpose(1, 2).reshape(1, S, -1)


@pytest.mark.parametrize("kind,K,ratio", [("mistral", 2, 0.333), ("qwen2", 1, 0.111), ("qwen2", 3, 0.222),
                                          ("qwen2_vl", 2, 0.333), ("qwen2_vl", 3, 0.111)])
def test_pruned_keeps_reference_selection(models, kind, K, ratio):
    model = models[kind]
    text = _adapter(model)
    ids, pos, _ = _inputs(kind, seed=K)
    counts = DartConfig(layer=K, keep_ratio=ratio).counts(L, AFTER)
    assert counts.prune
    dec = DartDecoder(text, layer=K)
    with torch.no_grad():
        past = dec.empty_past(1, torch.float32)
        _, low, high, kept, _ = dec(text.embed(ids), pos, *_scalars(A, L, counts.quota), *past)
    hidden, keys = _hf_layer_states(model, ids, pos, K)
    want = select_keep(hidden[0], keys[0], A, L, counts.quota)
    assert kept[0].tolist() == want.tolist()
    assert kept.shape[1] == counts.kept_len(S) < S
    assert [k.shape[2] for k, _ in low + high] == [S] * K + [counts.kept_len(S)] * (4 - K)


def _authors_style_logits(model, ids, pos, K, keep):
    """The authors' way, with HF's own modules: layer K's input from HF's forward, rows `keep`,
    position ids sliced by `keep` (pos[..., keep]) and the rotary recomputed, HF's layers >= K."""
    stack = model.model
    with torch.no_grad():
        h = stack(input_ids=ids, position_ids=pos, output_hidden_states=True).hidden_states[K][:, keep]
        cos_sin = stack.rotary_emb(h, pos[..., keep])
        n = len(keep)
        mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
        for layer in stack.layers[K:]:
            h = layer(h, attention_mask=mask, position_embeddings=cos_sin)
        return model.lm_head(stack.norm(h[:, -1]))


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen2_vl"])
def test_pruned_tokens_keep_their_original_positions(models, kind):
    """Pruned logits equal the authors-style computation: the gathered rotary rows are the rotary
    of the kept tokens' original (for Qwen2-VL: 3-row) position ids."""
    model = models[kind]
    text = _adapter(model)
    ids, pos, _ = _inputs(kind, seed=5)
    dec = DartDecoder(text, layer=2)
    with torch.no_grad():
        logits, *_, kept, _ = dec(text.embed(ids), pos, *_scalars(A, L, 3), *dec.empty_past(1, torch.float32))
    keep = select_keep(*(x[0] for x in _hf_layer_states(model, ids, pos, 2)), A, L, 3)
    assert kept[0].tolist() == keep.tolist()
    torch.testing.assert_close(logits, _authors_style_logits(model, ids, pos, 2, keep), **TOL)


def test_mrope_with_equal_rows_equals_the_1d_stack(models):
    """Qwen2-VL's text stack with its weights loaded into a Qwen2 stack: [3, B, S] positions whose
    rows are equal give the 1-D result, pruned (same kept indices) and unpruned."""
    vl = models["qwen2_vl"]
    flat = _build("qwen2")
    flat.model.load_state_dict(vl.model.state_dict())
    flat.lm_head.load_state_dict(vl.lm_head.state_dict())
    one, three = _adapter(flat), _adapter(vl)
    ids = _inputs("qwen2", seed=3)[0]
    pos = torch.arange(S)[None]
    assert three.positions(pos).shape == (3, 1, S)
    for span_len, quota in [(0, 0), (L, 3)]:
        with torch.no_grad():
            got1 = DartDecoder(one)(one.embed(ids), pos, *_scalars(A, span_len, quota),
                                    *DartDecoder(one).empty_past(1, torch.float32))
            got3 = DartDecoder(three)(three.embed(ids), three.positions(pos), *_scalars(A, span_len, quota),
                                      *DartDecoder(three).empty_past(1, torch.float32))
        torch.testing.assert_close(got3[0], got1[0], atol=1e-6, rtol=1e-6)
        assert torch.equal(got3[-2], got1[-2])  # kept indices
        assert torch.equal(got3[-1], got1[-1])  # image pivots
    assert got1[-2].shape[1] == DartConfig(keep_ratio=0.333).counts(L, AFTER).kept_len(S)


# --- the eager baseline on a text stack -----------------------------------------------------------


def test_eager_dart_on_a_bare_causal_lm_equals_hf_generate(models):
    model = models["mistral"]
    ids = _inputs("mistral", seed=4)[0][:, :40]
    out = EagerDart(model, DartConfig(keep_ratio=0.111)).generate(ids, None, max_new_tokens=12)
    want = model.generate(input_ids=ids, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert out.token_ids == want[0, 40:].tolist()
    assert len(set(out.token_ids)) > 3, "tiny model output should vary"
    assert out.kept_positions == list(range(40))


def test_eager_dart_refuses_contexts_past_the_sliding_window():
    model = _build("mistral", sliding_window=48)
    ids = torch.randint(3, 256, (1, 40))
    EagerDart(model, DartConfig()).generate(ids, None, max_new_tokens=8)  # 48: within the window
    with pytest.raises(ValueError, match=r"exceeds the model's sliding window \(48\)"):
        EagerDart(model, DartConfig()).generate(ids, None, max_new_tokens=9)


def _tiny_qwen2_vl():
    """Qwen2VLForConditionalGeneration: one-block vision tower, the tiny text stack."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    V = SIZES["vocab_size"]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = {"depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64, "mlp_ratio": 2,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    cfg = Qwen2VLConfig(text_config={**SIZES, "rope_parameters": rope}, vision_config=vision,
                        image_token_id=V - 1, video_token_id=V - 2, vision_start_token_id=V - 3,
                        vision_end_token_id=V - 4)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.mul_(8.0)
    return model


def test_eager_dart_on_qwen2_vl_equals_hf_generate_and_prunes_like_the_reference():
    """The whole eager path on Qwen2-VL: image features by HF's get_image_features, M-RoPE ids and
    rope_delta from HF's get_rope_index (what the family supplies), decode at S + t + delta."""
    model = _tiny_qwen2_vl()
    V = SIZES["vocab_size"]
    grid = torch.tensor([[1, 2 * LH, 2 * LW]])  # patches; merged 2x2 -> LH x LW = L tokens
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(4 * L, 3 * 2 * 14 * 14, generator=g)
    ids = torch.cat([torch.randint(3, V - 4, (1, A - 1), generator=g), torch.tensor([[V - 3]]),
                     torch.full((1, L), V - 1), torch.tensor([[V - 4]]),
                     torch.randint(3, V - 4, (1, AFTER - 1), generator=g)], 1)  # (1, S)
    types = (ids == V - 1).int()  # mm_token_type_ids: 1 on image tokens
    hf_inputs = {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid, "mm_token_type_ids": types}
    # HF's M-RoPE ids (3, 1, S) and rope_delta (1, 1)
    pos, delta = model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)
    run = {"max_new_tokens": 10, "position_ids": pos, "rope_delta": int(delta),
           "image_kwargs": {"image_grid_thw": grid}}
    eager = EagerDart(model, DartConfig(layer=2, keep_ratio=0.333))
    assert type(eager.text) is MRopeAdapter and int(delta) < 0

    out = eager.generate(ids, pixels, keep_ratio=1.0, **run)
    with torch.no_grad():
        want = model.generate(**hf_inputs, do_sample=False, max_new_tokens=10, min_new_tokens=10)
    assert out.token_ids == want[0, S:].tolist()
    assert len(set(out.token_ids)) > 3, "tiny model output should vary"

    pruned = eager.generate(ids, pixels, **run)
    with torch.no_grad():
        hf = model(**hf_inputs, output_hidden_states=True, use_cache=True)
    keys = (getattr(hf, "cache", None) or hf.past_key_values).layers[1].keys  # layer K-1 = 1
    hidden = model.model.language_model.norm(hf.hidden_states[2])
    quota = DartConfig(keep_ratio=0.333).counts(L, AFTER).quota
    want = select_keep(hidden[0], keys[0].transpose(0, 1).reshape(S, -1), A, L, quota)
    assert pruned.kept_positions == want.tolist()
    assert len(want) == DartConfig(keep_ratio=0.333).counts(L, AFTER).kept_len(S)
    with pytest.raises(ValueError, match="M-RoPE position ids depend on the image grid"):
        eager.generate(ids, pixels, max_new_tokens=2, image_kwargs={"image_grid_thw": grid})


# --- the span rule shared with the runtime --------------------------------------------------------


def test_find_span():
    import numpy as np

    assert find_span([1, 9, 9, 9, 2], 9) == (1, 3)
    assert find_span(np.array([9, 9, 0]), 9) == (0, 2)
    assert find_span([1, 2, 3], 9) == (0, 0)
    assert find_span([], 9) == (0, 0)
    with pytest.raises(ValueError, match=r"3 image tokens \(id 9\) are not one contiguous run"):
        find_span([9, 1, 9, 9], 9)


# --- the family supplies the adapter --------------------------------------------------------------


def test_llava_family_supplies_the_llama_adapter(tiny_llava):
    from dart_ops.flops import ModelShape
    from export import stages
    from export.families import families

    family = families()["llava"]
    text = family.text_adapter(tiny_llava)
    assert type(text) is TextAdapter and text.config.model_type == "llama"
    assert text.kv_dims() == {"num_layers": 4, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 64,
                              "vocab_size": 1024}
    flat = family.stage_modules(type("Loaded", (), {"model": tiny_llava})(), DartConfig())["decoder"]
    assert type(flat.decoder.text) is TextAdapter and stages.decoder_dims(flat) == text.kv_dims()
    assert type(family.eager(tiny_llava, DartConfig()).text) is TextAdapter
    config = tiny_llava.config.to_dict()
    assert family.flop_shape(config) == ModelShape.from_llava_config(config)
    assert family.flop_shape(config).text.kv_heads == 2


def test_mrope_decoder_exports_with_one_dartprune_node_and_matches_eager():
    """The 3-row M-RoPE decoder (Qwen2-VL text stack) exports like LLaVA's: position_ids [3, batch,
    seq] stay dynamic, one dart::DartPruneSlots node and no shape-tensor input, and ONNX Runtime equals eager (kept indices exactly,
    logits within 1e-4) for two quotas, no pruning, and a decode step at S + rope_delta."""
    import numpy as np
    import onnxruntime as ort

    from dart_ops.decoder import FlatDecoder
    from dart_ops.onnx_export import attach_dart_function, exporting

    vl = _build("qwen2_vl")
    vl.model.config._attn_implementation = "eager"
    flat = FlatDecoder(DartDecoder(_adapter(vl), layer=2)).eval()
    n = len(flat.input_names()) - 6  # past tensors
    I32 = lambda *xs: [torch.tensor(x, dtype=torch.int32) for x in xs]  # noqa: E731
    slots = lambda S_, a, span, q, b=1: flat.decoder.kept_slots(b, S_, a, span, q)  # noqa: E731
    B, Sd = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=1, max=1024)
    PF, PK = torch.export.Dim("past_full", min=0, max=1024), torch.export.Dim("past_kept", min=0, max=1024)
    KEPT = torch.export.Dim("kept", min=1, max=1024)
    pos, delta = _mrope_positions()
    pos = pos.to(torch.int32)
    kv_heads, head_dim = flat.decoder.text.dims.kv_heads, flat.decoder.text.dims.head_dim
    hidden = flat.decoder.text.dims.hidden
    args = (torch.randn(2, S, hidden), pos.expand(3, 2, S), *I32(A, L, 3), slots(S, A, L, 3, 2),
            tuple(torch.zeros(2, kv_heads, 0, head_dim) for _ in range(n)))
    kv = tuple({0: B, 2: PF if i < 2 * 2 else PK} for i in range(n))
    with torch.no_grad(), exporting() as table:
        prog = torch.onnx.export(flat, args, dynamo=True, opset_version=18,
                                 dynamic_shapes=({0: B, 1: Sd}, {1: B, 2: Sd}, None, None, None, {0: B, 1: KEPT}, kv),
                                 input_names=flat.input_names(), output_names=flat.output_names(),
                                 custom_translation_table=table, verbose=False)
    m = attach_dart_function(prog.model_proto)
    dims = [d.dim_param or d.dim_value for d in m.graph.input[1].type.tensor_type.shape.dim]
    assert dims[0] == 3 and all(isinstance(d, str) for d in dims[1:]), dims
    assert sum(node.domain == "dart" for node in m.graph.node) == 1
    from dart_ops.onnx_op_slots import check_no_shape_inputs

    assert check_no_shape_inputs(m) == []
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, S, hidden, generator=g)
    empty = tuple(torch.zeros(1, kv_heads, 0, head_dim) for _ in range(n))
    past_names = flat.input_names()[6:]
    with torch.no_grad():
        for span, quota in [(L, 3), (L, 1), (0, 0)]:
            head = [emb, pos, *I32(A, span, quota), slots(S, A, span, quota)]
            want = flat(*head, empty)
            feeds = {name: t.numpy() for name, t in zip(flat.input_names(), head)}
            feeds.update({name: t.numpy() for name, t in zip(past_names, empty)})
            got = sess.run(None, feeds)
            assert np.array_equal(got[-2], want[-2].numpy()), (span, quota)  # kept indices
            assert np.array_equal(got[-1], want[-1].numpy()), (span, quota)  # image pivots
            assert np.abs(got[0] - want[0].numpy()).max() < 1e-4, (span, quota)
        prefill = flat(emb, pos, *I32(A, L, 3), slots(S, A, L, 3), empty)
        step = (torch.randn(1, 1, hidden, generator=g), torch.full((3, 1, 1), S + delta, dtype=torch.int32),
                *I32(0, 0, 0), slots(1, 0, 0, 0))
        want = flat(*step, tuple(prefill[1:-2]))
        feeds = {name: t.numpy() for name, t in zip(flat.input_names(), step)}
        feeds.update({name: t.numpy() for name, t in zip(past_names, prefill[1:-2])})
        got = sess.run(None, feeds)
        assert np.abs(got[0] - want[0].numpy()).max() < 1e-4

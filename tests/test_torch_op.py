"""torch.ops.dart.prune: eager kernel, and export to exactly one dart::DartPruneSlots node that ONNX
Runtime runs like the eager module (a toy module, and the tiny LLaVA decoder with DART); the pruned
length comes from kept_slots' shape, so no graph input is a shape tensor."""

import contextlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dart_ops.decoder import DartDecoder, FlatDecoder
from dart_ops.onnx_export import attach_dart_function, exporting
from dart_ops.onnx_op_slots import check_no_shape_inputs
from dart_ops.reference import select_keep
from dart_ops.spec import kept_len

OPSET = 18


def _scalars(*xs):
    return [torch.tensor(x, dtype=torch.int32) for x in xs]


def _slots(B, S, a, L, T, pi=4, pt=4):
    """kept_slots (B, S') for the op itself (no decoder clamp)."""
    return torch.zeros(B, kept_len(S, a, L, T, pi, pt), dtype=torch.int32)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _dart_nodes(model):
    return [(n.op_type, n.domain) for n in model.graph.node if n.domain == "dart"]


def test_eager_kernel_is_the_reference():
    torch.manual_seed(0)
    h, k = torch.randn(2, 80, 16), torch.randn(2, 80, 8)
    got = torch.ops.dart.prune(h, k, *_scalars(5, 60, 3), _slots(2, 80, 5, 60, 3), 4, 4)
    assert torch.equal(got, select_keep(h, k, 5, 60, 3))
    assert got.dtype == torch.long and got.shape == (2, 80 - 60 + 4 + 8 * 3)


def test_eager_kernel_refuses_a_wrong_kept_length():
    h, k = torch.randn(1, 80, 16), torch.randn(1, 80, 8)
    with pytest.raises(ValueError, match="kept_slots has 50 slots but DART keeps 48 tokens"):
        torch.ops.dart.prune(h, k, *_scalars(5, 60, 3), torch.zeros(1, 50, dtype=torch.int32), 4, 4)


class _Toy(torch.nn.Module):
    def forward(self, hidden, keys, span_start, span_len, quota, kept_slots):
        keep = torch.ops.dart.prune(hidden, keys, span_start, span_len, quota, kept_slots, 2, 3)  # (B, S')
        kept = torch.gather(hidden, 1, keep.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return kept.sum(-1), keep


def _export(module, args, dynamic_shapes, names=None, output_names=None):
    with exporting() as table:
        prog = torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic_shapes,
            custom_translation_table=table, input_names=names, output_names=output_names, verbose=False,
        )
    return attach_dart_function(prog.model_proto)


def test_toy_export_one_node_and_parity():
    B, S = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=2048)
    K = torch.export.Dim("kept", min=1, max=2048)
    args = (torch.randn(2, 50, 8), torch.randn(2, 50, 6), *_scalars(3, 30, 2), _slots(2, 50, 3, 30, 2, 2, 3))
    model = _export(_Toy(), args, ({0: B, 1: S}, {0: B, 1: S}, None, None, None, {0: B, 1: K}),
                    ["hidden", "keys", "span_start", "span_len", "quota", "kept_slots"])
    assert _dart_nodes(model) == [("DartPruneSlots", "dart")]
    assert [f.name for f in model.functions] == ["DartPruneSlots"]
    assert model.ir_version == 10
    assert check_no_shape_inputs(model) == []
    onnx.checker.check_model(model, full_check=True)
    sess = _session(model)
    g = torch.Generator().manual_seed(1)
    for S_, a, L, T in [(50, 3, 30, 2), (120, 10, 100, 7), (40, 0, 0, 3), (33, 1, 20, 0)]:
        h, k = torch.randn(3, S_, 8, generator=g), torch.randn(3, S_, 6, generator=g)
        slots = _slots(3, S_, a, L, T, 2, 3)
        want_sum, want_keep = _Toy()(h, k, *_scalars(a, L, T), slots)
        got_sum, got_keep = sess.run(None, {"hidden": h.numpy(), "keys": k.numpy(),
                                            **{n: t.numpy() for n, t in zip(("span_start", "span_len", "quota"),
                                                                            _scalars(a, L, T))},
                                            "kept_slots": slots.numpy()})
        np.testing.assert_array_equal(got_keep, want_keep.numpy())
        np.testing.assert_allclose(got_sum, want_sum.numpy(), rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def _attn(model, impl):
    """Export needs HF's "eager" attention (SDPA's GQA path guards on the pruned length)."""
    cfg = model.model.language_model.config
    old, cfg._attn_implementation = cfg._attn_implementation, impl
    try:
        yield
    finally:
        cfg._attn_implementation = old


@pytest.fixture(scope="module")
def tiny_decoder_onnx(tiny_llava):
    dec = FlatDecoder(DartDecoder(tiny_llava.model.language_model, tiny_llava.lm_head, layer=2))
    n_kv, dh = 2, 16
    D = tiny_llava.config.text_config.hidden_size
    B, S = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=1, max=2048)
    PF, PK = torch.export.Dim("past_full", min=0, max=2048), torch.export.Dim("past_kept", min=0, max=2048)
    KEPT = torch.export.Dim("kept", min=1, max=2048)
    past = tuple(torch.zeros(2, n_kv, 0, dh) for _ in range(8))
    args = (torch.randn(2, 100, D), torch.arange(100, dtype=torch.int32).expand(2, 100), *_scalars(10, 60, 3),
            dec.decoder.kept_slots(2, 100, 10, 60, 3), past)
    kv_dims = tuple({0: B, 2: PF if i < 4 else PK} for i in range(8))
    with _attn(tiny_llava, "eager"):
        model = _export(dec, args, ({0: B, 1: S}, {0: B, 1: S}, None, None, None, {0: B, 1: KEPT}, kv_dims),
                        dec.input_names(), dec.output_names())
    assert [v.name for v in model.graph.input] == dec.input_names()
    assert [v.name for v in model.graph.output] == dec.output_names()
    return dec, model


def test_decoder_export_one_dartprune_node(tiny_decoder_onnx):
    _, model = tiny_decoder_onnx
    assert _dart_nodes(model) == [("DartPruneSlots", "dart")]
    assert check_no_shape_inputs(model) == []
    onnx.checker.check_model(model, full_check=True)


def test_decoder_onnx_matches_eager_prefill_and_decode(tiny_llava, tiny_decoder_onnx):
    dec, model = tiny_decoder_onnx
    sess = _session(model)
    D = tiny_llava.config.text_config.hidden_size
    g = torch.Generator().manual_seed(7)
    S, a, L = 150, 6, 120
    emb = torch.randn(1, S, D, generator=g)
    pos = torch.arange(S, dtype=torch.int32).expand(1, S)
    empty = tuple(torch.zeros(1, 2, 0, 16) for _ in range(8))
    # One graph: three quotas and no pruning (span 0), then a decode step on the ragged cache.
    with _attn(tiny_llava, "eager"), torch.no_grad():
        for span_len, T in [(L, 8), (L, 2), (L, 0), (0, 0)]:
            head = [emb, pos, *_scalars(a, span_len, T), dec.decoder.kept_slots(1, S, a, span_len, T)]
            want = dec(*head, empty)
            feeds = {n: t.numpy() for n, t in zip(dec.input_names(), head)}
            feeds.update({n: t.numpy() for n, t in zip(dec.input_names()[6:], empty)})
            got = sess.run(None, feeds)
            np.testing.assert_array_equal(got[-2], want[-2].numpy())  # kept positions, exact
            np.testing.assert_array_equal(got[-1], want[-1].numpy())  # image pivots, exact
            np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4, rtol=1e-4)  # logits
            kept = want[-2].shape[1]
            assert [t.shape[2] for t in got[1:-2]] == [S] * 4 + [kept] * 4  # ragged KV
            if span_len:  # the image pivots are kept, and are the reference's
                assert set(got[-1][0].tolist()) <= set(got[-2][0].tolist())

        # decode one token at position S on the cache of the last pruned prefill (T=8)
        want_pf = dec(emb, pos, *_scalars(a, L, 8), dec.decoder.kept_slots(1, S, a, L, 8), empty)
        step = (torch.randn(1, 1, D, generator=g), torch.tensor([[S]], dtype=torch.int32), *_scalars(0, 0, 0),
                dec.decoder.kept_slots(1, 1, 0, 0, 0))
        want = dec(*step, tuple(want_pf[1:-2]))
        feeds = {n: t.numpy() for n, t in zip(dec.input_names(), step)}
        feeds.update({n: t.numpy() for n, t in zip(dec.input_names()[6:], want_pf[1:-2])})
        got = sess.run(None, feeds)
        np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4, rtol=1e-4)
        assert got[-2].tolist() == [[S]]
        assert got[-1].tolist() == [[-1] * 4]  # no span in a decode step: no pivots


@pytest.mark.parametrize("S, a, L, k", [(40, 5, 30, 4), (40, 5, 3, 4), (12, 0, 11, 1), (1, 0, 0, 4)])
def test_image_pivots_are_the_references(S, a, L, k):
    """The decoder's image_pivots output: the reference's image pivots (the k best L1 key norms in the
    span, best first, as sequence indices); slots past a span shorter than k hold -1 (a decode step's
    empty span: all -1)."""
    from dart_ops.decoder import image_pivots
    from dart_ops.reference import _top, pivot_scores

    keys = torch.randn(2, S, 24, generator=torch.Generator().manual_seed(S + L))
    got = image_pivots(keys, torch.tensor(a), torch.tensor(L), k)  # (2, k)
    for b in range(2):
        want = (_top(pivot_scores(keys[b])[a:a + L], min(k, L)) + a).tolist()
        assert got[b].tolist() == want + [-1] * (k - len(want))


def test_schema_is_registered_only_while_exporting():
    """The op's schema (int64 output, what the decoder emits) exists during an export only, so an int32
    standalone DartPruneSlots model still passes onnx's full check after an export in the same process."""
    from dart_ops import onnx_export, onnx_op_slots
    from dart_ops.spec import OP_DOMAIN, OP_VERSION

    has = lambda: onnx.defs.has(onnx_op_slots.OP_NAME, OP_VERSION, OP_DOMAIN)
    assert not has()
    with onnx_export.exporting():
        assert has()
    assert not has()
    onnx.checker.check_model(onnx_op_slots.standalone_model(index_dtype="int32"), full_check=True)

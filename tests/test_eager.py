"""Eager DART on llava-tiny: unpruned equals Hugging Face generate; pruned keeps what the reference
selects from the model's own layer K-1 states."""

import pytest
import torch

from dart_ops.eager import EagerDart, find_image_span
from dart_ops.reference import select_keep
from dart_ops.spec import DartConfig

N_NEW = 24


def _prompt(seed, n_before=5, n_after=30):
    from export.families.llava import TINY_IMAGE_TOKEN_ID

    g = torch.Generator().manual_seed(seed)
    before = torch.randint(3, 1000, (1, n_before), generator=g)
    after = torch.randint(3, 1000, (1, n_after), generator=g)
    ids = torch.cat([before, torch.full((1, 576), TINY_IMAGE_TOKEN_ID), after], 1)
    pixels = torch.randn(1, 3, 336, 336, generator=g)
    return ids, pixels


def _hf_greedy(model, ids, pixels=None):
    extra = {} if pixels is None else {"pixel_values": pixels}
    out = model.generate(
        input_ids=ids, do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, **extra
    )
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_unpruned_equals_hf_generate(tiny_llava, seed):
    ids, pixels = _prompt(seed)
    eager = EagerDart(tiny_llava, DartConfig(keep_ratio=1.0))
    out = eager.generate(ids, pixels, max_new_tokens=N_NEW)
    assert out.token_ids == _hf_greedy(tiny_llava, ids, pixels)
    assert len(set(out.token_ids)) > 3, "tiny model output should vary, not repeat one token"
    assert out.kept_positions == list(range(ids.shape[1]))
    with torch.no_grad():
        hf_logits = tiny_llava(input_ids=ids, pixel_values=pixels).logits[:, -1]
    torch.testing.assert_close(out.first_logits, hf_logits, atol=1e-4, rtol=1e-4)


def test_text_only_prompt_is_not_pruned(tiny_llava):
    ids = torch.randint(3, 1000, (1, 40), generator=torch.Generator().manual_seed(5))
    out = EagerDart(tiny_llava, DartConfig(keep_ratio=0.111)).generate(ids, None, max_new_tokens=N_NEW)
    assert out.kept_positions == list(range(40))
    assert out.token_ids == _hf_greedy(tiny_llava, ids)


def _hf_layer_states(model, ids, pixels, K):
    """Layer K-1's output through the final norm and its post-RoPE keys, from HF's own forward."""
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True, use_cache=True)
    norm = model.model.language_model.norm
    hidden = norm(out.hidden_states[K])  # hidden_states[K] leaves layer K-1
    keys = out.past_key_values.layers[K - 1].keys  # (B, Hkv, S, dh)
    return hidden, keys.transpose(1, 2).reshape(keys.shape[0], keys.shape[2], -1)


@pytest.mark.parametrize("K,ratio", [(2, 0.333), (2, 0.111), (1, 0.222), (3, 0.111)])
def test_pruned_keeps_reference_selection(tiny_llava, K, ratio):
    ids, pixels = _prompt(seed=K)
    cfg = DartConfig(layer=K, keep_ratio=ratio)
    out = EagerDart(tiny_llava, cfg).generate(ids, pixels, max_new_tokens=4)
    a, L = find_image_span(ids, tiny_llava.config.image_token_id)
    counts = cfg.counts(L, ids.shape[1] - a - L)
    hidden, keys = _hf_layer_states(tiny_llava, ids, pixels, K)
    want = select_keep(hidden[0], keys[0], a, L, counts.quota)
    assert out.kept_positions == want.tolist()
    assert len(out.kept_positions) == counts.kept_len(ids.shape[1])


def test_pruning_changes_the_answer(tiny_llava):
    ids, pixels = _prompt(seed=0)
    eager = EagerDart(tiny_llava, DartConfig())
    full = eager.generate(ids, pixels, keep_ratio=1.0, max_new_tokens=12).token_ids
    pruned = eager.generate(ids, pixels, keep_ratio=0.111, max_new_tokens=12).token_ids
    assert full != pruned


def test_image_span_errors():
    with pytest.raises(ValueError, match="contiguous"):
        find_image_span(torch.tensor([[1, 9, 2, 9]]), 9)
    with pytest.raises(ValueError, match="share"):
        find_image_span(torch.tensor([[9, 9, 1], [1, 9, 9]]), 9)
    assert find_image_span(torch.tensor([[1, 2, 3]]), 9) == (0, 0)

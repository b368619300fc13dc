"""generate = prepare -> prefill -> decode_step: the steps driven by hand give generate's tokens and
kept positions (the fake engine of test_runtime_unit, then llava-tiny); the family rules registry
(runtime/families/) and its errors; kept_positions are SEQUENCE indices into the unpruned prompt."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from test_runtime_unit import BOS, IMAGE_ID, build_engine, reference_generate

from runtime import families
from runtime.errors import EngineError
from runtime.families import Positions, indices_of_positions, rules_class, rules_for
from runtime.families.llava import LlavaRules
from runtime.pipeline import Pipeline, Request, load
from runtime.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.png"


def by_hand(pipe: Pipeline, request: Request) -> tuple[list[int], list[int], list[int], np.ndarray]:
    """Greedy generation through prepare / prefill / decode_step, eos ignored: (prompt ids,
    tokens, kept indices, first logits)."""
    prompt = pipe.prepare(request)
    state = pipe.prefill(prompt)
    first = state.logits.astype(np.float32)
    tokens = [int(np.argmax(state.logits))]
    while len(tokens) < prompt.max_new_tokens:
        logits = pipe.decode_step(state, tokens[-1])
        tokens.append(int(np.argmax(logits)))
    assert state.steps == prompt.max_new_tokens - 1
    return prompt.ids, tokens, state.kept, first


def _kept_ids_are_the_prompt_minus_pruned(ids: list[int], kept: list[int], kept_vision: int) -> None:
    """kept are ascending sequence indices: the ids there are the prompt's text ids in order, with
    exactly `kept_vision` image tokens among them."""
    assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < len(ids)
    at = [ids[i] for i in kept]
    assert [i for i in at if i != IMAGE_ID] == [i for i in ids if i != IMAGE_ID]
    assert at.count(IMAGE_ID) == kept_vision


# --- the fake engine (test_runtime_unit): exact reference tokens ----------------------------------


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Pipeline:
    return load(build_engine(tmp_path_factory.mktemp("engine") / "fake"))


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25])
def test_fake_steps_equal_generate_and_reference(fake, ratio):
    pixels = preprocess(SAMPLE, fake.manifest.preprocess)
    kw = {"prompt": "what is this", "pixel_values": pixels, "keep_ratio": ratio, "max_new_tokens": 10}
    ids, tokens, kept, first = by_hand(fake, Request(**kw))
    want, want_kept = reference_generate(ids, pixels, ratio, 10)
    out = fake.generate(**kw, ignore_eos=True)
    assert len(want) == 10 and tokens == want == out.token_ids
    assert kept == want_kept == out.kept_positions and first.tobytes() == out.first_logits.tobytes()
    # <s> USER: <image> x 8 what is this ASSISTANT: -> span [2, 10); ratio 0.5 keeps 1 + 2 * 2 = 5 of 8
    assert ids == [BOS, 3] + [IMAGE_ID] * 8 + [5, 6, 7, 4]
    kept_vision = {1.0: 8, 0.5: 5, 0.25: 3}[ratio]
    _kept_ids_are_the_prompt_minus_pruned(ids, kept, kept_vision)
    assert kept == [0, 1] + list(range(2, 2 + kept_vision)) + [10, 11, 12, 13]


def test_fake_text_only_steps(fake):
    ids, tokens, kept, _ = by_hand(fake, Request("the blue dog", max_new_tokens=6))
    want, want_kept = reference_generate(ids, None, 0.5, 6)
    assert len(want) == 6 and tokens == want and kept == want_kept == list(range(len(ids)))


def test_prepare_fixes_spans_positions_and_counts(fake):
    prompt = fake.prepare(Request("what is this", image=SAMPLE, keep_ratio=0.5, max_new_tokens=3))
    assert prompt.spans == (prompt.span,) == ((2, 8),) and prompt.span_len == 8
    assert prompt.counts.quota == 2 and prompt.counts.kept_vision == 5 and prompt.max_new_tokens == 3
    assert prompt.positions.prefill.tolist() == [list(range(14))] and prompt.positions.decode_start == 14
    assert list(prompt.vision.feeds) == ["pixel_values"] and prompt.vision.tokens == (8,)
    assert prompt.vision.feeds["pixel_values"].shape == (1, 3, 8, 8)
    text = fake.prepare(Request("the blue dog"))
    assert text.vision is None and text.spans == () and text.span == (0, 0) and text.span_len == 0


class Recorder:
    """A decoder that records every call's feeds (no kv_loop of its own: the numpy loop calls run)."""

    def __init__(self, stage):
        self.stage, self.feeds = stage, []

    def __getattr__(self, name):
        return getattr(self.stage, name)

    def run(self, feeds):
        self.feeds.append(feeds)
        return self.stage.run(feeds)


def test_registered_family_rules_drive_the_decoder(fake, monkeypatch):
    """A test-only family registered by name: its decode positions (S + t + 3, as a rope_delta
    would shift them) reach the decoder; the prefill and kept indices stay LLaVA's."""

    class Shifted(LlavaRules):
        @staticmethod
        def positions(ids, spans, vision):
            return Positions(np.arange(len(ids), dtype=np.int64)[None], len(ids) + 3)

    monkeypatch.setitem(families._RULES, "shifted", Shifted)
    recorder = Recorder(fake.decoder)
    stages = {"vision_encoder": fake.vision, "embed_tokens": fake.embed, "decoder": recorder}
    pipe = Pipeline(dataclasses.replace(fake.manifest, family="shifted"), stages, fake.prompt)
    assert isinstance(pipe.rules, Shifted)
    out = pipe.generate("what is this", image=SAMPLE, keep_ratio=0.5, max_new_tokens=4, ignore_eos=True)
    S = out.timings["prompt_tokens"]
    assert [f["position_ids"].tolist() for f in recorder.feeds[1:]] == [[[S + 3]], [[S + 4]], [[S + 5]]]
    assert out.kept_positions == fake.generate("what is this", image=SAMPLE, keep_ratio=0.5,
                                               max_new_tokens=1).kept_positions


# --- the rules registry ----------------------------------------------------------------------------


def test_registry_lookup_and_unknown_family(fake):
    assert "llava" in families.families() and rules_class("llava") is LlavaRules
    assert isinstance(rules_for(fake.manifest, fake.prompt), LlavaRules)
    with pytest.raises(EngineError) as e:
        rules_class("qwen9-vl")
    msg = str(e.value)
    assert "\n" not in msg and "family 'qwen9-vl'" in msg and f"(known: {', '.join(families.families())})" in msg
    with pytest.raises(EngineError, match=r"family 'qwen9-vl' has no run-time rules"):
        Pipeline(dataclasses.replace(fake.manifest, family="qwen9-vl"),
                 {"vision_encoder": fake.vision, "embed_tokens": fake.embed, "decoder": fake.decoder}, fake.prompt)
    with pytest.raises(ValueError, match="registered twice"):
        families.register("llava")(LlavaRules)


def test_load_refuses_an_unknown_family_before_opening_sessions(tmp_path, monkeypatch):
    import onnxruntime as ort

    engine = build_engine(tmp_path / "odd", family="odd")
    opened = []
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: opened.append(a))
    known = ", ".join(families.families())  # llava, qwen2_vl
    with pytest.raises(EngineError, match=rf"family 'odd' has no run-time rules in this runtime \(known: {known}\)"):
        load(engine)
    assert opened == []


def test_indices_of_positions():
    prefill = np.array([[0, 1, 2, 5, 6, 7, 9]])  # positions with gaps: indices differ from values
    assert indices_of_positions(np.array([0, 5, 7, 9]), prefill) == [0, 3, 5, 6]
    assert indices_of_positions(np.array([], np.int64), prefill) == []
    for bad in ([3], [10], [-1]):
        with pytest.raises(EngineError, match="not positions of the prompt"):
            indices_of_positions(np.array(bad), prefill)


# --- llava-tiny ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_engine) -> Pipeline:
    return load(tiny_engine[0], threads=1)


@pytest.mark.parametrize("ratio, kept_vision", [(1.0, 576), (0.111, 68)])
def test_llava_tiny_steps_equal_generate(tiny, ratio, kept_vision):
    kw = {"prompt": "What is in the picture?", "image": SAMPLE, "keep_ratio": ratio, "max_new_tokens": 8}
    ids, tokens, kept, first = by_hand(tiny, Request(**kw))
    out = tiny.generate(**kw, ignore_eos=True)
    assert tokens == out.token_ids and kept == out.kept_positions
    assert first.tobytes() == out.first_logits.tobytes()
    assert out.timings["kept_vision_tokens"] == kept_vision and len(ids) == out.timings["prompt_tokens"]
    image_id = tiny.manifest.tokens.image_token_id
    at = [ids[i] for i in kept]  # kept are sequence indices: the prompt's ids at those indices
    assert [i for i in at if i != image_id] == [i for i in ids if i != image_id] and at.count(image_id) == kept_vision
    assert kept == sorted(set(kept)) and kept[-1] == len(ids) - 1

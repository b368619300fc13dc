"""runtime.load's thread pools: no spinning by default (spin=True turns it on everywhere), the
embedding lookup on one thread, the other sessions on `threads`."""

import pytest

import runtime

SPIN = "session.intra_op.allow_spinning"


def _opts(pipe):
    return {name: stage.session.get_session_options()
            for name, stage in (("vision_encoder", pipe.vision), ("embed_tokens", pipe.embed), ("decoder", pipe.decoder))}


def test_default_policy(tiny_engine):
    opts = _opts(runtime.load(tiny_engine[0], threads=2))
    assert {n: o.get_session_config_entry(SPIN) for n, o in opts.items()} == {
        "vision_encoder": "0", "embed_tokens": "0", "decoder": "0"}
    assert {n: o.intra_op_num_threads for n, o in opts.items()} == {
        "vision_encoder": 2, "embed_tokens": 1, "decoder": 2}


@pytest.mark.parametrize("spin,want", [(True, "1"), (False, "0")])
def test_spin_override(tiny_engine, spin, want):
    opts = _opts(runtime.load(tiny_engine[0], threads=2, spin=spin))
    assert {o.get_session_config_entry(SPIN) for o in opts.values()} == {want}

"""Checks the family benchmark tests share on a scripts/bench.py JSON document."""

from __future__ import annotations


def rows_by(doc: dict) -> dict:
    """{(runtime, keep_ratio): row} of a bench JSON document."""
    return {(r["runtime"], r["keep_ratio"]): r for r in doc["rows"]}


def assert_rows_see_the_same_tokens(doc: dict, vision_tokens: int, low: float, new_tokens: int = 4) -> None:
    """Every row had the same prompt and vision tokens and generated `new_tokens`; at 1.0 the engine,
    eager HF and eager DART generate the same tokens, at `low` the engine and eager DART do; the two
    DART rows keep the same tokens with the same fp32 KV bytes at both ratios."""
    rows, S = rows_by(doc), doc["meta"]["prompt_tokens"]
    for r in doc["rows"]:
        assert (r["prompt_tokens"], r["vision_tokens"], r["new_tokens"], len(r["token_ids"])) == (
            S, vision_tokens, new_tokens, new_tokens)
    hf = rows[("eager-hf", 1.0)]["token_ids"]
    assert rows[("ort", 1.0)]["token_ids"] == hf == rows[("eager-dart", 1.0)]["token_ids"]
    assert rows[("ort", low)]["token_ids"] == rows[("eager-dart", low)]["token_ids"]
    for ratio in (1.0, low):  # the same kept tokens and the same fp32 KV layout
        eager, ort = rows[("eager-dart", ratio)], rows[("ort", ratio)]
        assert (eager["kept_tokens"], eager["kv_bytes"]) == (ort["kept_tokens"], ort["kv_bytes"])

"""README examples run as written (on the session's llava-tiny engine instead of engines/llava-tiny)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tiny_engine, monkeypatch):
    engine_dir, _ = tiny_engine
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(ROOT)
    for code in blocks:
        code = code.replace('"engines/llava-tiny"', repr(os.fspath(engine_dir)))
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (our own README)
        out = scope["out"]
        assert out.timings["kept_vision_tokens"] == 68 and out.timings["vision_tokens"] == 576
        assert 1 <= len(out.token_ids) <= 32 and out.text == scope["pipe"].prompt.decode(out.token_ids)
        assert scope["picture"].mode == "RGB" and len(out.image_pivots) == 4

"""Engine checks the family test files share: the runtime answering with torch and transformers
blocked, and an engine's checkpoint/ loading back as a local checkpoint directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = """
import sys, json
sys.modules["torch"] = None
sys.modules["transformers"] = None
import runtime
ratio = None if sys.argv[4] == "none" else float(sys.argv[4])
out = runtime.load(sys.argv[1]).generate(prompt="What is this?", image=sys.argv[2],
                                         max_new_tokens=int(sys.argv[3]), keep_ratio=ratio)
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m]]
print(json.dumps({"token_ids": out.token_ids, "kept": out.kept_positions}))
"""


def generate_without_torch(engine_dir: Path, image: Path, max_new_tokens: int,
                           keep_ratio: float | None = None) -> dict:
    """{"token_ids", "kept"} of runtime.load(engine_dir).generate("What is this?", image, ...) in a
    subprocess where importing torch or transformers fails (and none of their modules got loaded)."""
    r = subprocess.run([sys.executable, "-c", BLOCKED, str(engine_dir), str(image), str(max_new_tokens),
                        "none" if keep_ratio is None else repr(keep_ratio)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_checkpoint_round_trip(engine_dir: Path, hf, family: str):
    """The engine's checkpoint/ resolves to `family`, loads with the manifest's prompt and the HF
    model's exact weights; returns the Loaded record for further checks."""
    import torch

    from export.families import resolve

    fam = resolve(str(engine_dir / "checkpoint"))
    assert fam.name == family
    loaded = fam.load(str(engine_dir / "checkpoint"), torch.float32)
    assert loaded.prompt == json.loads((engine_dir / "manifest.json").read_text())["prompt"]
    sd, sd2 = hf.state_dict(), loaded.model.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    return loaded

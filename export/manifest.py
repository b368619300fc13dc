"""manifest.json of an engine directory (docs/ENGINE_FORMAT.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "dart-vlm-engine"
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    """The manifest's "files" entry of one file: sha256 and size."""
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("dart-vlm", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[dist.replace("-", "_")] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def write(out_dir: Path, body: dict, files: list[str]) -> dict:
    """Write manifest.json with the sha256 of `files` (relative to out_dir); returns the dict."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **body}
    manifest["files"] = {name: file_entry(out_dir / name) for name in files}
    manifest["tools"] = tool_versions()
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

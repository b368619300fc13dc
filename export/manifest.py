"""Writing manifest.json of an engine directory (docs/ENGINE_FORMAT.md). The schema, its format
constants and sha256 live in runtime/manifest.py (torch-free); the exporter builds those objects
and writes them here."""

from __future__ import annotations

from pathlib import Path

from runtime.manifest import FORMAT, FORMAT_VERSION, FileEntry, Manifest, sha256_file, write_manifest

__all__ = ["FORMAT", "FORMAT_VERSION", "file_entry", "sha256", "tool_versions", "write"]

sha256 = sha256_file  # one implementation (runtime's)


def file_entry(path: Path) -> FileEntry:
    """The manifest's "files" entry of one file: sha256 and size."""
    return FileEntry.of(path)


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("dart-vlm", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[dist.replace("-", "_")] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def write(manifest: Manifest) -> Manifest:
    """Write `manifest` as manifest.json in its directory (checked by reading it back first)."""
    write_manifest(manifest)
    return manifest

"""One manifest schema (runtime/manifest.py): the exporter writes Manifest objects, the runtime reads
them back, and nothing is lost either way (issue 10, item 2). Also the format_version bump: an
engine of version 1 is refused with the command that re-exports it, and export/outdir.py still
recognises it as ours, so that command can replace it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from export import outdir
from dart_ops.spec import DartConfig
from export.axes import declare, min_seq
from runtime import EngineError
from runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Axis,
    DartSpec,
    FileEntry,
    Manifest,
    TokenSpec,
    TrtSpec,
    read_manifest,
    write_manifest,
)


def _copy(engine: Path, dst: Path) -> Path:
    shutil.copytree(engine, dst)
    return dst


# --- round trip on the real llava-tiny export ------------------------------------------------------


def test_export_read_write_is_identical(tiny_engine, tmp_path):
    """export -> read -> to_json equals the file's JSON; write -> the same bytes; from_json(to_json) ==."""
    engine, raw = tiny_engine
    text = (engine / MANIFEST_NAME).read_text()
    m = read_manifest(engine)
    assert m.format_version == FORMAT_VERSION == 3
    assert m.to_json() == raw
    assert list(m.to_json()) == list(raw)  # key order too
    assert Manifest.from_json(m.to_json(), engine) == m
    d = _copy(engine, tmp_path / "e")
    (d / MANIFEST_NAME).unlink()
    assert write_manifest(dataclasses.replace(m, directory=d)) == d / MANIFEST_NAME
    assert (d / MANIFEST_NAME).read_text() == text
    assert read_manifest(d) == dataclasses.replace(m, directory=d)


def test_informational_parts_survive(tiny_engine):
    """What the dataclasses dropped before version 2 is kept: checkpoint files, tools, opset, axis names."""
    engine, raw = tiny_engine
    m = read_manifest(engine, verify=False)
    assert m.checkpoint == tuple(raw["checkpoint"]) and "model.safetensors" in m.checkpoint
    assert m.tools == raw["tools"] and "onnxruntime" in m.tools
    assert m.opset == 18
    assert {n: (a.name, a.min, a.max) for n, a in m.dynamic_axes.items()} == {
        "batch": ("batch", 1, 4), "seq": ("seq", 1, 2048), "past_full": ("past_full", 0, 4096),
        "past_kept": ("past_kept", 0, 4096), "images": ("images", 1, 4),
        "vision_tokens": ("vision_tokens", 576, 576), "kept": ("kept", 1, 2048)}
    # no input's value bounds a shape (issue 15): the scalars are plain 0-d int32, kept_slots has the kept axis
    dec = {t.name: (t.dtype, t.shape) for t in m.stages["decoder"].inputs}
    assert [dec[n] for n in ("span_start", "span_len", "quota", "kept_slots")] == [
        ("int32", ()), ("int32", ()), ("int32", ()), ("int32", ("batch", "kept"))]


def test_tensorrt_section_round_trips(tiny_engine, tmp_path):
    """The whole "tensorrt" section (profiles, workspace_mib) is read and written back as it was."""
    from export import trt

    d = _copy(tiny_engine[0], tmp_path / "e")
    for stage in trt.STAGES:
        (d / f"{stage}.engine").write_bytes(b"plan " + stage.encode())
    m = read_manifest(d, verify=False)
    raw = m.to_json()
    section = {"version": "10.3.0", "engines": {s: f"{s}.engine" for s in trt.STAGES}, "strongly_typed": True,
               "fp16": False, "workspace_mib": 512,
               "profiles": {s: trt.profile_specs(raw, s) for s in trt.STAGES}}
    written = trt._update_manifest(m, section)
    back = read_manifest(d)
    assert back == written
    assert back.tensorrt == TrtSpec("10.3.0", section["engines"], True, False, 512, section["profiles"])
    assert back.files["decoder.engine"] == FileEntry.of(d / "decoder.engine")
    assert json.loads((d / MANIFEST_NAME).read_text())["tensorrt"] == section


def test_eos_form_and_numbers_are_canonical():
    """eos_token_id: null / an int / a list by count; float fields are written as floats."""
    tok = lambda eos: TokenSpec("<image>", 5, 4, eos).to_json()["eos_token_id"]
    assert (tok(()), tok((2,)), tok((2, 7))) == (None, 2, [2, 7])
    ratio = DartSpec(2, 4, 4, 1, 584).to_json()["keep_ratio"]
    assert type(ratio) is float and json.dumps(ratio) == "1.0"  # reads back as the same float
    assert Axis(0, 3, 9, "seq").to_json() == {"min": 0, "opt": 3, "max": 9}


def test_declared_axes_are_the_schema_axis():
    vision = {"images": Axis(1, 1, 2, "images"), "vision_tokens": Axis(576, 576, 576, "vision_tokens")}
    axes = declare(max_batch=2, max_seq=700, max_context=1024, vision=vision, max_span=584,
                   dart=DartConfig(2, 4, 4, keep_ratio=0.111))
    assert all(type(a) is Axis for a in axes.values())
    # kept (the pruned length): opt for one 576-token image at index 5 of a 640-token prompt, quota
    # round(0.111 * 576) // 8 = 8: 640 - 576 + 4 + 8 * 8 = 132; max: the longest prompt, unpruned
    assert {n: (a.name, a.min, a.opt, a.max) for n, a in axes.items()} == {
        "images": ("images", 1, 1, 2), "vision_tokens": ("vision_tokens", 576, 576, 576),
        "batch": ("batch", 1, 1, 2), "seq": ("seq", 1, 640, 700), "past_full": ("past_full", 0, 640, 1024),
        "past_kept": ("past_kept", 0, 128, 1024), "kept": ("kept", 1, 132, 700)}
    with pytest.raises(ValueError, match=r"vision axes \['images'\] lack 'vision_tokens'"):
        declare(2, 700, 1024, {"images": vision["images"]}, 584, DartConfig(2, 4, 4))
    with pytest.raises(ValueError, match=r"redeclare \['seq'\]"):
        declare(2, 700, 1024, {**vision, "seq": Axis(1, 1, 9, "seq")}, 584, DartConfig(2, 4, 4))
    assert min_seq(576) == 606


def test_writer_refuses_what_the_reader_refuses(tiny_engine, tmp_path):
    m = read_manifest(tiny_engine[0], verify=False)
    bad = dataclasses.replace(m, directory=tmp_path, max_context=0)
    with pytest.raises(EngineError, match=r"'max_context' must be in \[1, 1048576\], got 0"):
        write_manifest(bad)
    assert not (tmp_path / MANIFEST_NAME).exists()


# --- format version 1 ----------------------------------------------------------------------------


def _as_version(engine: Path, d: Path, version: int) -> Path:
    _copy(engine, d)
    raw = json.loads((d / MANIFEST_NAME).read_text())
    (d / MANIFEST_NAME).write_text(json.dumps({**raw, "format_version": version}, indent=2) + "\n")
    return d


@pytest.mark.parametrize("version", [1, 2])  # 2: the decoder before issue 15 (shape-tensor scalars, int64)
def test_older_versions_are_refused_with_the_re_export_command(tiny_engine, tmp_path, version):
    d = _as_version(tiny_engine[0], tmp_path / "old engine", version)
    with pytest.raises(EngineError) as e:
        read_manifest(d)
    assert str(e.value) == (f"{d / MANIFEST_NAME} is format version {version}, older than this runtime's 3: "
                            f"re-export the engine with: python -m export.build --model llava-tiny --out '{d}'")


def test_outdir_recognises_older_versions_as_ours(tiny_engine, tmp_path):
    """Re-exporting over an old engine is the upgrade path: every version is replaceable; a stray
    file still makes any refused."""
    v3 = _copy(tiny_engine[0], tmp_path / "v3")
    v1 = _as_version(tiny_engine[0], tmp_path / "v1", 1)
    v2 = _as_version(tiny_engine[0], tmp_path / "v2", 2)
    for d, version in ((v1, 1), (v2, 2), (v3, 3)):
        assert outdir.read_ours(d)["format_version"] == version
        outdir.check_replaceable(d)  # no error
        (d / "notes.txt").write_text("mine")
        with pytest.raises(outdir.OutDirError, match="notes.txt"):
            outdir.check_replaceable(d)
    (v1 / MANIFEST_NAME).write_text(json.dumps({"format": "something-else", "format_version": 1}))
    assert outdir.read_ours(v1) is None

"""The exporter never loses a user's files (issue 9, items 1-3, 6): it replaces only directories
that are provably engine directories it wrote, writes files other users can read, cleans up after
SIGTERM/SIGKILL, follows a symlinked --out, and refuses a second export to the same place."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.build import main as build_main
from export.manifest import FORMAT, FORMAT_VERSION
from export.outdir import OutDirError, Staging, apply_umask_modes, check_replaceable, current_umask

ROOT = Path(__file__).resolve().parents[1]


def _fake_engine(d: Path, files=("decoder.onnx", "tokenizer.json"), checkpoint=()) -> None:
    d.mkdir(parents=True)
    for name in files:
        (d / name).write_text("x")
    for name in checkpoint:
        (d / "checkpoint" / name).parent.mkdir(parents=True, exist_ok=True)
        (d / "checkpoint" / name).write_text("w")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "files": {n: {"sha256": "0" * 64, "bytes": 1} for n in files}}
    if checkpoint:
        manifest["checkpoint"] = list(checkpoint)
    (d / "manifest.json").write_text(json.dumps(manifest))


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _publish_one(out: Path, name="new.txt") -> None:
    with Staging(out) as st:
        (st.tmp / name).write_text("new")
        st.publish()


# --- 1. only our own directories are replaced ------------------------------------------------------


def test_unrelated_manifest_dir_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "webext"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"manifest_version": 3, "name": "my extension"}))
    (out / "background.js").write_text("console.log(1)")
    before = _snapshot(out)
    rc = build_main(["--model", "llava-tiny", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.count("\n") == 0 and str(out) in err and "not a DART-VLM engine directory" in err
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["webext"]  # no staging debris either


def test_engine_dir_with_a_dropped_file_is_refused(tmp_path):
    out = tmp_path / "eng"
    _fake_engine(out, checkpoint=("config.json",))
    (out / "my-notes.txt").write_text("do not delete")
    before = _snapshot(out)
    with pytest.raises(OutDirError, match=r"does not list \(my-notes.txt\)"):
        _publish_one(out)
    assert _snapshot(out) == before


def test_checkpoint_files_must_be_listed(tmp_path):
    out = tmp_path / "eng"
    _fake_engine(out, checkpoint=("config.json",))
    (out / "checkpoint" / "extra.bin").write_text("user weights")
    with pytest.raises(OutDirError, match="checkpoint/extra.bin"):
        check_replaceable(out)


def test_symlink_inside_engine_dir_is_refused(tmp_path):
    out = tmp_path / "eng"
    _fake_engine(out)
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(OutDirError, match="link"):
        check_replaceable(out)


def test_our_engine_dir_and_empty_dir_are_replaced(tmp_path):
    out = tmp_path / "eng"
    _fake_engine(out, checkpoint=("config.json", "sub/model.safetensors"))
    _publish_one(out)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _publish_one(empty)
    assert (empty / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "eng"]


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("data")
    with pytest.raises(OutDirError, match="not a directory"):
        _publish_one(f)
    assert f.read_text() == "data"


# --- 2. modes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_modes_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = tmp_path / "eng"
        with Staging(out) as st:
            (st.tmp / "sub").mkdir(mode=0o700)
            for p in (st.tmp / "a.onnx.data", st.tmp / "sub" / "model.safetensors"):
                p.write_text("w")
                os.chmod(p, 0o600)  # what onnx.save / safetensors do
            st.publish()
        assert current_umask() == mask
    finally:
        os.umask(old)
    assert (out / "a.onnx.data").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (out / "sub" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (out / "sub").stat().st_mode & 0o777 == 0o777 & ~mask
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


def test_exported_engine_is_readable_by_others(tiny_engine):
    out, manifest = tiny_engine
    mask = current_umask()
    paths = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in paths}
    assert {"decoder.onnx.data", "checkpoint/model.safetensors", "manifest.json"} <= names
    for p in paths:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p
    # the manifest lists every file the directory holds, so a re-export may replace it
    assert names == set(manifest["files"]) | {"manifest.json"} | {f"checkpoint/{n}" for n in manifest["checkpoint"]}
    check_replaceable(out)


def test_apply_umask_modes_does_not_follow_symlinks(tmp_path):
    target = tmp_path / "outside"
    target.write_text("x")
    os.chmod(target, 0o600)
    d = tmp_path / "d"
    d.mkdir()
    (d / "link").symlink_to(target)
    apply_umask_modes(d)
    assert target.stat().st_mode & 0o777 == 0o600


# --- 3. interruption, stale debris, symlinks, concurrency ----------------------------------------------


def _hold_staging(out: str, ready, release) -> None:
    with Staging(Path(out)):
        ready.set()
        release.wait(30)


def _die_inside_staging(out: str) -> None:
    st = Staging(Path(out)).__enter__()
    (st.tmp / "half-written.onnx").write_text("x")
    os.kill(os.getpid(), signal.SIGKILL)


def test_stale_partial_of_a_killed_export_is_removed(tmp_path):
    out = tmp_path / "eng"
    p = mp.get_context("fork").Process(target=_die_inside_staging, args=(str(out),))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    debris = list(tmp_path.glob(".eng.partial-*"))
    assert len(debris) == 1
    _publish_one(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


def test_second_export_to_the_same_place_is_refused(tmp_path):
    out = tmp_path / "eng"
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_staging, args=(str(out), ready, release))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(OutDirError, match=rf"another export to .* is running \(pid {p.pid}\)"):
            _publish_one(out)
    finally:
        release.set()
        p.join(30)
    _publish_one(out)  # the first one ended: the place is free again
    assert (out / "new.txt").is_file()


def test_interrupted_publish_is_restored(tmp_path):
    out = tmp_path / "eng"
    _fake_engine(out)
    before = _snapshot(out)
    out.rename(tmp_path / ".eng.old-999999")  # killed between publish's two renames
    with Staging(out):
        pass
    assert _snapshot(out) == before


def test_symlinked_out_is_written_where_it_points(tmp_path):
    real = tmp_path / "real"
    _fake_engine(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    _publish_one(link)
    assert link.is_symlink() and link.resolve() == real
    assert sorted(p.name for p in real.iterdir()) == ["new.txt"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "later")
    _publish_one(dangling)
    assert dangling.is_symlink() and (tmp_path / "later" / "new.txt").is_file()


def test_sigterm_stops_an_export_and_removes_its_staging(tmp_path):
    out = tmp_path / "eng"
    proc = subprocess.Popen([sys.executable, "-m", "export.build", "--model", "llava-tiny", "--out", str(out)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".eng.partial-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".eng.partial-*")), "the export never started staging"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM); nothing was written"
    assert list(tmp_path.iterdir()) == []


# --- 6. bad flags fail at once, one line --------------------------------------------------------------


@pytest.mark.parametrize("flags, rc, text", [
    (["--ratio", "-inf"], 2, "keep_ratio must be in (0, 1], got -inf"),
    (["--ratio", "-1e3"], 2, "keep_ratio must be in (0, 1], got -1000.0"),
    (["--opset", "30"], 2, "--opset must be in [17, 20]"),
    (["--opset", "16"], 2, "--opset must be in [17, 20]"),
    (["--max-seq", "10"], 1, "--max-seq 10 is too short for this model: a prompt with its 576 vision tokens "
                             "needs --max-seq >= 606"),
    (["--layer", "-5"], 2, "layer"),
])
def test_bad_flags_fail_fast_with_one_line(tmp_path, capsys, flags, rc, text):
    out = tmp_path / "eng"
    t0 = time.perf_counter()
    try:
        got = build_main(["--model", "llava-tiny", "--out", str(out), *flags])
    except SystemExit as e:  # argparse usage errors
        got = e.code
    err = capsys.readouterr().err
    assert got == rc
    assert text in err and err.count("\n") == 1 and "\x1b" not in err, err
    assert time.perf_counter() - t0 < 5
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_error_lines_carry_no_terminal_escape_codes():
    from export.cli import one_line

    err = RuntimeError("\x1b[1m\x1b[31mExport failed\x1b[0m: Dim max 10 < traced 100\nTraceback-ish detail")
    assert one_line(err) == "Export failed: Dim max 10 < traced 100"

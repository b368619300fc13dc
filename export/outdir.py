"""Where an export writes: a private staging directory next to `--out`, published by rename, and
only over a directory that is provably an engine directory we wrote.

    with Staging(Path("engines/llava-tiny")) as stage:   # refuses, locks, cleans stale debris
        write files into stage.tmp ...
        stage.publish()                                    # modes from the umask, atomic replace

Rules (issue 9):
- `--out` is replaced only when it is empty, or when its manifest.json parses as our format (any
  format_version: re-exporting over an engine of an older version is how it is upgraded) AND the
  directory holds nothing but the files that manifest lists (plus the `checkpoint/` files it lists).
  Anything else is refused with one line (OutDirError) and left untouched.
- `--out` that is a symlink is written where it points; the link stays.
- The staging directory `.NAME.partial-PID` is flock()ed for the life of the export. A second export
  to the same place sees the lock and stops with one line; a staging directory whose lock is free
  belongs to a dead process (SIGKILL, power loss) and is removed by the next export.
- Every file and directory written gets the mode the user's umask gives a new file (onnx.save writes
  external data 0600, safetensors too): a service account must be able to read the engine.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import EngineError
from runtime.manifest import CHECKPOINT_DIR, FORMAT, MANIFEST_NAME
from runtime.manifest_json import read_json

log = logging.getLogger(__name__)



class OutDirError(RuntimeError):
    """--out cannot be written (not ours, in use, not a directory); one line, nothing touched."""


# --- is it ours? ---------------------------------------------------------------------------------


def read_ours(out: Path) -> dict | None:
    """The decoded manifest.json of `out` when it is one of ours (format "dart-vlm-engine", any
    format_version), read with the runtime's bounded reader; None otherwise. Only the keys every
    version has ("files", "checkpoint") are used, so an engine of an older version still counts."""
    mpath = out / MANIFEST_NAME
    try:
        raw = read_json(mpath) if mpath.is_file() else None
    except (EngineError, OSError):
        return None
    return raw if isinstance(raw, dict) and raw.get("format") == FORMAT else None


def listed_files(manifest: dict) -> set[str]:
    """Relative paths an engine directory may hold according to its manifest (the JSON object)."""
    files = manifest.get("files")
    names = set(files) if isinstance(files, dict) else set()
    ckpt = manifest.get(CHECKPOINT_DIR)
    if isinstance(ckpt, list):
        names |= {f"{CHECKPOINT_DIR}/{n}" for n in ckpt if isinstance(n, str)}
    return names | {MANIFEST_NAME}


def _tree(directory: Path) -> tuple[set[str], list[str]]:
    """(files, symlinks) under `directory` as relative posix paths; symlinks are not followed."""
    files, links = set(), []
    for root, dirs, names in os.walk(directory):
        rel = Path(root).relative_to(directory)
        for n in dirs + names:
            p = Path(root) / n
            if p.is_symlink():
                links.append((rel / n).as_posix())
            elif n in names:
                files.add((rel / n).as_posix())
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
    return files, links


def check_replaceable(out: Path) -> None:
    """Raise OutDirError unless `out` is absent, an empty directory, or an engine directory that
    holds only what its manifest lists."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutDirError(f"--out {out} exists and is not a directory; choose another path")
    files, links = _tree(out)
    if not files and not links:
        return
    manifest = read_ours(out)
    if manifest is None:
        raise OutDirError(f"--out {out} is not empty and is not a DART-VLM engine directory (no {FORMAT} "
                          f"manifest.json); nothing was touched: choose another path or empty it yourself")
    extra = sorted(files - listed_files(manifest)) + sorted(links)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise OutDirError(f"--out {out} holds files its manifest.json does not list ({extra[0]}{more}); "
                          "nothing was touched: move them away or choose another --out")


# --- modes ---------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask (Linux reports it in /proc without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(directory: Path) -> None:
    """chmod every file to 0666 & ~umask and every directory to 0777 & ~umask (what `open` and
    `mkdir` give by default), whatever the library that wrote them chose."""
    mask = current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, names in os.walk(directory):
        for d in dirs:
            os.chmod(Path(root) / d, 0o777 & ~mask, follow_symlinks=False)
        for n in names:
            p = Path(root) / n
            if not p.is_symlink():
                os.chmod(p, 0o666 & ~mask)


# --- locking and staging -------------------------------------------------------------------------


def _try_lock(path: Path) -> int | None:
    """An open fd holding an exclusive flock on `path`, or None when another process holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def _parent_lock(parent: Path):
    """Serialise the short critical sections (scan + create, publish) of exports into one folder."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def resolve_out(out: Path) -> Path:
    """A symlinked --out is written where it points (the link itself is never replaced)."""
    if out.is_symlink():
        target = out.resolve()
        log.info("--out %s is a symlink: writing to %s", out, target)
        return target
    return out


class Staging:
    """The staging directory of one export to `out` (see the module docstring)."""

    def __init__(self, out: Path):
        self.out = resolve_out(Path(os.path.abspath(out)))
        if not self.out.name:
            raise OutDirError(f"--out {out} is a filesystem root; choose a directory for the engine")
        self.parent = self.out.parent
        self.tmp = self.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._fd: int | None = None

    def _siblings(self, kind: str) -> list[Path]:
        return sorted(self.parent.glob(f".{self.out.name}.{kind}-*"))

    def __enter__(self) -> Staging:
        if self.out.exists() and not self.out.is_dir():
            raise OutDirError(f"--out {self.out} exists and is not a directory; choose another path")
        self.parent.mkdir(parents=True, exist_ok=True)
        with _parent_lock(self.parent):
            self._clean_stale()
            check_replaceable(self.out)
            self.tmp.mkdir()
            self._fd = _try_lock(self.tmp)
        return self

    def _clean_stale(self) -> None:
        for d in self._siblings("partial"):
            fd = _try_lock(d)
            if fd is None:
                pid = d.name.rsplit("-", 1)[-1]
                raise OutDirError(f"another export to {self.out} is running (pid {pid}); wait for it to finish "
                                  "or choose another --out")
            try:
                shutil.rmtree(d)
                log.info("removed %s, left by an export that was killed", d)
            finally:
                os.close(fd)
        for d in self._siblings("old"):  # killed between the two renames of publish()
            if not self.out.exists():
                d.rename(self.out)
                log.info("restored %s from %s (an export was killed while replacing it)", self.out, d.name)
            else:
                shutil.rmtree(d)

    def publish(self) -> None:
        """Set the modes, then replace `out` with the staging directory (atomic for readers: `out`
        is either the old engine or the new one)."""
        apply_umask_modes(self.tmp)
        with _parent_lock(self.parent):
            check_replaceable(self.out)  # a file dropped in during the export is not deleted either
            old = self.parent / f".{self.out.name}.old-{os.getpid()}"
            if self.out.exists():
                self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, kind, exc, tb) -> None:
        if self.tmp.exists():  # not published: failed, interrupted, or nothing to publish
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._release()

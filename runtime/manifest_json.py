"""Typed, bounded reading of manifest.json (used by runtime/manifest.py): the JSON is read with a
size cap, a nesting cap and duplicate keys refused; each value is fetched with its type and range
checked. Every failure is one EngineError line naming the key ("manifest.json: 'dart.layer' must be
in [1, 3], got -5; re-export ...").

Also the writing side: `plain`/`fields_json` turn the schema's dataclasses into the JSON object,
`dump` gives the file's text (indent 2, trailing newline) and `write_atomic` replaces a file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import string
from pathlib import Path
from typing import Any

from runtime.errors import EngineError

FORMAT = "dart-vlm-engine"
# 1 -> 2: written from runtime/manifest.py's schema; 2 -> 3: the decoder takes kept_slots (no shape-tensor
# inputs) and integer I/O is int32 (docs/ENGINE_FORMAT.md, "Versions")
FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"
EXPORT_HINT = "python -m export.build --model MODEL --out DIR"  # MODEL: the preset or checkpoint it came from
MAX_EOS = 64  # entries of tokens.eos_token_id
MAX_MANIFEST_BYTES = 16 << 20  # manifest.json size, checked before reading
MAX_NESTING = 32  # JSON objects / arrays inside each other
MAX_PATH = 1024  # characters of a file name in the manifest
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
_HASH_CHUNK = 1 << 20  # 1 MiB


# --- values --------------------------------------------------------------------------------------


def _fail(what: str) -> EngineError:
    what = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in what)  # one line, whatever the keys
    if len(what) > 2 * MAX_PATH:  # a key of a megabyte stays out of the message
        what = what[:2 * MAX_PATH - 3] + "..."
    return EngineError(f"manifest.json: {what}; re-export the engine with: {EXPORT_HINT}")


def _show(value: Any, limit: int = 60) -> str:
    """repr of a manifest value for a message, cut to `limit` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        text = "an integer of more than 4300 digits"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _get(d: dict, key: str, kind, where: str, default: Any = ...) -> Any:
    """d[key] checked against `kind` (a type or tuple of types); bools are not ints."""
    if key not in d:
        if default is not ...:
            return default
        raise _fail(f"missing key '{where}{key}'")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise _fail(f"'{where}{key}' must be {_kind_name(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise _fail(f"'{where}{key}' must be {_kind_name(kinds)}, got {type(value).__name__}")
    return value


def _kind_name(kinds: tuple) -> str:
    return " or ".join(k.__name__ for k in kinds)


def _in_range(value: int, name: str, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise _fail(f"'{name}' must be in [{lo}, {hi}], got {_show(value)}")
    return value


def _int(d: dict, key: str, where: str, lo: int, hi: int) -> int:
    return _in_range(_get(d, key, int, where), where + key, lo, hi)


def _opt_int(d: dict, key: str, where: str, lo: int, hi: int) -> int | None:
    """An int in [lo, hi], or null / absent (None)."""
    value = _get(d, key, (int, type(None)), where, default=None)
    return None if value is None else _in_range(value, where + key, lo, hi)


def _real(value: float, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    """A finite number in [lo, hi] ((lo, hi] with lo_open). JSON allows NaN, Infinity and 1e999."""
    finite = not isinstance(value, float) or math.isfinite(value)
    if not (finite and (lo < value if lo_open else lo <= value) and value <= hi):
        bracket = "(" if lo_open else "["
        raise _fail(f"'{name}' must be a finite number in {bracket}{lo}, {hi}], got {_show(value)}")
    return float(value)


def _num(d: dict, key: str, where: str, lo: float, hi: float, lo_open: bool = False) -> float:
    return _real(_get(d, key, (int, float), where), where + key, lo, hi, lo_open)


def _three(d: dict, key: str, where: str, lo: float, hi: float) -> tuple[float, float, float]:
    v = _get(d, key, list, where)
    if len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise _fail(f"'{where}{key}' must be 3 numbers (R, G, B), got {_show(v)}")
    r, g, b = (_real(x, f"{where}{key}[{i}]", lo, hi) for i, x in enumerate(v))
    return r, g, b


def _rel_path(value: str, what: str) -> str:
    """A file name inside the engine directory: relative, '/'-separated, no '.' / '..' / empty parts."""
    if (not value or len(value) > MAX_PATH or not value.isprintable() or "\\" in value
            or any(p in ("", ".", "..") for p in value.split("/"))):
        raise _fail(f"{what} must be a relative path inside the engine directory (no '..', not absolute), "
                    f"got {_show(value, MAX_PATH)}")
    return value


def _dtype(d: dict, key: str, where: str) -> str:
    value = _get(d, key, str, where)
    if value not in DTYPES:
        raise _fail(f"'{where}{key}' must be one of {', '.join(DTYPES)}, got {_show(value)}")
    return value


def check_template(template: str, name: str) -> None:
    """A chat template holds the user's text as exactly one `{prompt}` field, with no conversion or
    format spec; literal braces are doubled (`{{`, `}}`). EngineError naming `prompt.<name>` otherwise
    (checked when the engine loads, so a bad template never fails later, at generate time)."""
    where = f"manifest.json: prompt.{name}"
    if not isinstance(template, str):
        raise EngineError(f"{where} must be a string, got {type(template).__name__}; re-export the engine")
    try:
        fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:  # unbalanced braces
        raise EngineError(f"{where} is not a valid template ({exc}; write literal braces as {{{{ and }}}}); "
                          "re-export the engine") from None
    bad = ["{" + f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
           for f, conv, spec in fields if (f, conv, spec) != ("prompt", None, "")]
    if bad or len(fields) != 1:
        what = f"field(s) {', '.join(map(repr, bad))}" if bad else f"{len(fields)} {{prompt}} fields"
        raise EngineError(f"{where} has {what}; it must hold exactly one {{prompt}} field (literal braces "
                          "written as {{ and }}); re-export the engine")


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not (isinstance(value, list) and len(value) <= MAX_EOS
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise _fail(f"'tokens.eos_token_id' must be an int, a list of at most {MAX_EOS} ints or null, "
                    f"got {_show(value)}")
    return tuple(value)


def _inside(directory: Path, name: str) -> Path:
    """directory / name, after checking that it resolves (symlinks followed) inside `directory`."""
    path = directory / name
    try:
        inside = path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        inside = False
    if not inside:
        shown = _show(name, MAX_PATH)
        raise EngineError(f"{shown} resolves outside the engine directory {directory} ('..', an absolute "
                          "path or a symlink); the runtime opens only files inside it: re-export the engine")
    return path



# --- the file ---------------------------------------------------------------------------------------


class _DuplicateKey(Exception):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict:
    d = {}
    for key, value in pairs:
        if key in d:
            raise _DuplicateKey(key)
        d[key] = value
    return d


def _too_deep(raw: Any) -> bool:
    """More than MAX_NESTING objects / arrays inside each other (iterative: no recursion limit)."""
    stack = [(raw, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_NESTING:
                    return True
                stack.append((child, depth + 1))
    return False


def read_json(mpath: Path) -> Any:
    """manifest.json decoded, bounded: size cap before reading, nesting, duplicate keys refused."""
    size = mpath.stat().st_size
    too_big = EngineError(f"{mpath} is larger than {MAX_MANIFEST_BYTES >> 20} MiB, which no manifest is; "
                          f"re-export the engine with: {EXPORT_HINT}")
    if size > MAX_MANIFEST_BYTES:
        raise too_big
    with open(mpath, "rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise too_big
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_object)
    except RecursionError:
        raise _fail(f"objects and arrays are nested more than {MAX_NESTING} deep") from None
    except _DuplicateKey as exc:
        raise _fail(f"key {_show(exc.args[0])} appears twice in one object") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, ints past 4300 digits
        reason = str(exc).split(";")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineError(f"{mpath} is not valid JSON ({reason}); re-export the engine with: "
                          f"{EXPORT_HINT}") from None
    if _too_deep(raw):
        raise _fail(f"objects and arrays are nested more than {MAX_NESTING} deep")
    return raw


def check_format(raw: Any, mpath: Path) -> None:
    """EngineError unless `raw` is a JSON object of this format and version. An engine of an older
    version of the format gets the command that re-exports it."""
    if not isinstance(raw, dict):
        raise _fail("the top level must be a JSON object")
    fmt, version = raw.get("format"), raw.get("format_version")
    if fmt == FORMAT and type(version) is int and 1 <= version < FORMAT_VERSION:
        model = raw.get("model")
        model = model if isinstance(model, str) and model.isprintable() and 0 < len(model) <= MAX_PATH else "MODEL"
        command = f"python -m export.build --model {shlex.quote(model)} --out {shlex.quote(str(mpath.parent))}"
        raise EngineError(f"{mpath} is format version {version}, older than this runtime's {FORMAT_VERSION}: "
                          f"re-export the engine with: {command}")
    if fmt != FORMAT or type(version) is not int or version != FORMAT_VERSION:
        raise EngineError(
            f"{mpath} has format {_show(fmt)} version {_show(version)}; this runtime reads {FORMAT!r} "
            f"version {FORMAT_VERSION}: re-export the engine with this version of dart-vlm ({EXPORT_HINT})"
        )


# --- writing -------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """The JSON form of a schema value: objects through their to_json(), tuples as lists."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def fields_json(obj: Any, skip: tuple[str, ...] = ()) -> dict:
    """A dataclass's fields in declaration order (the file's key order), as JSON values."""
    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in skip}


def dump(raw: dict) -> str:
    """The text of manifest.json: indent 2, keys in the order given, a trailing newline."""
    return json.dumps(raw, indent=2) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` through a temporary file in the same directory (readers see the
    old file or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (decoder weights can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()

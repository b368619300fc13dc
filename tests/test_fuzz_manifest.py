"""Seeded fuzz of manifest.json: a few hundred mutations of the llava-tiny engine's real manifest
(type swaps, out-of-range and non-finite numbers, huge ints, missing and extra keys, duplicate
keys, deep nesting, strings for numbers, paths with '..', absolute paths and symlinks out of the
directory, external data relocated outside), each in its own copy of the engine directory, loaded
with verify=True and verify=False and, when it loads, run for two tokens.

Allowed outcomes: success, or EngineError / InputError with a one-line message. Never another
exception, and never a file opened outside the copy: Python-level opens are watched by an audit
hook, ONNX Runtime sessions and the tokenizer by wrappers that check the model path and (through
runtime/onnx_refs.py) every external-data file the model references. A directory of sentinel
files (valid copies of the engine's files) sits next to the copies; mutated paths point at it, and
none of it may ever be opened."""

from __future__ import annotations

import copy
import json
import os
import random
import sys
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import runtime
import runtime.prompt
from runtime import EngineError, InputError
from runtime.manifest import sha256_file
from runtime.onnx_refs import external_data_locations

onnx = pytest.importorskip("onnx")

SEED = 20250609
N_CASES = 300
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.png"
FILES = ("vision_encoder.onnx", "embed_tokens.onnx", "decoder.onnx", "decoder.onnx.data", "tokenizer.json")


# --- watching what is opened -----------------------------------------------------------------------


class Watch:
    """Everything opened while active: Python opens (audit hook), ONNX Runtime model paths plus
    the external data they reference, tokenizer files. `violations` collects what lies outside
    `root`, the copy under test."""

    def __init__(self):
        self.active = False
        self.root: Path | None = None
        self.opened: list[str] = []
        self.violations: list[str] = []

    def start(self, root: Path) -> None:
        self.root, self.opened, self.violations, self.active = root.resolve(), [], [], True

    def stop(self) -> None:
        self.active = False

    def note(self, how: str, path) -> None:
        if not self.active or isinstance(path, int):  # an fd: its path was checked when it was opened
            return
        path = os.fsdecode(path)
        self.opened.append(path)
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.root) and not _module_file(real):
            self.violations.append(f"{how}: {path} -> {real}")


WATCH = Watch()


def _module_file(real: Path) -> bool:
    """Python importing a module lazily (not an engine file)."""
    return real.suffix in (".py", ".pyc", ".so") and any(
        real.is_relative_to(Path(p).resolve()) for p in sys.path if p and os.path.isdir(p))


_hook_installed = False


def _install_audit_hook() -> None:
    global _hook_installed
    if not _hook_installed:  # audit hooks cannot be removed: install once, inert while not active
        sys.addaudithook(lambda event, args: WATCH.note("open", args[0]) if event == "open" else None)
        _hook_installed = True


@pytest.fixture
def watched(monkeypatch):
    """ONNX Runtime sessions and tokenizer loads reported to Watch (they open files in C++/Rust)."""
    _install_audit_hook()
    real_session, real_tokenizer = ort.InferenceSession, runtime.prompt.Tokenizer

    def session(path, *args, **kwargs):
        WATCH.note("onnxruntime model", path)
        if WATCH.active and os.path.isfile(path):
            for location in external_data_locations(path):  # what ONNX Runtime would open next
                WATCH.note("onnxruntime external data", os.path.join(os.path.dirname(path), location))
        return real_session(path, *args, **kwargs)

    class Tokenizer:  # stands in for tokenizers.Tokenizer inside runtime.prompt
        @staticmethod
        def from_file(path):
            WATCH.note("tokenizer", path)
            return real_tokenizer.from_file(path)

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(runtime.prompt, "Tokenizer", Tokenizer)
    yield WATCH
    WATCH.stop()


# --- the engine copies -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tiny_engine, tmp_path_factory):
    """(engine, outside, cases): the tiny engine, a sentinel directory holding valid copies of its
    files, and the directory the per-case copies go in, next to the sentinels (so that a case's
    "../outside/decoder.onnx" is a real file)."""
    cases = tmp_path_factory.mktemp("fuzz")
    outside = cases / "outside"
    outside.mkdir()
    for name in FILES:
        os.link(tiny_engine[0] / name, outside / name)
    (outside / "secret.txt").write_text("never read me\n")
    return tiny_engine[0], outside, cases


def _copy(engine: Path, dst: Path) -> Path:
    """Hard links of the graphs and tokenizer (mutations replace files, never write into them)."""
    dst.mkdir()
    for name in FILES:
        os.link(engine / name, dst / name)
    return dst


# --- mutations -------------------------------------------------------------------------------------
# A mutation takes (rng, manifest dict, case dir, sentinel dir) and returns a description; it edits
# the dict in place and may change files in the case dir. "Raw" text edits are applied after dumping.


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))
    if path:
        yield path


def _pick(rng: random.Random, m: dict, want=None) -> tuple:
    paths = [p for p in _leaves(m) if want is None or want(_at(m, p))]
    return rng.choice(paths)


def _at(m, path):
    for k in path:
        m = m[k]
    return m


def _set(m, path, value):
    _at(m, path[:-1])[path[-1]] = value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


ODD_VALUES = ["", "x", "ünïcödé\n\t", 0, 1, -1, 2.5, True, False, None, [], {}, [1, "a"], {"k": [None]},
              2 ** 31, -(2 ** 63), 10 ** 30, "1e309"]
ODD_NUMBERS = [-1, 0, 1, 2, 3, 7, -(2 ** 31), 2 ** 31 - 1, 2 ** 63, 10 ** 30, 10 ** 400, 0.5, -0.0, 1e-300,
               1e308, 4096, 4097, 3840, 3841, 100000]
def bad_paths(outside: Path) -> list[str]:
    return ["../outside/decoder.onnx", str(outside / "decoder.onnx"), "sub/../decoder.onnx", "./decoder.onnx",
            "decoder.onnx\x00", "", "/", ".", "..", "~/secret.txt", "../outside/secret.txt",
            str(outside / "secret.txt"), "..\\outside\\decoder.onnx", "a" * 5000, "checkpoint",
            "manifest.json"]
STAGES = ("vision_encoder", "embed_tokens", "decoder")


def m_type_swap(rng, m, d, outside):
    path = _pick(rng, m)
    value = rng.choice(ODD_VALUES)
    _set(m, path, value)
    return f"type swap {path} = {value!r}"


def m_number(rng, m, d, outside):
    path = _pick(rng, m, _is_number)
    value = rng.choice(ODD_NUMBERS)
    _set(m, path, value)
    return f"number {path} = {value!r}"


def m_non_finite(rng, m, d, outside):
    path = _pick(rng, m, _is_number)
    value = rng.choice([float("nan"), float("inf"), float("-inf")])
    _set(m, path, value)
    return f"non-finite {path} = {value!r}"


def m_string_for_number(rng, m, d, outside):
    path = _pick(rng, m, _is_number)
    _set(m, path, str(_at(m, path)))
    return f"string for number {path}"


def m_missing_key(rng, m, d, outside):
    path = _pick(rng, m, lambda v: True)
    parent = _at(m, path[:-1])
    if isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    return f"missing {path}"


def m_extra_key(rng, m, d, outside):
    dicts = [p for p in _leaves(m) if isinstance(_at(m, p), dict)] + [()]
    path = rng.choice(dicts)
    key = rng.choice(["extra", "file", "location", "../x", "layer", "\n", "x" * 300])
    _at(m, path)[key] = rng.choice(ODD_VALUES + [str(outside / "secret.txt")])
    return f"extra key {path} + {key!r}"


def m_deep(rng, m, d, outside):
    path = _pick(rng, m)
    depth = rng.choice([10, 31, 33, 200, 5000, 100_000])
    _set(m, path, f"__DEEP_{depth}__")
    return f"nesting {depth} at {path}"


def m_in_range(rng, m, d, outside):
    """Values the parser accepts that the graphs may not match (check_graphs, generate)."""
    path, value = rng.choice([
        (("dart", "layer"), 1), (("dart", "layer"), 3), (("dart", "keep_ratio"), 1.0),
        (("dart", "keep_ratio"), 1e-9), (("dart", "pivots_image"), 0), (("dart", "pivots_text"), 12),
        (("dart", "max_span"), 576), (("dart", "max_span"), 3840), (("preprocess", "image_size"), 224),
        (("preprocess", "image_size"), 1), (("tokens", "image_seq_len"), 100),
        (("tokens", "image_seq_len"), 1),
        (("decoder", "vocab_size"), 2000), (("decoder", "num_layers"), 8), (("decoder", "hidden_size"), 32),
        (("tokens", "image_token_id"), 0), (("tokens", "eos_token_id"), []), (("max_context", ), 1),
        (("dynamic_axes", "seq", "max"), 1), (("dynamic_axes", "past_full", "max"), 0),
        (("preprocess", "mean"), [1, 1, 1]), (("preprocess", "std"), [1e-6, 1e6, 1]),
        (("preprocess", "rescale"), 1e-300), (("preprocess", "resample"), "NEAREST"),
        (("preprocess", "shortest_edge"), 1), (("preprocess", "center_crop"), False),
        (("preprocess", "pad_to_square"), False), (("prompt", "template"), "<image>{prompt}"),
        (("prompt", "template"), "{{<image>}} {prompt} {{x}}"), (("tokens", "image_token"), "<s>"),
        (("stages", "decoder", "inputs", 0, "dtype"), "float16"), (("dtype",), "float16"),
        (("stages", "decoder", "inputs", 0, "name"), "pixel_values"),
    ])
    _set(m, path, value)
    return f"in range {path} = {value!r}"


def m_path(rng, m, d, outside):
    value = rng.choice(bad_paths(outside))
    where = rng.choice(["stage", "files", "both", "trt"])
    stage = rng.choice(STAGES)
    if where in ("stage", "both"):
        m["stages"][stage]["file"] = value
    if where in ("files", "both"):
        m["files"][value] = rng.choice(list(m["files"].values()))
    if where == "trt":
        m["tensorrt"] = {"version": "10.3.0", "engines": {s: value for s in STAGES}}
        m["files"][value] = {"sha256": "0" * 64, "bytes": 1}
    return f"path {where} {stage} = {value!r}"


def m_symlink(rng, m, d, outside):
    """A file of the copy replaced by a symlink to the sentinel copy (same bytes: sha256 passes)."""
    name = rng.choice(FILES + ("manifest.json",))
    if name == "manifest.json":
        (outside / "manifest.json").write_text(json.dumps(m))
    (d / name).unlink(missing_ok=True)
    (d / name).symlink_to(outside / name)
    return f"symlink {name} -> outside"


def m_symlink_dir(rng, m, d, outside):
    """A subdirectory symlinked outside, and a stage (listed with the right sha256) inside it."""
    (d / "sub").symlink_to(outside, target_is_directory=True)
    stage = rng.choice(STAGES)
    name = f"sub/{m['stages'][stage]['file']}"
    m["files"][name] = m["files"][m["stages"][stage]["file"]]
    m["stages"][stage]["file"] = name
    return f"symlinked dir for {stage}"


def m_external_data(rng, m, d, outside):
    """decoder.onnx rewritten so that its weights live at another location; relisted."""
    location = rng.choice(["../outside/decoder.onnx.data", str(outside / "decoder.onnx.data"), "missing.data",
                           "sub/../decoder.onnx.data", "", "decoder.onnx", "tokenizer.json"])
    model = onnx.load(str(d / "decoder.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    (d / "decoder.onnx").unlink()  # a hard link: replace, never write through it
    onnx.save(model, str(d / "decoder.onnx"))
    graph = d / "decoder.onnx"
    m["files"]["decoder.onnx"] = {"sha256": sha256_file(graph), "bytes": graph.stat().st_size}
    if rng.random() < 0.3 and location:
        m["files"][location] = m["files"]["decoder.onnx.data"]
    return f"external data location {location!r}"


def m_raw(rng, m, d, outside):
    kind = rng.choice(["duplicate", "truncate", "garbage", "bom", "not-object", "huge-int", "nan-literal"])
    m["__RAW__"] = kind
    return f"raw {kind}"


MUTATIONS = [m_type_swap, m_number, m_non_finite, m_string_for_number, m_missing_key, m_extra_key, m_deep,
             m_in_range, m_in_range, m_path, m_path, m_symlink, m_symlink_dir, m_external_data, m_external_data,
             m_raw]  # the ones that reach the graphs and paths weigh double


def _dump(rng: random.Random, m: dict) -> bytes:
    raw = m.pop("__RAW__", None)
    text = json.dumps(m, indent=1)
    for depth in (10, 31, 33, 200, 5000, 100_000):
        text = text.replace(f'"__DEEP_{depth}__"', "[" * depth + "]" * depth)
    if raw == "duplicate":
        text = text.replace('"dart": {', '"dart": {"layer": 1, ', 1)
    elif raw == "truncate":
        text = text[: rng.randrange(len(text))]
    elif raw == "garbage":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    elif raw == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    elif raw == "not-object":
        text = rng.choice(["[]", "null", "1", '"manifest"', ""])
    elif raw == "huge-int":
        text = text.replace('"max_context": 4096', '"max_context": ' + "9" * rng.choice([400, 4300, 5000]))
    elif raw == "nan-literal":
        literal = rng.choice(["NaN", "Infinity", "-1e999"])
        text = text.replace('"keep_ratio": 0.111', '"keep_ratio": ' + literal)
    return text.encode()


# --- the fuzz --------------------------------------------------------------------------------------


def _mutate(mutation, rng, m, d, outside) -> str:
    try:
        return mutation(rng, m, d, outside)
    except (KeyError, TypeError, IndexError, AttributeError, FileExistsError):  # an earlier mutation's doing
        return f"{mutation.__name__} not applicable"


def _one_case(i: int, rng: random.Random, base: dict, engine: Path, outside: Path, cases: Path, image, watch,
              outcomes: Counter) -> str | None:
    """Run one mutated copy; returns a failure description or None. Counts outcomes."""
    d = _copy(engine, cases / f"{i:03d}")
    m = copy.deepcopy(base)
    done = [_mutate(rng.choice(MUTATIONS), rng, m, d, outside) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    if not (d / "manifest.json").is_symlink():
        (d / "manifest.json").write_bytes(_dump(rng, m))
    failures = []
    for verify in (False, True):
        watch.start(d)
        try:
            pipe = runtime.load(d, verify=verify)
            if verify is False:  # generate once per case
                pipe.generate("What is this?", image=image, max_new_tokens=2)
                outcomes["generated"] += 1
        except (EngineError, InputError) as exc:
            outcomes[type(exc).__name__] += 1
            if "\n" in str(exc) or not str(exc).strip():
                failures.append(f"verify={verify}: {type(exc).__name__} not one line: {str(exc)!r}")
        except Exception as exc:  # noqa: BLE001 - anything else is what the fuzz looks for
            tb = "".join(traceback.format_exception(exc)[-6:])
            failures.append(f"verify={verify}: {type(exc).__name__}: {exc}\n{tb}")
        finally:
            watch.stop()
        failures += [f"verify={verify}: opened outside the copy: {v}" for v in watch.violations]
        failures += [f"verify={verify}: opened the sentinel {p}" for p in watch.opened
                     if Path(os.path.realpath(p)).is_relative_to(outside.resolve())]
    if failures:
        return f"case {i} ({'; '.join(done)}):\n  " + "\n  ".join(failures)
    return None


def test_fuzz_manifest(sandbox, tiny_engine, watched):
    engine, outside, cases = sandbox
    base = tiny_engine[1]
    image = np.asarray(Image.open(SAMPLE).convert("RGB"))  # (H, W, 3) uint8, read before watching
    runtime.load(engine).generate("What is this?", image=image, max_new_tokens=2)  # lazy imports done here
    rng = random.Random(SEED)
    outcomes: Counter = Counter()
    failures = []
    for i in range(N_CASES):
        failure = _one_case(i, rng, base, engine, outside, cases, image, watched, outcomes)
        if failure is not None:
            failures.append(failure)
    assert not failures, f"{len(failures)} of {N_CASES} cases failed:\n" + "\n".join(failures[:10])
    # the mutations reach both ends: refused manifests, and engines that still load and generate
    assert outcomes["EngineError"] >= N_CASES and outcomes["generated"] >= N_CASES // 20, outcomes
    assert (outside / "secret.txt").read_text() == "never read me\n"


def test_watch_sees_an_outside_open(sandbox, watched):
    """The monitor itself works: an open outside the copy, an ONNX Runtime session on a sentinel
    model and a tokenizer load outside are all reported."""
    engine, outside, _ = sandbox
    watched.start(engine)
    try:
        (outside / "secret.txt").read_bytes()
        ort.InferenceSession(str(outside / "decoder.onnx"))
        runtime.prompt.Tokenizer.from_file(str(outside / "tokenizer.json"))
    finally:
        watched.stop()
    kinds = [v.split(":")[0] for v in watched.violations]
    assert kinds.count("open") >= 1 and "onnxruntime model" in kinds and "tokenizer" in kinds
    assert "onnxruntime external data" in kinds  # decoder.onnx.data, found by onnx_refs

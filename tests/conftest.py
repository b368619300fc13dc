from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
GOLDEN_NAME = "dart_llava_golden.npz"
SHARED_GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / GOLDEN_NAME

# The golden file has no version number: its own `format` (the layout, one line per entry) and `notes`
# (which original code made it) entries are its version. load_golden reads exactly this layout.
GOLDEN_FORMAT = (
    "DART LLaVA-path selection golden data; one sample per case, cases i = 0 .. n_cases-1",
    ("c{i}_sim: float32 [S, D]  hidden states leaving layer K-1 after the model's final RMSNorm "
     "(cosine input)"),
    ("c{i}_keys: float32 [S, F] post-RoPE key states of layer K-1, heads concatenated "
     "(L1-norm pivot score input)"),
    ("c{i}_meta: int64 [6] = [span_start a, span_len L, quota T (tokens per pivot), pivots_image, "
     "pivots_text, S]"),
    ("c{i}_keep_cpython: int64 [S'] ascending keep indices returned by the original code "
     "(pivots in Python set order)"),
    ("c{i}_keep_canonical: int64 [S'] ascending keep indices with pivots processed image-first, "
     "each group by descending L1 score"),
    ("S' = S - L + pivots_image + (pivots_image + pivots_text) * T; vision span is [a, a+L), "
     "text after it is [a+L, S)"),
    "c{i}_label: str  short description of the case",
    "n_cases: int64 scalar; format, notes: str",
)
GOLDEN_NOTES = ("DART LLaVA-path selection, original code at upstream 5a19452; canonical = pivots by "
                "descending L1 score, image pivots first")
GOLDEN_CASE_KEYS = ("sim", "keys", "meta", "keep_cpython", "keep_canonical", "label")
GOLDEN_ORIGIN = (
    "It is a byte-equal copy of ../shared/golden/dart_llava_golden.npz, computed by the original DART code "
    "(upstream 5a19452) as ../shared/golden/README.md describes; no script in this repository can "
    "regenerate it (tests/data/README.md). Replace it, and update GOLDEN_FORMAT / GOLDEN_NOTES in "
    "tests/conftest.py, only when the reference itself changes on purpose (another upstream commit, a new "
    "layout), following that README; never to make a failing test pass."
)


class GoldenFormatError(AssertionError):
    """The golden file is not the layout load_golden reads (or not the file it claims to be)."""


def _golden_problem(d) -> str | None:
    for key in ("format", "notes", "n_cases"):
        if key not in d.files:
            return f"it has no '{key}' entry (not a DART golden file, or an older one)"
    got = tuple(str(x) for x in np.atleast_1d(d["format"]))
    if got != GOLDEN_FORMAT:
        at = next((i for i, (a, b) in enumerate(zip(got, GOLDEN_FORMAT)) if a != b),
                  min(len(got), len(GOLDEN_FORMAT)))
        line = got[at] if at < len(got) else "<missing>"
        return f"its 'format' entry differs from the layout load_golden reads (line {at}: {line!r})"
    if str(d["notes"]) != GOLDEN_NOTES:
        return f"its 'notes' entry names another origin ({str(d['notes'])!r})"
    for i in range(int(d["n_cases"])):
        missing = [k for k in GOLDEN_CASE_KEYS if f"c{i}_{k}" not in d.files]
        if missing:
            return f"case {i} has no {', '.join(f'c{i}_{k}' for k in missing)}"
    return None


def open_golden(path: Path):
    """The golden file (np.load's NpzFile) after checking its `format` and `notes` entries."""
    d = np.load(path, allow_pickle=False)
    problem = _golden_problem(d)
    if problem:
        raise GoldenFormatError(f"{path}: {problem}. {GOLDEN_ORIGIN}")
    return d


def load_golden(path: Path):
    """Cases of a golden file as dicts: sim, keys, a, L, T, pi, pt, S, keep_cpython, keep_canonical."""
    d = open_golden(path)
    cases = []
    for i in range(int(d["n_cases"])):
        a, L, T, pi, pt, S = (int(x) for x in d[f"c{i}_meta"])
        cases.append({
            "i": i, "label": str(d[f"c{i}_label"]), "sim": d[f"c{i}_sim"], "keys": d[f"c{i}_keys"],
            "a": a, "L": L, "T": T, "pi": pi, "pt": pt, "S": S,
            "keep_cpython": d[f"c{i}_keep_cpython"], "keep_canonical": d[f"c{i}_keep_canonical"],
        })
    return cases


@pytest.fixture(scope="session")
def golden_cases():
    return load_golden(DATA / GOLDEN_NAME)


@pytest.fixture(scope="session")
def golden():
    """The golden file's entries as a dict of arrays (format checked), for tests that index c{i}_* keys."""
    with open_golden(DATA / GOLDEN_NAME) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def tiny_llava():
    """The seeded random-weight llava-tiny model (built once per test session)."""
    pytest.importorskip("transformers")
    from export.families.llava import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def export_once(tmp_path_factory):
    """export_once(model, *args) -> engine dir: `python -m export.build --model model *args`, run once
    per test session for each argument list, so test files that need the same engine share one export
    (each tiny family export is 20-30 s on 2 cores). Callers must not modify the directory."""
    from export.build import build, parse_args

    cache: dict[tuple, Path] = {}

    def get(preset: str, *args: str) -> Path:
        key = (preset, *args)
        if key not in cache:
            out = tmp_path_factory.mktemp("engines") / Path(preset).name  # a preset or a checkpoint dir
            build(parse_args(["--model", preset, *args, "--out", str(out)]))
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """llava-tiny exported once per test session (about 30 s): (engine_dir, manifest dict)."""
    import json

    from export.build import build, parse_args

    out = tmp_path_factory.mktemp("engines") / "llava-tiny"
    build(parse_args(["--model", "llava-tiny", "--ratio", "0.111", "--out", str(out)]))
    return out, json.loads((out / "manifest.json").read_text())

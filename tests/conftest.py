from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
GOLDEN_NAME = "dart_llava_golden.npz"
SHARED_GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / GOLDEN_NAME


def load_golden(path: Path):
    """Cases of a golden file as dicts: sim, keys, a, L, T, pi, pt, S, keep_cpython, keep_canonical."""
    d = np.load(path, allow_pickle=False)
    cases = []
    for i in range(int(d["n_cases"])):
        a, L, T, pi, pt, S = (int(x) for x in d[f"c{i}_meta"])
        cases.append(dict(
            i=i, label=str(d[f"c{i}_label"]), sim=d[f"c{i}_sim"], keys=d[f"c{i}_keys"],
            a=a, L=L, T=T, pi=pi, pt=pt, S=S,
            keep_cpython=d[f"c{i}_keep_cpython"], keep_canonical=d[f"c{i}_keep_canonical"],
        ))
    return cases


@pytest.fixture(scope="session")
def golden_cases():
    return load_golden(DATA / GOLDEN_NAME)


@pytest.fixture(scope="session")
def tiny_llava():
    """The seeded random-weight llava-tiny model (built once per test session)."""
    pytest.importorskip("transformers")
    from export.families.llava import build_tiny_model

    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """llava-tiny exported once per test session (about 30 s): (engine_dir, manifest dict)."""
    import json

    from export.build import build, parse_args

    out = tmp_path_factory.mktemp("engines") / "llava-tiny"
    build(parse_args(["--model", "llava-tiny", "--ratio", "0.111", "--out", str(out)]))
    return out, json.loads((out / "manifest.json").read_text())

"""The golden file's format check (tests/conftest.py open_golden): the file in tests/data passes,
and a file whose `format` / `notes` entries or case keys differ is refused with a message that says
where the file comes from and when replacing it is legitimate."""

import numpy as np
import pytest
from conftest import (
    DATA,
    GOLDEN_CASE_KEYS,
    GOLDEN_FORMAT,
    GOLDEN_NAME,
    GoldenFormatError,
    load_golden,
    open_golden,
)

GOLDEN = DATA / GOLDEN_NAME


@pytest.fixture(scope="module")
def entries():
    with np.load(GOLDEN, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def test_the_golden_file_has_the_expected_format():
    d = open_golden(GOLDEN)
    assert tuple(str(x) for x in d["format"]) == GOLDEN_FORMAT and int(d["n_cases"]) == 24
    assert set(d.files) == {"n_cases", "format", "notes"} | {f"c{i}_{k}" for i in range(24) for k in GOLDEN_CASE_KEYS}


def _changed(entries, tmp_path, **changes):
    path = tmp_path / "golden.npz"
    data = {k: v for k, v in entries.items() if k not in changes}
    np.savez(path, **{**data, **{k: v for k, v in changes.items() if v is not None}})
    return path


@pytest.mark.parametrize("changes, problem", [
    ({"format": None}, "it has no 'format' entry (not a DART golden file, or an older one)"),
    ({"notes": None}, "it has no 'notes' entry (not a DART golden file, or an older one)"),
    ({"format": np.array(GOLDEN_FORMAT[:3] + ("c{i}_meta: int32 [7] = [...]",) + GOLDEN_FORMAT[4:])},
     "its 'format' entry differs from the layout load_golden reads (line 3: 'c{i}_meta: int32 [7] = [...]')"),
    ({"format": np.array(GOLDEN_FORMAT[:-1])},
     "its 'format' entry differs from the layout load_golden reads (line 8: '<missing>')"),
    ({"notes": np.array("DART LLaVA-path selection, original code at upstream 0000000")},
     "its 'notes' entry names another origin ('DART LLaVA-path selection, original code at upstream 0000000')"),
    ({"c7_keys": None}, "case 7 has no c7_keys"),
], ids=["no-format", "no-notes", "format-line", "format-short", "notes", "case-key"])
def test_a_different_file_is_refused(entries, tmp_path, changes, problem):
    path = _changed(entries, tmp_path, **changes)
    with pytest.raises(GoldenFormatError) as e:
        load_golden(path)
    message = str(e.value)
    assert message.startswith(f"{path}: {problem}. It is a byte-equal copy of ../shared/golden/")
    for words in ("original DART code (upstream 5a19452)", "../shared/golden/README.md", "tests/data/README.md",
                  "no script in this repository can regenerate it", "never to make a failing test pass"):
        assert words in message

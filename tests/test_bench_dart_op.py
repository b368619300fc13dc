"""scripts/bench_dart_op.py: DartPrune and DartPruneSlots side by side keep the same tokens, the report
has its fields, bad arguments are usage errors. No timing is asserted (timings belong in
docs/BENCHMARKS.md)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_dart_op", ROOT / "scripts" / "bench_dart_op.py")
bench_dart_op = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_dart_op)


def test_small_case_same_kept_and_fields():
    row = bench_dart_op.run_case("small", threads=1, repeats=2, shape=(90, 3, 70, 32, 16, 4))
    assert (row["seq"], row["span_len"], row["quota"]) == (90, 70, 4)
    assert row["kept"] == 90 - 70 + 4 + 8 * 4  # S - L + image pivots + P * T
    assert row["DartPrune_ms"] > 0 and row["DartPruneSlots_ms"] > 0
    # The times are rounded to 4 decimals and the ratio (of the unrounded times) to 3: it must lie in the
    # interval the rounded times allow, widened by its own rounding. (A fixed tolerance failed in CI when
    # the op took under 0.1 ms and the rounding of the times alone moved the ratio by 0.004.)
    new, old, h = row["DartPruneSlots_ms"], row["DartPrune_ms"], 5e-5
    assert (new - h) / (old + h) - 5e-4 <= row["ratio"] <= (new + h) / (old - h) + 5e-4


def test_main_writes_json(tmp_path):
    out = tmp_path / "op.json"
    assert bench_dart_op.main(["--cases", "llava-1.5-7b", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["case"] for r in data["rows"]] == ["llava-1.5-7b"]
    assert data["rows"][0]["kept"] == 633 - 576 + 4 + 8 * 8 and data["meta"]["threads"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads and --repeats must be >= 1"),
    (["--cases", "gpt"], "invalid choice: 'gpt'"),
    (["--json", "/nonexistent/dir/x.json"], "is not a directory"),
])
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench_dart_op.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err

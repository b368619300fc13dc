"""scripts/bench.py (the bench/ package: run.py, runners.py, probes.py, report.py): one small benchmark run on
llava-tiny through the CLI, checked for the JSON document, table and plot it writes; bad input;
and unit tests of the profile parsing (dart_share) and the peak-RSS meter (PeakRSS)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bench_rows import rows_by

from bench.probes import BenchError, PeakRSS, dart_share
from dart_ops import flops
from dart_ops.onnx_op_slots import NODE_PREFIX
from dart_ops.spec import DartConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/bench.py"
MiB = 1 << 20
LOW = 0.111
MARK = NODE_PREFIX.rstrip("/")  # what EngineRunner.profile_dart looks for
EXPECTED_ROWS = [("eager-hf", 1.0), ("eager-dart", 1.0), ("eager-dart", LOW), ("ort", 1.0), ("ort", LOW)]
POSITIVE = ("vision_ms", "prefill_ms", "decode_tok_s", "e2e_ms", "kv_bytes", "peak_rss_bytes",
            "flop_limit_speedup", "prefill_speedup")


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _dart(manifest: dict, ratio: float) -> DartConfig:
    """The engine's DART settings (layer, pivots) at keep ratio `ratio`."""
    d = manifest["dart"]
    return DartConfig(d["layer"], d["pivots_image"], d["pivots_text"], keep_ratio=ratio)


# --- one benchmark run through the CLI ------------------------------------------------------------


@pytest.fixture(scope="module")
def bench(tiny_engine, tmp_path_factory):
    """scripts/bench.py run once on the llava-tiny engine: (CompletedProcess, json path, png path)."""
    engine_dir, _ = tiny_engine
    tmp = tmp_path_factory.mktemp("bench")
    out_json, out_png = tmp / "b.json", tmp / "b.png"
    proc = _bench("--engine-dir", str(engine_dir), "--repeats", "1", "--warmup", "0", "--new-tokens", "4",
                  "--threads", "2", "--ratios", f"1.0,{LOW}", "--json", str(out_json), "--plot", str(out_png))
    return proc, out_json, out_png


@pytest.fixture(scope="module")
def doc(bench):
    proc, out_json, _ = bench
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out_json.read_text())


def test_exit_code_and_table(bench):
    proc, _, _ = bench
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = [i for i, line in enumerate(lines) if "runtime" in line and "prefill ms" in line]
    assert len(header) == 1, proc.stdout
    i = header[0]
    assert set(lines[i + 1].replace(" ", "")) == {"-"}, lines[i + 1]  # the rule under the header
    body = []
    for line in lines[i + 2:]:
        if not line.strip():
            break
        body.append(line.split()[:2])
    assert body == [[rt, f"{r:g}"] for rt, r in EXPECTED_ROWS], proc.stdout


def test_json_meta(doc, tiny_engine):
    assert doc["schema"] == "dart-vlm-bench/1"
    meta = doc["meta"]
    assert meta["model"] == "llava-tiny" == tiny_engine[1]["model"]
    assert meta["threads"] == 2
    assert meta["vision_tokens"] == 576
    assert meta["new_tokens"] == 4
    assert isinstance(meta["prompt_tokens"], int) and meta["prompt_tokens"] > meta["vision_tokens"]
    assert isinstance(meta["span_start"], int) and 0 <= meta["span_start"]
    assert meta["span_start"] + meta["vision_tokens"] <= meta["prompt_tokens"]
    versions = meta["versions"]
    assert isinstance(versions, dict)
    assert "onnxruntime" in versions and "torch" in versions


def test_json_rows_in_order(doc):
    assert [(r["runtime"], r["keep_ratio"]) for r in doc["rows"]] == EXPECTED_ROWS


@pytest.mark.parametrize("key", EXPECTED_ROWS, ids=lambda k: f"{k[0]}@{k[1]:g}")
def test_json_row_figures(doc, tiny_engine, key):
    meta, row = doc["meta"], rows_by(doc)[key]
    for name in POSITIVE:
        value = row[name]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, value)
        assert math.isfinite(value) and value > 0, (name, value)
    assert row["runs"] == 1
    assert row["new_tokens"] == 4
    lo, hi = row["spread"]["prefill_ms"]
    assert lo <= hi
    assert lo <= row["prefill_ms"] <= hi  # one run: all three are that run

    S, a, L = meta["prompt_tokens"], meta["span_start"], meta["vision_tokens"]
    assert row["prompt_tokens"] == S and row["vision_tokens"] == L
    expected_kept = _dart(tiny_engine[1], key[1]).counts(L, S - a - L).kept_vision
    if key[1] == 1.0:
        assert row["kept_vision_tokens"] == 576 == expected_kept
        assert row["flop_limit_speedup"] == 1.0
    else:
        assert row["kept_vision_tokens"] == expected_kept == 68  # 4 + 8 * 8 of 576
        assert DartConfig(keep_ratio=LOW).counts(L, S - a - L).kept_vision == 68
        assert row["flop_limit_speedup"] > 1.0
    assert row["kept_tokens"] == S - 576 + row["kept_vision_tokens"]


def test_json_kv_cache(doc):
    rows = rows_by(doc)
    for rt in ("eager-dart", "ort"):
        assert rows[(rt, LOW)]["kv_bytes"] < rows[(rt, 1.0)]["kv_bytes"], rt
    for ratio in (1.0, LOW):  # the same fp32 cache layout in both
        eager, ort = rows[("eager-dart", ratio)], rows[("ort", ratio)]
        assert eager["kv_bytes"] == ort["kv_bytes"], ratio
        assert eager["kept_tokens"] == ort["kept_tokens"], ratio


def test_json_dart_profile(doc):
    row = rows_by(doc)[("ort", LOW)]
    assert row["dart_prune_ms"] > 0
    assert 0 < row["dart_prune_share"] < 1


def test_json_targets(doc):
    targets = doc["targets"]
    assert isinstance(targets, list) and targets
    for t in targets:
        assert isinstance(t, dict)
        assert {"target", "value", "threshold", "met"} <= set(t)
        assert isinstance(t["target"], str)
        assert isinstance(t["met"], bool)
        assert isinstance(t["value"], (int, float)) and isinstance(t["threshold"], (int, float))


def test_plot_written(bench, doc):
    _, _, out_png = bench
    assert out_png.is_file()
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_flop_limit_matches_flop_model(doc, tiny_engine):
    engine_dir, manifest = tiny_engine
    config = json.loads((engine_dir / "checkpoint" / "config.json").read_text())
    meta = doc["meta"]
    S, a, L = meta["prompt_tokens"], meta["span_start"], meta["vision_tokens"]
    shape = flops.ModelShape.from_llava_config(config)
    got = rows_by(doc)[("ort", LOW)]["flop_limit_speedup"]
    assert got == pytest.approx(flops.speedup_limit(shape, S, a, L, _dart(manifest, LOW)), abs=1e-9)
    assert got == pytest.approx(flops.speedup_limit(shape, S, a, L, DartConfig(keep_ratio=LOW)), abs=1e-9)


# --- bad input: refused while parsing, nothing written --------------------------------------------


def _refused(proc: subprocess.CompletedProcess, out_json: Path, *mentions: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for m in mentions:
        assert m in errors[0], proc.stderr
    assert not out_json.exists()
    assert not any(out_json.parent.glob(f".{out_json.name}.partial-*"))


@pytest.mark.parametrize("args,mentions", [
    (["--ratios", "1.5"], ["--ratios", "1.5"]),
    (["--runtimes", "foo"], ["--runtimes", "foo"]),
    (["--device", "cpu", "--dtype", "fp16"], ["fp16"]),
    (["--repeats", "0"], ["--repeats"]),
], ids=["ratio", "runtime", "fp16-cpu", "repeats"])
def test_bad_arguments(tmp_path, args, mentions):
    out_json = tmp_path / "b.json"
    # an absent engine directory: were the arguments accepted, nothing would be exported into the repo
    proc = _bench("--engine-dir", str(tmp_path / "absent"), *args, "--json", str(out_json), timeout=120)
    _refused(proc, out_json, *mentions)
    assert not (tmp_path / "absent").exists()


def test_engine_dir_without_manifest(tmp_path):
    not_engine = tmp_path / "not-an-engine"
    not_engine.mkdir()
    (not_engine / "notes.txt").write_text("hello\n")
    out_json = tmp_path / "b.json"
    proc = _bench("--engine-dir", str(not_engine), "--json", str(out_json), timeout=120)
    _refused(proc, out_json, "manifest.json")
    assert sorted(p.name for p in not_engine.iterdir()) == ["notes.txt"]


def test_help():
    proc = _bench("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--json" in proc.stdout and "--plot" in proc.stdout


# --- dart_share on a hand-made ONNX Runtime profile -----------------------------------------------


def _session(ts: int, dur: int) -> dict:
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur, "ph": "X", "pid": 1, "tid": 1}


def _node(name: str, ts: int, dur: int) -> dict:
    return {"cat": "Node", "name": name, "ts": ts, "dur": dur, "ph": "X", "pid": 1, "tid": 1,
            "args": {"op_name": "X"}}


def _profile(with_marked: bool = True) -> list[dict]:
    """Two runs (ts in µs): run 1 at [1000, 51000], run 2 at [60000, 110000]; marked nodes
    'DartPrune/...' take 2000 + 4000 µs, other nodes 6000 + 12000 µs."""
    mark = MARK if with_marked else "Other"
    return [
        {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 500},
        _session(60000, 50000),  # out of order on purpose: runs are sorted by start
        _session(1000, 50000),
        # run 1
        _node(f"/{mark}/Gather_kernel_time", 2000, 2000),
        _node("/layers.0/MatMul_kernel_time", 5000, 6000),
        # run 2
        _node(f"/{mark}/TopK_kernel_time", 61000, 1000),
        _node(f"/{mark}/ScatterND_kernel_time", 70000, 3000),
        _node("/layers.1/MatMul_kernel_time", 80000, 12000),
        # not kernel time: ignored
        _node(f"/{mark}/TopK_fence_before", 61000, 700),
        _node("/layers.1/MatMul_fence_after", 92000, 900),
        # outside every run: ignored
        _node(f"/{mark}/Gather_kernel_time", 55000, 5000),
        _node("/layers.0/MatMul_kernel_time", 200000, 50000),
    ]


def test_dart_share_skips_first_run():
    ms, share = dart_share(_profile(), MARK, skip_runs=1)
    assert ms == 4.0  # 4000 µs in the one run counted
    assert share == 0.25  # 4000 / (4000 + 12000)


def test_dart_share_all_runs():
    ms, share = dart_share(_profile(), MARK, skip_runs=0)
    assert ms == 3.0  # (2000 + 4000) µs over 2 runs
    assert share == 0.25  # 6000 / (6000 + 18000)


def test_dart_share_needs_marked_nodes():
    with pytest.raises(BenchError):
        dart_share(_profile(with_marked=False), MARK, skip_runs=1)


def test_dart_share_needs_runs():
    events = [e for e in _profile() if e.get("name") != "model_run"]
    with pytest.raises(BenchError):
        dart_share(events, MARK)
    with pytest.raises(BenchError):  # both runs skipped
        dart_share(_profile(), MARK, skip_runs=2)


# --- PeakRSS --------------------------------------------------------------------------------------


def test_peak_rss_sees_a_freed_allocation():
    with PeakRSS() as m:
        a = np.ones(200 * MiB // 8)  # written, so resident
        assert a[-1] == 1.0
        del a
    if not m.resettable:
        pytest.skip("/proc/self/clear_refs is not writable here: the peak is the process's, not the block's")
    assert m.peak - m.start >= 150 * MiB, (m.start / MiB, m.peak / MiB)
    assert PeakRSS.current() < m.peak  # freed: the peak is a high-water mark, not the current RSS


def test_trt_rows_fail_fast_without_engines(tiny_engine, tmp_path):
    """--runtimes ...,trt on a directory without TensorRT engines: one line, exit 1, before any row."""
    out = tmp_path / "b.json"
    r = _bench("--engine-dir", str(tiny_engine[0]), "--runtimes", "ort,trt", "--repeats", "1",
               "--new-tokens", "2", "--json", str(out), timeout=300)
    assert r.returncode == 1
    assert "no TensorRT engines; build them on this device with: python -m export.trt" in r.stderr
    assert "runtime " not in r.stdout and not out.exists()


def test_cuda_without_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "b.json"
    r = _bench("--model", "llava-7b-shape", "--device", "cuda", "--dtype", "fp16", "--runtimes",
               "eager-hf,eager-dart", "--json", str(out), timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: BenchError: --device cuda: this torch build sees no CUDA GPU"]
    assert not out.exists()


def test_new_tokens_beyond_the_context_fail_fast(tiny_engine, tmp_path):
    """The runtime caps generation at max_context; the benchmark refuses instead of timing short runs."""
    out = tmp_path / "b.json"
    r = _bench("--engine-dir", str(tiny_engine[0]), "--runtimes", "ort", "--repeats", "1",
               "--new-tokens", "4000", "--json", str(out), timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: BenchError: --new-tokens 4000 after the ")
    assert "exceeds the engine's max_context 4096" in r.stderr and not out.exists()


# --- ort-int4 next to ort: the quantized copy made by the bench, compared with the fp32 rows ------------


def _stage_bytes(manifest: dict, prefix: str) -> int:
    """Bytes of a stage's graph and external data, from a manifest's files (named <stage>.onnx[.data])."""
    return sum(f["bytes"] for name, f in manifest["files"].items() if name.startswith(prefix + ".onnx"))


def test_int4_rows_next_to_ort(tiny_engine, tmp_path):
    """--runtimes ort,ort-int4: the int4 copy is made in <engine-dir>-int4; its rows carry its bytes per
    stage, a logits cosine and greedy agreement vs the fp32 rows, and the same DART kept counts."""
    engine_dir, _ = tiny_engine
    out = tmp_path / "b.json"
    proc = _bench("--engine-dir", str(engine_dir), "--runtimes", "ort,ort-int4", "--repeats", "1", "--warmup", "0",
                  "--new-tokens", "4", "--threads", "2", "--ratios", f"1.0,{LOW}", "--no-profile",
                  "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quantized vs ort (fp32)" in proc.stdout
    doc = json.loads(out.read_text())
    rows = rows_by(doc)
    assert list(rows) == [("ort", 1.0), ("ort", LOW), ("ort-int4", 1.0), ("ort-int4", LOW)]
    int4_dir = engine_dir.with_name(engine_dir.name + "-int4")
    assert doc["meta"]["quantized"] == {"int4": str(int4_dir)}
    fp32 = json.loads((engine_dir / "manifest.json").read_text())
    int4 = json.loads((int4_dir / "manifest.json").read_text())
    assert int4["stages"]["decoder"]["quantization"]["bits"] == 4
    for ratio in (1.0, LOW):
        f, q = rows[("ort", ratio)], rows[("ort-int4", ratio)]
        assert f["quant_bits"] is None and f["logits_cosine"] is None and f["greedy_agreement"] is None
        assert q["quant_bits"] == 4
        for stage in ("vision_encoder", "embed_tokens", "decoder"):
            assert f["engine_bytes"][stage] == _stage_bytes(fp32, stage)
            assert q["engine_bytes"][stage] == _stage_bytes(int4, stage)
        assert q["engine_bytes"]["decoder"] < f["engine_bytes"]["decoder"]
        assert q["engine_bytes"]["vision_encoder"] == f["engine_bytes"]["vision_encoder"]  # left in float
        assert 0 < q["logits_cosine"] <= 1
        assert q["greedy_agreement"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 tokens
        assert q["kept_tokens"] == f["kept_tokens"] and q["kept_vision_tokens"] == f["kept_vision_tokens"]
        assert q["peak_rss_bytes"] > 0 and q["decode_tok_s"] > 0 and q["prefill_ms"] > 0
    pairs = doc["quantized_vs_ort"]
    assert [(p["runtime"], p["keep_ratio"]) for p in pairs] == [("ort-int4", 1.0), ("ort-int4", LOW)]
    assert any(t["target"] == "ort-int4 decoder bytes <= 0.3x the fp32 decoder's" for t in doc["targets"])


def test_cosine_and_agreement():
    from bench.run import agreement, cosine

    assert agreement([1, 2, 3, 4], [1, 5, 3, 6]) == 0.5
    assert agreement([], []) == 1.0
    assert cosine([3.0, 4.0], [3.0, 4.0]) == pytest.approx(1.0, abs=1e-15)
    assert cosine([1.0, 0.0], [0.0, 2.0]) == 0.0
    assert cosine([1.0, 1.0], [-2.0, -2.0]) == pytest.approx(-1.0, abs=1e-15)

"""python -m export.quantize: int4 / int8 weight-only engines from an exported engine directory
(llava-tiny from the session fixture; qwen2-vl-tiny through export.build --quantize)."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

import runtime
from export import check_trt, quantize_check
from export.quantize import QuantizeConfig, lm_head, main, quantize
from export.quantize_graph import EXTERNAL_DATA_BYTES
from runtime.manifest import Manifest, QuantSpec, read_manifest
from runtime.onnx_refs import external_data_locations

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.png"
PROMPT = "What is in the picture?"
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(autouse=True)
def _restore_process_state():
    """main() installs a SIGTERM handler and quiets the runtime's logger: undo both after each test."""
    handler, level = signal.getsignal(signal.SIGTERM), logging.getLogger("runtime").level
    yield
    signal.signal(signal.SIGTERM, handler)
    logging.getLogger("runtime").setLevel(level)


def _load(path: Path):
    """The graph with its weights, read like export.quantize does (onnx.load refuses external data
    with several hard links, which other tests' engine copies create)."""
    from export.quantize_graph import _read_external_data

    model = onnx.load(str(path), load_external_data=False)
    _read_external_data(model, path.parent)
    return model


def _tree(d: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under d: what "nothing was touched" compares."""
    files = [p for p in d.rglob("*") if p.is_file()]
    return {p.relative_to(d).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def _quantize(src: Path, out: Path, **kw) -> Manifest:
    return quantize(QuantizeConfig(engine_dir=src, out=out, **kw))


@pytest.fixture(scope="module")
def engines(tiny_engine, tmp_path_factory):
    """{bits: quantized llava-tiny engine dir} with the defaults (ort, asymmetric, block 32, level 4)."""
    src, _ = tiny_engine
    before = _tree(src)
    base = tmp_path_factory.mktemp("quant")
    out = {bits: base / f"int{bits}" for bits in (4, 8)}
    for bits, d in out.items():
        _quantize(src, d, bits=bits)
    assert _tree(src) == before  # the source is never written
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantspec_and_files(tiny_engine, engines, bits):
    src = read_manifest(tiny_engine[0])
    m = read_manifest(engines[bits])  # every sha256 recomputed and checked
    head = lm_head(onnx.load(str(src.path("decoder.onnx")), load_external_data=False).graph)
    want = QuantSpec(bits=bits, block_size=32, symmetric=False, algorithm="rtn", format="MatMulNBits",
                     nodes=LINEARS_PER_LAYER * src.decoder.num_layers, accuracy_level=4, excluded=(head,))
    assert m.stages["decoder"].quantization == want
    assert Manifest.from_json(m.to_json(), m.directory) == m  # the QuantSpec round trip through JSON
    assert {n: s.precision(m.dtype) for n, s in m.stages.items()} == {
        "vision_encoder": "float32", "embed_tokens": "float32", "decoder": f"int{bits}"}
    assert set(m.files) == set(src.files) and m.checkpoint == src.checkpoint
    for name in ("vision_encoder.onnx", "embed_tokens.onnx", "tokenizer.json"):  # copied, byte for byte
        assert m.files[name] == src.files[name]
    assert external_data_locations(m.path("decoder.onnx")) == ["decoder.onnx.data"]
    assert m.tools == {**src.tools, "onnxruntime_quantizer": onnxruntime.__version__}


@pytest.mark.parametrize("bits", [4, 8])
def test_graph_keeps_dart_and_metadata(tiny_engine, engines, bits):
    """Only the linear layers changed: DartPruneSlots' node and function, the metadata the runtime checks and
    the interface are the exporter's; the LM head is still the float Gemm."""
    a = _load(tiny_engine[0] / "decoder.onnx")
    b = _load(engines[bits] / "decoder.onnx")
    assert [(p.key, p.value) for p in b.metadata_props] == [(p.key, p.value) for p in a.metadata_props]
    assert [f.SerializeToString() for f in b.functions] == [f.SerializeToString() for f in a.functions]
    assert b.graph.input == a.graph.input and b.graph.output == a.graph.output
    ops = [n.op_type for n in b.graph.node]
    assert ops.count("DartPruneSlots") == 1 and ops.count("MatMulNBits") == LINEARS_PER_LAYER * 4
    head = lm_head(b.graph)
    assert next(n for n in b.graph.node if n.name == head).op_type == "Gemm"
    inits = {t.name for t in b.graph.initializer}
    assert not [n.name for n in b.graph.node if n.op_type == "MatMul" and n.input[1] in inits]  # none float
    attrs = {(a.name, a.i) for n in b.graph.node if n.op_type == "MatMulNBits" for a in n.attribute}
    assert {("bits", bits), ("block_size", 32), ("accuracy_level", 4)} <= attrs


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_bytes_exact(tiny_engine, engines, bits):
    """Each quantized weight (K x N float32) became K*bits/8 bytes of codes + one float32 scale and one
    zero point (bits wide, packed) per 32 weights: int4 20.5 bytes, int8 37 bytes per 128 float bytes."""
    a = _load(tiny_engine[0] / "decoder.onnx")
    b = _load(engines[bits] / "decoder.onnx")
    sizes = {t.name: len(t.raw_data) for t in b.graph.initializer}
    quant = sum(sizes[i] for n in b.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:])
    inits = {t.name: t for t in a.graph.initializer}
    floats = sum(len(inits[n.input[1]].raw_data) for n in a.graph.node
                 if n.op_type == "MatMul" and n.input[1] in inits)
    assert quant / floats == {4: 20.5 / 128, 8: 37 / 128}[bits]
    files = {bits: sum((d / f).stat().st_size for f in ("decoder.onnx", "decoder.onnx.data"))
             for bits, d in engines.items()}
    fp32 = sum((tiny_engine[0] / f).stat().st_size for f in ("decoder.onnx", "decoder.onnx.data"))
    # The tiny decoder is mostly DartPrune's graph and the float LM head: 0.61x / 0.66x (llava-bench: 0.49x).
    assert files[4] < files[8] < 0.7 * fp32


@pytest.mark.parametrize("bits", [4, 8])
def test_validation_metrics_and_dart_counts(tiny_engine, engines, bits):
    metrics = quantize_check.measure(tiny_engine[0], engines[bits])
    assert [m.ratio for m in metrics] == [1.0, 0.111]
    quantize_check.check(metrics, bits)  # raises when a threshold fails
    t = quantize_check.THRESHOLDS[bits]
    assert all(m.cosine >= t.cosine and m.max_rel <= t.max_rel for m in metrics)
    full, pruned = metrics
    assert (full.kept, full.kept_quantized, full.kept_overlap) == (603, 603, 1.0)
    assert (pruned.kept, pruned.kept_quantized) == (95, 95)  # DART's arithmetic: 68 of 576 vision tokens
    assert pruned.kept_overlap >= t.kept_overlap
    out = runtime.load(engines[bits]).generate(PROMPT, image=SAMPLE, keep_ratio=0.111, max_new_tokens=2)
    ref = runtime.load(tiny_engine[0]).generate(PROMPT, image=SAMPLE, keep_ratio=0.111, max_new_tokens=2)
    assert out.timings["kept_vision_tokens"] == ref.timings["kept_vision_tokens"] == 68
    assert len(out.kept_positions) == len(ref.kept_positions) == 95


NO_TORCH = """
import json, sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
from export.quantize import main
assert main(["--engine-dir", sys.argv[1], "--out", sys.argv[2], "--bits", "4"]) == 0
import runtime
out = runtime.load(sys.argv[2]).generate("What is in the picture?", image=sys.argv[3], max_new_tokens=8)
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m]]
print(json.dumps({"token_ids": out.token_ids, "kept": out.kept_positions}))
"""


def test_quantize_and_run_without_torch(tiny_engine, engines, tmp_path):
    """export.quantize (validation included) and the runtime on its output, torch and transformers blocked."""
    out = tmp_path / "int4"
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(tiny_engine[0]), str(out), str(SAMPLE)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "validate int4: ratio 0.111: logits cosine" in r.stderr
    got = json.loads(r.stdout)
    want = runtime.load(engines[4]).generate(PROMPT, image=SAMPLE, max_new_tokens=8)  # same settings
    assert got == {"token_ids": want.token_ids, "kept": want.kept_positions}
    assert _tree(out).keys() == _tree(engines[4]).keys()


def test_run_cli_reports_precision(engines, capsys):
    from runtime.run import main as run_main

    args = ["--engine-dir", str(engines[4]), "--image", str(SAMPLE), "--prompt", PROMPT,
            "--max-new-tokens", "2"]
    assert run_main(args) == 0
    assert capsys.readouterr().err.rstrip("\n").endswith(
        "| vision_encoder float32, embed_tokens float32, decoder int4")
    assert run_main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == {
        "vision_encoder": "float32", "embed_tokens": "float32", "decoder": "int4"}


@pytest.mark.parametrize("block", [128, 64])
def test_trt_target_writes_blocked_int4_dequantize(tiny_engine, tmp_path, block):
    out = tmp_path / "trt"
    m = _quantize(tiny_engine[0], out, bits=4, target="trt", block_size=block)  # validated on ORT CPU
    assert m.stages["decoder"].quantization == QuantSpec(
        bits=4, block_size=block, symmetric=True, algorithm="rtn", format="QDQ", nodes=28,
        accuracy_level=None, excluded=m.stages["decoder"].quantization.excluded)
    g = _load(out / "decoder.onnx")
    assert not [n for n in g.graph.node if n.domain == "com.microsoft"]
    inits = {t.name: t for t in g.graph.initializer}
    dq = [n for n in g.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 28
    for n in dq:
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT4  # signed: symmetric, no zero point
        assert len(n.input) == 2  # no zero point
        assert {(a.name, a.i) for a in n.attribute} == {("axis", 0), ("block_size", block)}
    consumers = {i for n in g.graph.node if n.op_type == "MatMul" for i in n.input}
    assert all(n.output[0] in consumers for n in dq)
    default = {o.domain: o.version for o in g.opset_import}[""]
    assert default == 21 and [o.version for o in g.functions[0].opset_import if o.domain == ""] == [21]
    assert all((onnx.numpy_helper.to_array(inits[n.input[1]]) > 0).all() for n in dq)
    findings = check_trt.check_engine_dir(out)  # TensorRT 10.3's parser rules, quantized forms included
    assert [f.line() for fs in findings.values() for f in fs if f.severity == "error"] == []


def _dequantize(model) -> dict[str, np.ndarray]:
    """{weight: (K, N) float} of each blocked int4 DequantizeLinear (ONNX semantics: code * block scale)."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            block = next(a.i for a in n.attribute if a.name == "block_size")
            q, s = inits[n.input[0]].astype(np.float64), inits[n.input[1]].astype(np.float64)
            out[n.input[0]] = q * np.repeat(s, block, axis=0)[: q.shape[0]]
    return out


def test_positive_scales_is_exact_but_for_the_clipped_extreme():
    """ORT's symmetric RTN writes negative scales; flipping them keeps every weight but the positive
    extreme (code -8 -> +8, clipped to 7), which moves by exactly one scale step."""
    from onnx import TensorProto, helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    from export.quantize_graph import positive_scales

    w = np.random.default_rng(0).standard_normal((256, 48)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])],
                              [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    q = MatMulNBitsQuantizer(model, bits=4, block_size=64, is_symmetric=True, quant_format=QuantFormat.QDQ)
    q.process()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.model.model.graph.initializer}
    codes = next(v for k, v in inits.items() if k.endswith("_Q4")).astype(np.int8)  # (256, 48)
    scales = next(v for k, v in inits.items() if k.endswith("_scales"))  # (4, 48)
    [a] = _dequantize(q.model.model).values()
    negative = int((scales < 0).sum())
    assert 0 < negative < scales.size  # both signs occur: the case the pass exists for
    assert positive_scales(q.model.model) == negative
    [b] = _dequantize(q.model.model).values()
    step = np.repeat(np.abs(scales), 64, axis=0)  # (256, 48)
    clipped = (codes == -8) & np.repeat(scales < 0, 64, axis=0)  # positive extremes of flipped blocks
    assert clipped.sum() >= negative and np.array_equal(a != b, clipped)
    np.testing.assert_allclose((a - b)[clipped], step[clipped], rtol=1e-6)
    np.testing.assert_allclose(a[clipped], 8 * step[clipped], rtol=1e-6)


def _refused(argv, capsys, code):
    try:
        rc = main(argv)
    except SystemExit as e:  # usage errors exit from argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("extra, says", [
    (["--target", "trt", "--asymmetric"], "--target trt needs symmetric weights"),
    (["--target", "trt", "--block-size", "32"], "--target trt takes --block-size 64 or 128"),
    (["--target", "trt", "--bits", "8"], "--target trt quantizes to int4 only"),
    (["--block-size", "48"], "argument --block-size: invalid choice"),
    (["--bits", "8", "--embeddings"], "--embeddings needs --bits 4"),
])
def test_usage_refusals(tiny_engine, tmp_path, capsys, extra, says):
    src = tiny_engine[0]
    before = _tree(src)
    argv = ["--engine-dir", str(src), "--out", str(tmp_path / "q"), "--bits", "4", *extra]
    assert says in _refused(argv, capsys, 2)
    assert list(tmp_path.iterdir()) == [] and _tree(src) == before


def test_out_refusals(tiny_engine, tmp_path, capsys):
    src = tiny_engine[0]
    before = _tree(src)
    for out, says in ((src, "is the source engine directory"), (src / "q", "lies inside --engine-dir"),
                      (src.parent, "contains --engine-dir")):
        assert says in _refused(["--engine-dir", str(src), "--out", str(out), "--bits", "4"], capsys, 2)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    mine = _tree(theirs)
    err = _refused(["--engine-dir", str(src), "--out", str(theirs), "--bits", "4"], capsys, 1)
    assert "is not a DART-VLM engine directory" in err
    err = _refused(["--engine-dir", str(src), "--out", str(tmp_path / "x"), "--bits", "4",
                    "--exclude", "nope*"], capsys, 1)
    assert "--exclude 'nope*' matches no linear layer" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"] and _tree(theirs) == mine
    assert _tree(src) == before


def test_requantizing_is_refused(engines, tmp_path, capsys):
    argv = ["--engine-dir", str(engines[4]), "--out", str(tmp_path / "again"), "--bits", "4"]
    err = _refused(argv, capsys, 1)
    assert "decoder of" in err and "is already int4" in err and not (tmp_path / "again").exists()


def test_broken_scales_fail_validation(tiny_engine, tmp_path, monkeypatch):
    """Zeroed scales (a quantizer bug's worst case) make every quantized layer output 0: validation must
    stop it, and nothing is published."""
    from onnxruntime.quantization import matmul_nbits_quantizer as q

    real = q.DefaultWeightOnlyQuantizer.qbits_block_quant

    def zero_scales(self, weight):
        packed, scales, zero_points = real(self, weight)
        return packed, np.zeros_like(scales), zero_points

    monkeypatch.setattr(q.DefaultWeightOnlyQuantizer, "qbits_block_quant", zero_scales)
    with pytest.raises(quantize_check.ValidationError, match="first-step logits cosine"):
        _quantize(tiny_engine[0], tmp_path / "broken", bits=8)
    assert list(tmp_path.iterdir()) == []


def test_external_data_for_every_quantized_stage(tiny_engine, tmp_path, monkeypatch):
    """The large-graph path: with the threshold at 0, the vision and embeddings graphs (inline in the
    source) are saved with one external-data file each, listed in the manifest and loaded from it."""
    assert EXTERNAL_DATA_BYTES == 1 << 30
    monkeypatch.setattr("export.quantize_graph.EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "all"
    m = _quantize(tiny_engine[0], out, bits=4, vision=True, embeddings=True, lm_head=True, validate=False)
    for stage, file in (("vision_encoder", "vision_encoder.onnx"), ("embed_tokens", "embed_tokens.onnx"),
                        ("decoder", "decoder.onnx")):
        assert external_data_locations(out / file) == [file + ".data"] and file + ".data" in m.files
        q = m.stages[stage].quantization
        assert (q.bits, q.excluded, q.accuracy_level) == (4, (), None if stage == "embed_tokens" else 4)
    emb = onnx.load(str(out / "embed_tokens.onnx"), load_external_data=False)
    assert [n.op_type for n in emb.graph.node] == ["GatherBlockQuantized"]
    assert (m.stages["vision_encoder"].quantization.nodes, m.stages["decoder"].quantization.nodes) == (14, 29)
    out_q = runtime.load(out).generate(PROMPT, image=SAMPLE, max_new_tokens=4)  # sha256 of the .data files
    assert len(out_q.kept_positions) == 95


def test_build_quantize_qwen2_vl(tmp_path, caplog):
    """export.build --quantize int4 on another family: float export and quantization in one staging
    directory, validated (quantized vs float), only the quantized engine published."""
    from export.build import build, parse_args
    from runtime.steps import Request

    out = tmp_path / "qwen-int4"
    caplog.set_level(logging.INFO, logger="export.quantize")
    build(parse_args(["--model", "qwen2-vl-tiny", "--out", str(out), "--quantize", "int4", "--max-seq", "512",
                      "--max-context", "640"]))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validate int4")]
    assert [line.split(":")[1].strip() for line in lines] == ["ratio 1", "ratio 0.111"]
    m = read_manifest(out)
    assert m.family == "qwen2_vl" and m.stages["decoder"].quantization.nodes == 28
    assert m.stages["vision_encoder"].quantization is None and not (out / "float").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen-int4"]
    pipe = runtime.load(out)
    got = pipe.generate(PROMPT, image=SAMPLE, max_new_tokens=4)
    prepared = pipe.prepare(Request(PROMPT, SAMPLE))
    assert len(got.kept_positions) == prepared.counts.kept_len(len(prepared.ids)) < len(prepared.ids)



def test_exclude_patterns_leave_those_layers_float(tiny_engine, tmp_path):
    src = tiny_engine[0]
    graph = onnx.load(str(src / "decoder.onnx"), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    linear = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    pattern = [n for n in linear if n.startswith("node_linear_2")]  # node_linear_2, _20 ... _27
    assert len(pattern) == 9
    m = _quantize(src, tmp_path / "ex", bits=8, exclude=("node_linear_2*",), validate=False)
    q = m.stages["decoder"].quantization
    assert q.nodes == len(linear) - 9 and set(q.excluded) == {lm_head(graph), *pattern}
    out = onnx.load(str(tmp_path / "ex" / "decoder.onnx"), load_external_data=False).graph
    assert sorted(n.name for n in out.node if n.op_type == "MatMul" and n.input[1] in inits) == sorted(pattern)


def test_build_refuses_quantize_for_tensorrt(capsys):
    from export.build import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "llava-tiny", "--quantize", "int4", "--target", "trt"])
    assert e.value.code == 2 and "python -m export.quantize --target trt" in capsys.readouterr().err


def test_a_hard_linked_engine_directory_quantizes(tiny_engine, tmp_path):
    """onnx.load refuses external data with several hard links; an engine directory copied with hard
    links (cp -al, backups) is still ours to read, so export.quantize reads the data itself."""
    import os

    src, _ = tiny_engine
    linked = tmp_path / "linked"
    linked.mkdir()
    for p in src.rglob("*"):
        dst = linked / p.relative_to(src)
        if p.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, dst)
    assert (linked / "decoder.onnx.data").stat().st_nlink >= 2
    m = _quantize(linked, tmp_path / "q", bits=4, validate=False)
    assert m.stages["decoder"].quantization.bits == 4

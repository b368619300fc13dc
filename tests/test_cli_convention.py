"""One CLI convention for python -m export.build, export.trt, export.check_trt, runtime.run and
scripts/bench.py (runtime/cli.py): --help shows the config dataclass's defaults, a usage error is one
line with exit code 2, a failure one line with exit code 1, and --engine-dir names the engine directory.
In-process main(argv) calls, plus one subprocess per tool for the real entry point."""

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from dart_ops.spec import DartConfig
from export import build, check_trt, quantize, trt
from bench.config import BenchConfig
from runtime import cli, run
from runtime.serve import __main__ as serve_main
from runtime.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_cli", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

PROGS = {"build": "python -m export.build", "trt": "python -m export.trt",
         "check_trt": "python -m export.check_trt", "run": "python -m runtime.run",
         "bench": "python scripts/bench.py", "quantize": "python -m export.quantize",
         "serve": "python -m runtime.serve"}
MAINS = {"build": build.main, "trt": trt.main, "check_trt": check_trt.main, "run": run.main,
         "bench": bench.main, "quantize": quantize.main, "serve": serve_main.main}
COMMANDS = {  # with the required options
    "build": ["-m", "export.build", "--model", "llava-tiny"],
    "trt": ["-m", "export.trt", "--engine-dir", "e"],
    "check_trt": ["-m", "export.check_trt"],
    "run": ["-m", "runtime.run", "--engine-dir", "e", "--prompt", "hi"],
    "bench": [str(ROOT / "scripts" / "bench.py")],
    "quantize": ["-m", "export.quantize", "--engine-dir", "e", "--out", "o", "--bits", "4"],
    "serve": ["-m", "runtime.serve", "--engine-dir", "e"],
}


@pytest.fixture(autouse=True)
def _restore_process_state():
    """main() installs a SIGTERM handler and quiets some loggers: undo both after each test."""
    handler = signal.getsignal(signal.SIGTERM)
    names = ("torch", "onnxscript", "onnx_ir", "transformers", "httpx", "runtime", "export.stages")
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    signal.signal(signal.SIGTERM, handler)
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


@pytest.fixture
def manifest_dir(tmp_path):
    """A directory with a small manifest.json: enough for the tools' argument checks."""
    d = tmp_path / "eng"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"model": "llava-tiny",
                                                 "dynamic_axes": {"batch": {"min": 1, "opt": 1, "max": 4}}}))
    return d


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _one_error_line(text: str) -> str:
    assert text.startswith("error: ") and text.count("\n") == 1, repr(text)
    assert "\x1b" not in text and "Traceback" not in text, repr(text)
    return text.rstrip("\n")


# --- --help: the dataclass's defaults ------------------------------------------------------------------


def _shown_defaults(help_text: str) -> dict[str, str]:
    """{--flag: text of its "(default: ...)"} from argparse's help: an option's entry starts on a line
    indented by two spaces and a dash and goes on over the more deeply indented lines below it."""
    entries, current = [], None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            entries.append(current)
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    out = {}
    for entry in entries:
        text = " ".join(" ".join(entry).split())
        m = re.search(r"\(default: (.*)\)$", text)
        invocation = re.split(r"\s{2,}", entry[0].strip())[0]  # "--out OUT, --engine-dir OUT"
        for flag in re.findall(r"(?:^|, )(--[a-z0-9-]+)", invocation):
            if m:
                out[flag] = m.group(1)
    return out


def _help(name, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal width (and at hyphens)
    assert _exit_code(MAINS[name], ["--help"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"usage: {PROGS[name]} ") and out.err == ""
    return out.out


def _flags(*names: str, **renamed: str) -> dict[str, str]:
    """--flag -> dataclass field (--max-seq -> max_seq; renamed: field=flag)."""
    table = {f"--{n.replace('_', '-')}": n for n in names}
    table.update({flag: field for field, flag in renamed.items()})
    return table


# Options whose help must show the dataclass default ({flag: field}); None defaults (explained in
# words) and on/off flags show none.
SHOWN = {
    # --max-seq: None, the family's default_max_seq (its help says so in words)
    "build": (build.BuildConfig, _flags("dtype", "opset", "max_context", "max_batch", "target")),
    "trt": (trt.TrtConfig, {}),
    "check_trt": (check_trt.CheckConfig, {}),
    "run": (run.RunConfig, _flags("max_new_tokens", "temperature", "top_p", "provider")),
    "bench": (BenchConfig, _flags("ratios", "runtimes", "new_tokens", "repeats", "warmup", "threads",
                                  "device", "dtype", "ort_provider", "prompt", "image")),
    "serve": (ServeConfig, _flags("host", "port", "workers", "queue_size", "provider")),
}


@pytest.mark.parametrize("name", list(SHOWN))
def test_help_shows_the_dataclass_defaults(name, capsys, monkeypatch):
    shown = _shown_defaults(_help(name, capsys, monkeypatch))
    cls, flags = SHOWN[name]
    defaults = cli.dataclass_defaults(cls)
    want = {flag: cli.show_default(defaults[field]) for flag, field in flags.items()}
    if name == "build":  # the DART options: DartConfig's defaults
        dart = DartConfig()
        want.update({"--ratio": "0.111", "--layer": "2", "--pivots-image": "4", "--pivots-text": "4"})
        assert (dart.keep_ratio, dart.layer, dart.pivots_image, dart.pivots_text) == (0.111, 2, 4, 4)
        assert shown["--max-seq"].startswith("the family's, 2048; LLaVA-NeXT 3584")
    assert {flag: shown.get(flag) for flag in want} == want
    # None defaults are explained in words, never shown as "None"; on/off flags show nothing
    assert "None" not in shown.values() and "False" not in shown.values() and "True" not in shown.values()


def test_bench_defaults_are_bench_config(capsys, monkeypatch):
    """The numbers behind the issue: --repeats used to be 10 in the CLI and 5 in BenchConfig."""
    shown = _shown_defaults(_help("bench", capsys, monkeypatch))
    defaults = BenchConfig()
    assert shown["--repeats"] == str(defaults.repeats) and shown["--threads"] == str(defaults.threads)
    assert shown["--ratios"] == "1.0,0.333,0.222,0.111" and shown["--runtimes"] == "eager-hf,eager-dart,ort"


def test_parsed_defaults_equal_the_dataclass(manifest_dir):
    assert build.parse_args(["--model", "llava-tiny"]) == build.BuildConfig(
        model="llava-tiny", out=Path("engines/llava-tiny"), dart=DartConfig())
    assert trt.parse_args(["--engine-dir", str(manifest_dir)]) == trt.TrtConfig(engine_dir=manifest_dir)
    assert check_trt.parse_args(["--engine-dir", str(manifest_dir)]) == check_trt.CheckConfig(manifest_dir)
    assert run.parse_args(["--engine-dir", str(manifest_dir), "--prompt", "hi"]) == run.RunConfig(
        engine_dir=manifest_dir, prompt="hi")
    assert bench.parse_args([])[0] == BenchConfig()


# --- --engine-dir ---------------------------------------------------------------------------------------


def test_engine_dir_everywhere(manifest_dir):
    assert build.parse_args(["--model", "llava-tiny", "--engine-dir", str(manifest_dir)]).out == manifest_dir
    assert build.parse_args(["--model", "llava-tiny", "--out", str(manifest_dir)]).out == manifest_dir
    assert trt.parse_args(["--engine-dir", str(manifest_dir)]).engine_dir == manifest_dir
    assert run.parse_args(["--engine-dir", str(manifest_dir), "--prompt", "hi"]).engine_dir == manifest_dir
    cfg, _ = bench.parse_args(["--engine-dir", str(manifest_dir)])
    assert (cfg.engine_dir, cfg.model) == (manifest_dir, "llava-tiny")  # the model read from its manifest
    # check_trt: --engine-dir, and the older positional form as an alias
    want = check_trt.CheckConfig(manifest_dir, json=True)
    assert check_trt.parse_args(["--engine-dir", str(manifest_dir), "--json"]) == want
    assert check_trt.parse_args([str(manifest_dir), "--json"]) == want
    assert check_trt.parse_args([str(manifest_dir), "--engine-dir", str(manifest_dir), "--json"]) == want


@pytest.mark.parametrize("argv, message", [
    ([], "error: no engine directory: pass --engine-dir DIR (see: python -m export.check_trt --help)"),
    (["a", "--engine-dir", "b"], ("error: two engine directories given (a and --engine-dir b): pass one "
                                  "(see: python -m export.check_trt --help)")),
])
def test_check_trt_engine_dir_usage(argv, message, capsys):
    assert _exit_code(check_trt.main, argv) == 2
    assert _one_error_line(capsys.readouterr().err) == message


# --- usage errors: one line, exit 2 --------------------------------------------------------------------


USAGE = {
    "build": (["--model", "llava-tiny", "--opset", "30"], "--opset must be in [17, 20]"),
    "trt": (["--engine-dir", "{eng}", "--max-seq", "0"], "--max-seq must be >= 1, got 0"),
    "check_trt": (["--engine-dir", "{eng}", "--jsn"], "unrecognized arguments: --jsn"),
    "run": (["--engine-dir", "{eng}", "--prompt", "hi", "--ratio", "-inf"],
            "argument --ratio: keep ratio must be in (0, 1]"),
    "bench": (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    "serve": (["--engine-dir", "{eng}", "--replicas", "2"], "--replicas"),
}


@pytest.mark.parametrize("name", list(USAGE))
def test_usage_error_is_one_line_exit_2(name, manifest_dir, capsys):
    argv, needle = USAGE[name]
    assert _exit_code(MAINS[name], [a.format(eng=manifest_dir) for a in argv]) == 2
    out = capsys.readouterr()
    line = _one_error_line(out.err)
    assert needle in line and line.endswith(f"(see: {PROGS[name]} --help)") and out.out == ""


@pytest.mark.parametrize("name", list(COMMANDS))
def test_usage_error_through_the_entry_point(name):
    """The real command line: an unknown flag with terminal escapes and a newline in it."""
    r = subprocess.run([sys.executable, *COMMANDS[name], "--bogus\x1b[31m\nx"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"error: unrecognized arguments: --bogus x (see: {PROGS[name]} --help)\n"
    assert r.stdout == ""


# --- failures: one line, exit 1 -------------------------------------------------------------------------


def test_build_failure(tmp_path, capsys):
    out = tmp_path / "eng"
    assert build.main(["--model", "llava-tiny", "--engine-dir", str(out), "--max-seq", "10"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == ("error: build: --max-seq 10 is too short for this model: a prompt with its 576 vision "
                    "tokens needs --max-seq >= 606")
    assert not out.exists()


def test_trt_failure(tiny_engine, capsys):
    assert trt.main(["--engine-dir", str(tiny_engine[0]), "--max-batch", "999", "--dry-run"]) == 1
    out = capsys.readouterr()
    assert _one_error_line(out.err) == ("error: trt: --max-batch 999 exceeds the exported axis 'batch' "
                                        "(max 4); re-export with a larger limit")
    assert out.out == ""


def test_check_trt_failures(tmp_path, capsys, monkeypatch):
    d = tmp_path / "eng"
    d.mkdir()
    x, y = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]), helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([helper.make_node("Det", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, d / "decoder.onnx")
    (d / "manifest.json").write_text(json.dumps({"stages": {"decoder": {"file": "decoder.onnx"}}}))
    assert check_trt.main(["--engine-dir", str(d)]) == 1  # the parser would reject a node: listed on stdout
    out = capsys.readouterr()
    assert "decoder.onnx: FAILED, 1 error" in out.out and out.err == ""
    assert check_trt.main(["--engine-dir", str(tmp_path / "missing")]) == 2  # bad input: usage
    assert _one_error_line(capsys.readouterr().err) == f"error: {tmp_path / 'missing'} is not a directory"

    def broken(path):
        raise RuntimeError("\x1b[1mboom\x1b[0m\x07\nsecond line")

    monkeypatch.setattr(check_trt, "check_engine_dir", broken)
    assert check_trt.main(["--engine-dir", str(d)]) == 1  # the check itself failed
    assert _one_error_line(capsys.readouterr().err) == "error: RuntimeError: boom\\x07"


def test_run_failure(tmp_path, capsys):
    assert run.main(["--engine-dir", str(tmp_path / "missing"), "--prompt", "hi"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "not an engine directory" in line and str(tmp_path / "missing") in line


def test_bench_failure(manifest_dir, tmp_path, capsys, monkeypatch):
    from bench import run as benchmark

    def fails(cfg, progress=None):
        raise benchmark.BenchError(f"\x1b[31mno rows\x1b[0m for {cfg.model}\nat all")

    monkeypatch.setattr(benchmark, "run", fails)
    out_json = tmp_path / "b.json"
    assert bench.main(["--engine-dir", str(manifest_dir), "--json", str(out_json)]) == 1
    out = capsys.readouterr()
    assert _one_error_line(out.err) == "error: BenchError: no rows for llava-tiny"
    assert out.out == "" and not out_json.exists()


# --- runtime/cli.py itself ------------------------------------------------------------------------------


def test_report(capsys):
    def reported(exc, *args, **kw):
        try:
            raise exc
        except BaseException as e:  # noqa: BLE001
            code = cli.report(e, *args, **kw)
        return code, capsys.readouterr().err

    assert reported(ValueError("bad\nmore"), False) == (1, "error: ValueError: bad\n")
    assert reported(ValueError("bad"), False, "out") == (1, "error: out: bad\n")
    assert reported(ValueError("bad"), False, "", cli.EXIT_USAGE) == (2, "error: bad\n")
    assert reported(ValueError(""), False, "") == (1, "error: ValueError\n")
    assert reported(ValueError("a\tb\x00c\x1b[0m"), False) == (1, "error: ValueError: a b\\x00c\n")
    assert reported(KeyboardInterrupt(), True) == (1, "error: interrupted; nothing was written\n")
    assert reported(cli.Terminated(), True) == (1, "error: terminated (SIGTERM); nothing was written\n")
    with pytest.raises(ValueError, match="bad"):  # -v: the exception (and its traceback) goes on
        reported(ValueError("bad"), True)


def test_dataclass_defaults_and_show_default():
    from dataclasses import dataclass, field

    @dataclass
    class C:
        required: int
        n: int = 3
        ratios: tuple = (1.0, 0.5)
        made: list = field(default_factory=lambda: ["a", "b"])

    assert cli.dataclass_defaults(C) == {"n": 3, "ratios": (1.0, 0.5), "made": ["a", "b"]}
    assert [cli.show_default(v) for v in (3, 0.111, (1.0, 0.5), ["a", "b"], Path("x/y"), "text")] == [
        "3", "0.111", "1.0,0.5", "a,b", "x/y", "text"]


def test_parser_percent_and_negative_values(capsys):
    p = cli.Parser(prog="tool")
    p.add_argument("--x", type=float, default=0.5, help="a share in %%")  # argparse %-formats help texts
    p.add_argument("--name", default="100%", help="a name")
    assert p.parse_args(["--x", "-inf"]).x == float("-inf")
    text = p.format_help()
    assert "a share in % (default: 0.5)" in text and "a name (default: 100%)" in text


def test_runtime_cli_needs_neither_torch_nor_numpy():
    """runtime.run --help (and the whole convention) on a machine with only the standard library."""
    code = ("import sys\n"
            "for m in ('torch', 'numpy', 'onnxruntime', 'transformers'):\n"
            "    sys.modules[m] = None\n"
            "from runtime.run import build_parser\n"
            "print(build_parser().format_help())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    assert "--max-new-tokens" in r.stdout and "(default: 64)" in r.stdout

"""Bad input never ends in a traceback: generate() raises InputError / EngineError with a one-line
message before any graph runs, and `python -m runtime.run` prints one line and exits 1 or 2.

Most cases run on the fake engine of test_runtime_unit.py (built in a second); a few run on the real
llava-tiny export (the `tiny_engine` fixture): all-NaN pixels, numpy scalars, the max_new_tokens cap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_runtime_unit import BOS, IMAGE_ID, TEMPLATE, TEMPLATE_TEXT, build_engine, reference_generate

from runtime import EngineError, InputError
from runtime.manifest import read_manifest
from runtime.pipeline import Pipeline, cap_new_tokens, load
from runtime.preprocess import preprocess
from runtime.prompt import PromptBuilder, check_template
from runtime.run import allow_negative_values, main, one_line
from runtime.sampling import Sampler

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample.png"


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return build_engine(tmp_path_factory.mktemp("engine") / "fake")


@pytest.fixture(scope="module")
def pipe(engine):
    return load(engine)


def _assert_one_line(message: str) -> None:
    assert message and "\n" not in message and "\x1b" not in message and "Traceback" not in message


def _raises(kind, match: str, fn, *args, **kwargs):
    with pytest.raises(kind, match=match) as e:
        fn(*args, **kwargs)
    _assert_one_line(str(e.value))
    return e.value


class Spy:
    """A stage that counts its runs and can rewrite its outputs (to fake a broken engine)."""

    def __init__(self, stage, edit=None):
        self.stage, self.edit, self.calls = stage, edit, 0

    def __getattr__(self, name):  # name, input_names, output_names, session, ...
        return getattr(self.stage, name)

    def run(self, feeds):
        self.calls += 1
        out = self.stage.run(feeds)
        return self.edit(out, self.calls) if self.edit else out


def _spied(pipe, **edits) -> tuple[Pipeline, dict[str, Spy]]:
    spies = {"vision_encoder": Spy(pipe.vision, edits.get("vision_encoder")),
             "embed_tokens": Spy(pipe.embed, edits.get("embed_tokens")),
             "decoder": Spy(pipe.decoder, edits.get("decoder"))}
    return Pipeline(pipe.manifest, spies, pipe.prompt), spies


# --- seeds and numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed, shown", [(-1, "got -1"), (2**63, f"got {2**63}"), (True, "got True (bool)"),
                                         (np.bool_(False), "(bool)"), (1.5, "got 1.5"), ("3", "got '3' (str)"),
                                         (np.int64(-5), "got -5"),
                                         pytest.param(-10**5000, "got a negative integer of about 5001 digits",
                                                      id="huge-negative")])
def test_bad_seed(pipe, seed, shown):
    e = _raises(InputError, r"seed must be an integer in \[0, 2\*\*63 - 1\]", pipe.generate, "what",
                temperature=1.0, seed=seed)
    assert shown in str(e)


def test_seed_range_edges_and_numpy_seed(pipe):
    kw = {"temperature": 1.5, "top_p": 0.75, "max_new_tokens": 6}
    top = pipe.generate("what is this", seed=2**63 - 1, **kw).token_ids  # the largest seed is accepted
    assert pipe.generate("what is this", seed=np.uint64(2**63 - 1), **kw).token_ids == top
    a = pipe.generate("what is this", seed=3, **kw).token_ids
    assert pipe.generate("what is this", seed=np.uint16(3), **kw).token_ids == a
    assert pipe.generate("what is this", seed=np.int64(3), **kw).token_ids == a


def test_numpy_scalars_give_the_same_tokens(pipe):
    photo = preprocess(SAMPLE, pipe.manifest.preprocess)
    py = pipe.generate("what is this", pixel_values=photo, keep_ratio=0.5, max_new_tokens=6, temperature=1.5,
                       top_p=0.75, seed=2)
    npy = pipe.generate("what is this", pixel_values=photo, keep_ratio=np.float32(0.5),
                        max_new_tokens=np.int64(6), temperature=np.float16(1.5), top_p=np.float32(0.75),
                        seed=np.int32(2))
    assert npy.token_ids == py.token_ids and npy.kept_positions == py.kept_positions
    assert npy.keep_ratio == 0.5 and type(npy.keep_ratio) is float
    greedy = pipe.generate("what is this", max_new_tokens=np.uint8(4))
    assert greedy.token_ids == pipe.generate("what is this", max_new_tokens=4).token_ids


@pytest.mark.parametrize("kwargs, message", [
    ({"keep_ratio": "0.5"}, r"keep ratio must be in \(0, 1\] .*, got '0.5' \(str\)"),
    ({"keep_ratio": np.bool_(True)}, r"keep ratio must be in \(0, 1\] .*\(bool\)"),
    ({"keep_ratio": np.array([0.5, 0.2])}, r"keep ratio .*got an array of shape \[2\] \(float64\)"),
    ({"keep_ratio": np.float32(1.5)}, r"keep ratio must be in \(0, 1\] .*, got 1.5$"),
    ({"keep_ratio": 10**400}, r"keep ratio must be in \(0, 1\] .*, got an integer of about 401 digits"),
    ({"max_new_tokens": 3.0}, r"max_new_tokens must be an integer >= 0, got 3.0$"),
    ({"max_new_tokens": np.float32(3)}, r"max_new_tokens must be an integer >= 0, got .*\(float32\)"),
    ({"max_new_tokens": True}, r"max_new_tokens must be an integer >= 0, got True \(bool\)"),
    ({"max_new_tokens": None}, r"max_new_tokens must be an integer >= 0, got None \(NoneType\)"),
    ({"max_new_tokens": np.int64(-1)}, r"max_new_tokens must be an integer >= 0, got -1$"),
    ({"temperature": float("inf")}, r"temperature must be a finite number >= 0 \(0 = greedy\), got inf"),
    ({"temperature": np.float64(-1e3)}, r"temperature must be a finite number >= 0 .*, got -1000.0"),
    ({"temperature": float("nan")}, r"temperature must be .*, got nan"),
    ({"top_p": np.float32(0)}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": "1"}, r"top_p must be in \(0, 1\], got '1' \(str\)"),
    ({"stream": "print"}, r"stream must be a callable .*, got 'print' \(str\)"),
])
def test_bad_numbers_and_arguments(pipe, kwargs, message):
    spied, spies = _spied(pipe)
    _raises(InputError, message, spied.generate, "what", **kwargs)
    assert [s.calls for s in spies.values()] == [0, 0, 0]  # refused before any graph ran


def test_tiny_temperature_is_greedy_without_nan():
    logits = np.random.default_rng(0).normal(size=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value RuntimeWarning either
        s = Sampler(1e-300, seed=0)
        assert {s(logits) for _ in range(20)} == {int(np.argmax(logits))}
        assert {Sampler(5e-324, seed=1)(logits) for _ in range(5)} == {int(np.argmax(logits))}


# --- prompt templates --------------------------------------------------------------------------------


@pytest.mark.parametrize("template, message", [
    ("USER: <image>\n{question} ASSISTANT:", r"has field\(s\) '\{question\}'"),
    ("USER: <image>\n{} {prompt}", r"has field\(s\) '\{\}'"),
    ("USER: <image>\n{0} {prompt}", r"has field\(s\) '\{0\}'"),
    ("USER: <image>\n{prompt:>20}", r"has field\(s\) '\{prompt:>20\}'"),
    ("USER: <image>\n{prompt!r}", r"has field\(s\) '\{prompt!r\}'"),
    ("USER: <image>\n{prompt.upper}", r"has field\(s\) '\{prompt.upper\}'"),
    ("USER: <image>\n{prompt} }", r"is not a valid template \(Single '\}' encountered"),
    ("USER: <image>\n{prompt", r"is not a valid template"),
    ("USER: <image>\n{prompt} {prompt}", r"has 2 \{prompt\} fields"),
    ("USER: <image>\nASSISTANT:", r"has 0 \{prompt\} fields"),
])
def test_bad_template_refused_at_load(engine, template, message):
    m = read_manifest(engine)
    bad = dataclasses.replace(m.prompt, template=template)
    _raises(EngineError, r"manifest.json: prompt.template " + message, PromptBuilder,
            engine / "tokenizer.json", bad, m.tokens)
    text_only = dataclasses.replace(m.prompt, template_text_only=template.replace("<image>\n", ""))
    _raises(EngineError, r"manifest.json: prompt.template_text_only ", PromptBuilder,
            engine / "tokenizer.json", text_only, m.tokens)


def test_bad_template_load_and_cli(tmp_path):
    prompt = {"template": "USER: <image>\n{prompt} {name} ASSISTANT:", "template_text_only": TEMPLATE_TEXT,
              "add_special_tokens": True}
    d = build_engine(tmp_path / "e", prompt=prompt)
    # refused at load, not at generate (by the manifest reader already, or else by PromptBuilder)
    _raises(EngineError, r"manifest.json: '?prompt\.template'? .*\{name\}", load, d)
    err = _cli_error(_run_cli("--engine-dir", str(d), "--prompt", "what"), 1)
    assert re.match(r"error: manifest.json: '?prompt\.template'? .*\{name\}", err), err


def test_template_image_token_counts(engine):
    m = read_manifest(engine)
    tok = engine / "tokenizer.json"
    two = dataclasses.replace(m.prompt, template="USER: <image> <image>\n{prompt} ASSISTANT:")
    _raises(EngineError, r"prompt.template holds 2 image tokens \('<image>'\), it must hold 1", PromptBuilder,
            tok, two, m.tokens)
    none = dataclasses.replace(m.prompt, template="USER: {prompt} ASSISTANT:")
    _raises(EngineError, r"prompt.template holds 0 image tokens", PromptBuilder, tok, none, m.tokens)
    leak = dataclasses.replace(m.prompt, template_text_only="USER: <image> {prompt} ASSISTANT:")
    _raises(EngineError, r"prompt.template_text_only holds 1 image tokens .* must hold 0", PromptBuilder,
            tok, leak, m.tokens)


def test_literal_braces_in_template(engine):
    m = read_manifest(engine)
    check_template("{{x}} " + TEMPLATE, "template")  # no error
    builder = PromptBuilder(engine / "tokenizer.json",
                            dataclasses.replace(m.prompt, template="{{x}} " + TEMPLATE), m.tokens)
    ids = builder.encode("what {is} this", with_image=True)
    assert builder.tokenizer.decode(ids[:2], skip_special_tokens=False) == "<s> [UNK]"  # "{x}" is one word
    assert ids.count(IMAGE_ID) == m.tokens.image_seq_len
    _raises(EngineError, r"prompt.template must be a string, got int", check_template, 5, "template")


# --- inputs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": 123}, r"prompt must be a string, got int"),
    ({"prompt": "what \ud800 is"}, r"prompt is not valid Unicode text \(surrogates not allowed at character 5"),
    ({"prompt": "what", "image": object()}, r"image must be"),
    ({"input_ids": [[BOS, 5], [6]]}, r"input_ids must be .*, got \[\[1, 5\], \[6\]\] \(list\), not a rectangular"),
    ({"input_ids": [BOS, 5.0]}, r"input_ids must be .* ints, got shape \(2,\) dtype float64"),
    ({"input_ids": [BOS, float("nan")]}, r"input_ids must be .* ints, got shape \(2,\) dtype float64"),
    ({"input_ids": [BOS, 2**70]}, r"input_ids must be .* ints, got shape \(2,\) dtype object"),
    ({"input_ids": np.array([BOS, 2**64 - 1], np.uint64)}, r"input_ids must be in \[0, 16\), got values from 1 "),
    ({"input_ids": np.array([True, False])}, r"input_ids must be .* ints, got shape \(2,\) dtype bool"),
    ({"input_ids": np.broadcast_to(np.int64(5), (10**10,))},  # 80 GB if copied: refused by its length
     r"prompt has 10000000000 tokens; this engine was exported for at most 24"),
    ({"prompt": "what", "pixel_values": [[1.0], [1.0, 2.0]]}, r"pixel_values must be a float array \[1, 3, 8, 8\]"),
    ({"prompt": "what", "pixel_values": np.broadcast_to(np.float32(np.nan), (1, 3, 10**5, 10**5))},
     r"pixel_values must be a float array \[1, 3, 8, 8\], got float32 \[1, 3, 100000, 100000\]"),
    ({"prompt": "what", "pixel_values": np.full((1, 3, 8, 8), np.nan, np.float32)},
     r"pixel_values hold NaN or infinite values \(as float32\)"),
    ({"prompt": "what", "pixel_values": np.full((1, 3, 8, 8), -np.inf, np.float16)}, r"pixel_values hold NaN"),
    ({"prompt": "what", "pixel_values": np.full((1, 3, 8, 8), 1e300)}, r"hold NaN or infinite values \(as float32"),
])
def test_bad_inputs_refused_before_any_graph(pipe, kwargs, message):
    spied, spies = _spied(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning (float64 -> float32 overflow) either
        _raises(InputError, message, spied.generate, **kwargs)
    assert [s.calls for s in spies.values()] == [0, 0, 0]


def _nan_at(name: str, call: int = 1):
    def edit(out, calls):
        if calls == call:
            out = dict(out)
            out[name] = np.full_like(out[name], np.nan)
        return out
    return edit


@pytest.mark.parametrize("stage, name, call, message", [
    ("vision_encoder", "image_features", 1, (r"vision_encoder produced non-finite values \(NaN or inf\) in "
                                             r"image_features from finite inputs; .* --dtype fp32")),
    ("embed_tokens", "inputs_embeds", 1, r"embed_tokens produced non-finite values .* in inputs_embeds"),
    ("decoder", "logits", 1, r"decoder produced non-finite values .* in logits \(prefill\)"),
    ("decoder", "logits", 3, r"decoder produced non-finite values .* in logits \(decode step 2\)"),
])
def test_non_finite_stage_outputs(pipe, stage, name, call, message):
    spied, spies = _spied(pipe, **{stage: _nan_at(name, call)})
    photo = preprocess(SAMPLE, pipe.manifest.preprocess)
    _raises(EngineError, message, spied.generate, "what", pixel_values=photo, max_new_tokens=5, ignore_eos=True)
    if stage == "vision_encoder":
        assert spies["decoder"].calls == 0  # NaN features never reach the decoder (DartPrune)
    if name == "logits":
        assert spies["decoder"].calls == call


def test_load_arguments(engine):
    for threads in (0, -1, True, 1.5, "2"):
        _raises(InputError, r"threads must be None or an integer >= 1, got ", load, engine, threads=threads)
    pipe = load(engine, "cpu", threads=np.int64(1))  # one provider as a string; a numpy thread count
    assert pipe.generate("what", max_new_tokens=2).timings["max_new_tokens"] == 2


def test_stream_callback_error_propagates(pipe):
    class Stop(Exception):
        pass

    def sink(piece):
        raise Stop(piece)

    with pytest.raises(Stop):  # the user's own exception, unchanged (documented in generate)
        pipe.generate("what is this", max_new_tokens=4, stream=sink)


# --- max_new_tokens beyond the context ----------------------------------------------------------------


def test_cap_new_tokens():
    assert cap_new_tokens(30, 20, 40) == 20
    assert cap_new_tokens(20, 20, 40) == 20
    assert cap_new_tokens(5, 20, 40) == 5
    assert cap_new_tokens(0, 20, 40) == 0
    assert cap_new_tokens(10**12, 4, 40) == 36
    assert cap_new_tokens(3, 40, 40) == 0


def test_generate_caps_max_new_tokens(tmp_path, caplog):
    pipe = load(build_engine(tmp_path / "no_eos", eos=None))  # no eos: every step runs
    ids = [BOS, 5, 6, 7] + [5] * 16  # S = 20, max_context 40
    want, _ = reference_generate(ids, None, 0.5, 20, eos=None)
    for asked in (30, 10**12):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="runtime.pipeline"):
            out = pipe.generate(input_ids=ids, max_new_tokens=asked)
        assert out.token_ids == want and out.timings["max_new_tokens"] == 20
        assert [r.getMessage() for r in caplog.records] == [
            (f"generate: max_new_tokens {asked} capped to 20: the prompt's 20 tokens + new tokens must fit this "
             "engine's max_context 40 (re-export with --max-context for longer answers)")]
    caplog.clear()
    out = pipe.generate(input_ids=ids, max_new_tokens=20)  # fits exactly: no warning
    assert out.token_ids == want and out.timings["max_new_tokens"] == 20 and not caplog.records
    _raises(InputError, r"prompt has 30 tokens; this engine was exported for at most 24", pipe.generate,
            input_ids=[5] * 30, max_new_tokens=1)  # a prompt beyond max_seq is still refused


# --- the real llava-tiny export -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_engine):
    return load(tiny_engine[0], verify=False)


def test_tiny_all_nan_pixels(tiny, capfd):
    size = tiny.manifest.preprocess.image_size
    capfd.readouterr()
    _raises(InputError, r"pixel_values hold NaN", tiny.generate, "What is this?",
            pixel_values=np.full((1, 3, size, size), np.nan, np.float32))
    assert capfd.readouterr().err == ""  # no ONNX Runtime log line either: no graph ran


def test_tiny_numpy_scalars_and_cap(tiny):
    kw = {"image": SAMPLE, "ignore_eos": True}
    ref = tiny.generate("What is this?", keep_ratio=0.111, max_new_tokens=5, **kw)
    out = tiny.generate("What is this?", keep_ratio=np.float32(0.111), max_new_tokens=np.int64(5), **kw)
    assert out.token_ids == ref.token_ids and out.kept_positions == ref.kept_positions
    assert len(ref.token_ids) == 5 and len(ref.kept_positions) < ref.timings["prompt_tokens"]  # pruned
    S = ref.timings["prompt_tokens"]
    small = Pipeline(dataclasses.replace(tiny.manifest, max_context=S + 3),
                     {"vision_encoder": tiny.vision, "embed_tokens": tiny.embed, "decoder": tiny.decoder},
                     tiny.prompt)
    capped = small.generate("What is this?", keep_ratio=0.111, max_new_tokens=10**12, **kw)
    assert capped.token_ids == ref.token_ids[:3] and capped.timings["max_new_tokens"] == 3


# --- the command line -----------------------------------------------------------------------------------


def _run_cli(*args: str, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "runtime.run", *args], cwd=REPO, env=env, check=False,
                          capture_output=True, text=True, timeout=120, **popen)


def _cli_error(r, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    _assert_one_line(r.stderr.strip())
    return r.stderr


@pytest.mark.parametrize("args, message", [
    (["--ratio", "-inf"], r"argument --ratio: keep ratio must be in \(0, 1\] .*, got -inf"),
    (["--ratio", "-1"], r"argument --ratio: keep ratio must be in \(0, 1\] .*, got -1.0"),
    (["--ratio=-Infinity"], r"argument --ratio: keep ratio .*, got -inf"),
    (["--ratio", "-nan"], r"argument --ratio: keep ratio .*, got nan"),
    (["--ratio", "abc"], r"argument --ratio: not a number: 'abc'"),
    (["--temperature", "-1e3"], r"argument --temperature: temperature must be a finite number >= 0 .*-1000.0"),
    (["--temperature", "inf"], r"argument --temperature: temperature must be a finite number"),
    (["--top-p", "-.5"], r"argument --top-p: top_p must be in \(0, 1\], got -0.5"),
    (["--max-new-tokens", "-5"], r"argument --max-new-tokens: max_new_tokens must be an integer >= 0, got -5"),
    (["--max-new-tokens", "2.5"], r"argument --max-new-tokens: not an integer: '2.5'"),
    (["--seed", "-1"], r"argument --seed: seed must be an integer in \[0, 2\*\*63 - 1\] .*, got -1"),
    (["--seed", str(2**63)], r"argument --seed: seed must be .*, got 9223372036854775808"),
    (["--threads", "0"], r"argument --threads: threads must be in \[1, 1024\], got 0"),
    (["--threads", "1" * 400], r"argument --threads: threads must be in \[1, 1024\]"),
    (["--provider", "\x1b[31mgpu"], r"argument --provider: invalid choice"),
    (["--bogus\x1b[31m\nx"], r"unrecognized arguments: --bogus x"),
])
def test_cli_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--engine-dir", "x", "--prompt", "hi", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "\x1b" not in err
    assert re.search(message, err), err


def test_cli_subprocess_usage_errors(engine):
    for args in (["--ratio", "-inf"], ["--seed", "-1"], ["--temperature", "-1e3"]):
        err = _cli_error(_run_cli("--engine-dir", str(engine), "--prompt", "hi", *args), 2)
        assert f"argument {args[0]}:" in err and "expected one argument" not in err


def test_cli_runtime_errors(engine, capsys, monkeypatch, caplog):
    base = ["--engine-dir", str(engine), "--prompt", "what"]
    with caplog.at_level(logging.WARNING, logger="runtime.pipeline"):  # whatever other tests left set
        assert main(base + ["--max-new-tokens", str(10**12), "--json"]) == 0  # capped, not refused
    out = capsys.readouterr()
    assert json.loads(out.out)["timings"]["max_new_tokens"] == 36
    lg = logging.getLogger("runtime.pipeline")
    assert "capped to 36" in caplog.text, (lg.disabled, lg.level, lg.propagate, logging.getLogger("runtime").level,
                                          logging.getLogger().handlers)
    assert main(base + ["--prompt", "<image> what"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: the prompt text must not contain '<image>': the template adds the image token "
                   "itself (pass the image separately)\n")

    import runtime.run as cli

    def boom(config):
        raise RuntimeError("boom\nsecond line \x1b[31mred\x1b[0m \x07bell")

    monkeypatch.setattr(cli, "run", boom)
    assert main(base) == 1
    assert capsys.readouterr().err == ("error: unexpected RuntimeError: boom second line red \\x07bell "
                                       "(run with -v for the traceback)\n")
    caplog.clear()
    assert main(base + ["-v"]) == 1  # -v: the traceback (logged; on stderr outside pytest), then the line
    assert "Traceback" in caplog.text and "RuntimeError: boom" in caplog.text
    assert capsys.readouterr().err.endswith("(run with -v for the traceback)\n")

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert main(base) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_cli_broken_pipe(engine):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-m", "runtime.run", "--engine-dir", str(engine), "--prompt", "what",
                          "--max-new-tokens", "8"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # the reader went away (as `| head -c0` would) before the first token is written
    err = p.stderr.read()
    assert p.wait(timeout=120) == 1
    assert err == "error: output closed early (broken pipe)\n"


def test_one_line():
    assert one_line("a\nb\r\n  c\x1b[1;31m red\x1b[0m \x1b \x00 \x9b") == "a b c red \\x1b \\x00 \\x9b"


@pytest.mark.parametrize("value, expected", [("-inf", float("-inf")), ("-Infinity", float("-inf")),
                                             ("-1e3", -1000.0), ("-.5", -0.5), ("-5", -5.0), ("-1_000", -1000.0),
                                             ("-1E-3", -0.001)])
def test_allow_negative_values(value, expected):
    p = allow_negative_values(argparse.ArgumentParser())
    p.add_argument("--x", type=float)
    p.add_argument("-v", action="store_true")
    assert p.parse_args(["--x", value, "-v"]) == argparse.Namespace(x=expected, v=True)
    assert np.isnan(p.parse_args(["--x", "-nan"]).x)
    with pytest.raises(SystemExit):  # a real unknown flag is still one
        p.parse_args(["--x", "1", "-w"])

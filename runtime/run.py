"""Command line: answer one prompt about one image with an exported engine directory.

    python -m runtime.run --engine-dir engines/llava-tiny --image cat.jpg --prompt "What is this?"

Errors end as one line on stderr, without terminal escape codes and without a traceback (unless
-v): exit code 2 for usage errors (bad flags and values, found before the engine loads), 1 for
failures (engine directory, image, prompt too long, ...), 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.cli import (  # noqa: F401  (this module's public names before runtime.cli)
    EXIT_INTERRUPTED,
    EXIT_OK,
    Parser,
    allow_negative_values,
    dataclass_defaults,
    fail,
    one_line,
)
from runtime.errors import EngineError, InputError

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  python -m runtime.run --engine-dir engines/llava-tiny --image cat.jpg --prompt "What is in the picture?"
  python -m runtime.run --engine-dir engines/llava-tiny --image cat.jpg --prompt "Describe it." --ratio 1.0
  python -m runtime.run --engine-dir engines/llava-tiny --image cat.jpg --prompt "Describe it." \
      --show-kept kept.png   # the image with pruned regions dimmed and the image pivots outlined
  python -m runtime.run --engine-dir engines/llava --image cat.jpg --prompt "Describe it." \\
      --temperature 0.7 --top-p 0.9 --seed 0 --provider cuda --json

exit codes: 0 answered; 1 failed (engine directory, image, prompt too long, ...; one line on
stderr, the traceback with -v); 2 usage error (a bad flag or value); 130 interrupted.
"""


@dataclass(frozen=True)
class RunConfig:
    engine_dir: Path
    prompt: str
    image: Path | None = None
    ratio: float | None = None  # None: the engine's default keep ratio
    keep_tokens: int | None = None  # an absolute budget instead of the ratio
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    provider: str = "cpu"
    threads: int | None = None
    json: bool = False
    verbose: bool = False
    show_kept: Path | None = None  # write the kept-token picture here (PNG / JPEG)


MAX_THREADS = 1024  # more intra-op threads than this is a typo; refused before ONNX Runtime builds a pool


def _checked(kind, check: str):
    """An argparse type: text -> int / float -> the API's own check (runtime.sampling.<check>), so the
    CLI and generate() accept the same values and say the same thing; its InputError -> usage error."""

    def parse(text: str):
        from runtime import sampling  # lazy: numpy is not needed for --help

        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        try:
            return getattr(sampling, check)(value)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check  # argparse names the type in some messages
    return parse


def _threads(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= v <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"threads must be in [1, {MAX_THREADS}], got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    d = dataclass_defaults(RunConfig)
    p = Parser(
        prog="python -m runtime.run",
        description="Answer a prompt about an image with a DART-VLM engine directory (no torch needed).",
        epilog=EPILOG,
    )
    io = p.add_argument_group("input")
    io.add_argument("--engine-dir", type=Path, required=True, help="engine directory written by export.build")
    io.add_argument("--image", type=Path, default=d["image"], help="image file (omit for a text-only prompt)")
    io.add_argument("--prompt", required=True, help="the question; the engine's chat template is applied "
                                                    "(a question starting with '-' is written --prompt=-...)")
    gen = p.add_argument_group("generation")
    keep = gen.add_mutually_exclusive_group()
    keep.add_argument("--ratio", type=_checked(float, "check_keep_ratio"), default=d["ratio"],
                      help="DART keep ratio of vision tokens in (0, 1]; default: the engine's (manifest)")
    keep.add_argument("--keep-tokens", type=_checked(int, "check_keep_tokens"), default=d["keep_tokens"],
                      help="keep this many vision tokens instead of a ratio (T = N // pivots; N >= the "
                           "image's vision tokens keeps them all)")
    gen.add_argument("--max-new-tokens", type=_checked(int, "check_max_new_tokens"),
                     default=d["max_new_tokens"],
                     help="stop after this many tokens (or at the end-of-sequence token); capped, with a "
                          "warning, so that prompt + new tokens fit the engine's max_context")
    gen.add_argument("--temperature", type=_checked(float, "check_temperature"), default=d["temperature"],
                     help="finite, >= 0; 0 = greedy")
    gen.add_argument("--top-p", type=_checked(float, "check_top_p"), default=d["top_p"],
                     help="nucleus sampling mass in (0, 1] (with --temperature > 0)")
    gen.add_argument("--seed", type=_checked(int, "check_seed"), default=d["seed"],
                     help="sampling seed, an integer in [0, 2**63 - 1] (negative seeds are refused); same "
                          "seed, same tokens; default: fresh randomness")
    ex = p.add_argument_group("execution")
    ex.add_argument("--provider", choices=("cpu", "cuda", "ort-tensorrt", "tensorrt"), default=d["provider"],
                    help="cpu / cuda / ort-tensorrt: ONNX Runtime execution provider (cuda and ort-tensorrt "
                         "need onnxruntime-gpu); tensorrt: the engines built by python -m export.trt")
    ex.add_argument("--threads", type=_threads, default=d["threads"],
                    help="intra-op threads per stage (default: ONNX Runtime's)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", default=d["json"],
                     help="print one JSON object (token_ids, text, kept_positions, timings, keep_ratio, "
                          "keep_tokens, precision: each stage's weight precision)")
    out.add_argument("--show-kept", type=Path, default=d["show_kept"], metavar="PATH",
                     help="also write the image with the regions of pruned vision tokens dimmed and the image "
                          "pivots outlined, with a caption (ratio, kept/total vision tokens), to PATH (.png or "
                          ".jpg; needs --image)")
    out.add_argument("-v", "--verbose", action="store_true", default=d["verbose"],
                     help="log progress; tracebacks on errors")
    return p


def parse_args(argv: list[str] | None = None) -> RunConfig:
    p = build_parser()
    a = p.parse_args(argv)
    if a.show_kept is not None:
        if a.image is None:
            p.error("--show-kept needs --image (it draws on the input image)")
        from runtime.kept_image import path_problem

        problem = path_problem(a.show_kept)
        if problem:
            p.error(f"--show-kept {a.show_kept}: {problem}")
    return RunConfig(
        engine_dir=a.engine_dir, prompt=a.prompt, image=a.image, ratio=a.ratio, keep_tokens=a.keep_tokens,
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
        provider=a.provider, threads=a.threads, json=a.json, verbose=a.verbose, show_kept=a.show_kept,
    )


def stage_precision(manifest) -> dict[str, str]:
    """{stage: weight precision}: "int4" / "int8" for a quantized stage (python -m export.quantize),
    else the engine's dtype ("float32", "float16"); runtime.manifest.StageSpec.precision."""
    return {name: spec.precision(manifest.dtype) for name, spec in manifest.stages.items()}


def summary(out, precision: dict[str, str] | None = None) -> str:
    """One line: what was kept, how fast, and (given `precision`) each stage's weight precision, e.g.
    kept 102 of 622 prompt tokens (68 of 576 vision tokens) | vision 12.3 ms, prefill 45.6 ms,
    decode 12.1 tok/s | vision_encoder float32, embed_tokens float32, decoder int4 (one line)"""
    t = out.timings
    line = (f"kept {t['kept_tokens']} of {t['prompt_tokens']} prompt tokens ({t['kept_vision_tokens']} of "
            f"{t['vision_tokens']} vision tokens) | vision {t['vision_ms']:.1f} ms, prefill "
            f"{t['prefill_ms']:.1f} ms, decode {t['tokens_per_s']:.1f} tok/s")
    if precision:
        line += " | " + ", ".join(f"{stage} {p}" for stage, p in precision.items())
    return line


def run(config: RunConfig):
    """Load the engine and answer; streams text to stdout unless config.json. Returns the
    GenerateOutput and the stages' weight precision (stage_precision)."""
    import runtime

    pipe = runtime.load(config.engine_dir, providers=[config.provider], threads=config.threads)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    out = pipe.generate(
        config.prompt, image=config.image, keep_ratio=config.ratio, keep_tokens=config.keep_tokens,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, seed=config.seed,
        stream=None if config.json else write,
    )
    if config.show_kept is not None:
        from runtime.kept_image import save

        save(out.kept_image(), config.show_kept)
        log.info("kept-token picture -> %s", config.show_kept)
    return out, stage_precision(pipe.manifest)


def print_result(config: RunConfig, out, precision: dict[str, str] | None = None) -> None:
    if config.json:
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "kept_positions": out.kept_positions,
                          "timings": out.timings, "keep_ratio": out.keep_ratio,
                          "image_pivots": out.image_pivots, "keep_tokens": config.keep_tokens,
                          "precision": precision}))
    else:
        print()
        print(summary(out, precision), file=sys.stderr)
    sys.stdout.flush()  # a closed pipe fails here, inside main's handler, not at interpreter exit


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe too."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (captured, replaced)
        pass


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)  # argparse exits 2 on usage errors
    logging.basicConfig(level=logging.INFO if config.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    try:
        print_result(config, *run(config))
    except (EngineError, InputError) as exc:
        return fail(str(exc) or type(exc).__name__, config.verbose)
    except KeyboardInterrupt:
        return fail("interrupted", config.verbose, EXIT_INTERRUPTED)
    except BrokenPipeError:  # stdout closed early (`| head`)
        _silence_stdout()
        return fail("output closed early (broken pipe)", config.verbose)
    except Exception as exc:  # noqa: BLE001  a bug or a library's own error: still one line, -v shows where
        return fail(f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)", config.verbose)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

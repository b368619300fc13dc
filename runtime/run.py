"""Command line: answer one prompt about one image with an exported engine directory.

    python -m runtime.run --engine-dir engines/llava-tiny --image cat.jpg --prompt "What is this?"
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import EngineError, InputError

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  python -m runtime.run --engine-dir engines/llava-tiny --image cat.jpg --prompt "What is in the picture?"
  python -m runtime.run --engine-dir engines/llava-tiny --image cat.jpg --prompt "Describe it." --ratio 1.0
  python -m runtime.run --engine-dir engines/llava --image cat.jpg --prompt "Describe it." \\
      --temperature 0.7 --top-p 0.9 --seed 0 --provider cuda --json
"""


@dataclass(frozen=True)
class RunConfig:
    engine_dir: Path
    prompt: str
    image: Path | None = None
    ratio: float | None = None  # None: the engine's default keep ratio
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    provider: str = "cpu"
    threads: int | None = None
    json: bool = False
    verbose: bool = False


def _ratio(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if math.isnan(r) or not 0.0 < r <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1.0 keeps every vision token), got {text}")
    return r


def _bounded(kind, low, name: str, strict: bool = False):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if math.isnan(v) or (v <= low if strict else v < low):
            raise argparse.ArgumentTypeError(f"{name} must be {'>' if strict else '>='} {low}, got {text}")
        return v
    return parse


def _top_p(text: str) -> float:
    v = _bounded(float, 0.0, "top-p", strict=True)(text)
    if v > 1.0:
        raise argparse.ArgumentTypeError(f"top-p must be in (0, 1], got {text}")
    return v


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (except None/False, which the help text explains), epilog kept as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m runtime.run",
        description="Answer a prompt about an image with a DART-VLM engine directory (no torch needed).",
        formatter_class=_Formatter,
        epilog=EPILOG,
    )
    io = p.add_argument_group("input")
    io.add_argument("--engine-dir", type=Path, required=True, help="engine directory written by export.build")
    io.add_argument("--image", type=Path, default=None, help="image file (omit for a text-only prompt)")
    io.add_argument("--prompt", required=True, help="the question; the engine's chat template is applied")
    gen = p.add_argument_group("generation")
    gen.add_argument("--ratio", type=_ratio, default=None,
                     help="DART keep ratio of vision tokens in (0, 1]; default: the engine's (manifest)")
    gen.add_argument("--max-new-tokens", type=_bounded(int, 0, "max-new-tokens"), default=64,
                     help="stop after this many tokens (or at the end-of-sequence token)")
    gen.add_argument("--temperature", type=_bounded(float, 0.0, "temperature"), default=0.0,
                     help="0 = greedy")
    gen.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same tokens)")
    ex = p.add_argument_group("execution")
    ex.add_argument("--provider", choices=("cpu", "cuda", "ort-tensorrt", "tensorrt"), default="cpu",
                    help="cpu / cuda / ort-tensorrt: ONNX Runtime execution provider (cuda and ort-tensorrt "
                         "need onnxruntime-gpu); tensorrt: the engines built by python -m export.trt")
    ex.add_argument("--threads", type=_bounded(int, 1, "threads"), default=None,
                    help="intra-op threads per stage (default: ONNX Runtime's)")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object (token_ids, text, kept_positions, timings, keep_ratio)")
    out.add_argument("-v", "--verbose", action="store_true", help="log progress; tracebacks on errors")
    return p


def parse_args(argv: list[str] | None = None) -> RunConfig:
    a = build_parser().parse_args(argv)
    return RunConfig(
        engine_dir=a.engine_dir, prompt=a.prompt, image=a.image, ratio=a.ratio,
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
        provider=a.provider, threads=a.threads, json=a.json, verbose=a.verbose,
    )


def summary(out) -> str:
    """One line: what was kept and how fast, e.g.
    kept 102 of 622 prompt tokens (68 of 576 vision tokens) | vision 12.3 ms, prefill 45.6 ms, decode 12.1 tok/s"""
    t = out.timings
    return (f"kept {t['kept_tokens']} of {t['prompt_tokens']} prompt tokens ({t['kept_vision_tokens']} of "
            f"{t['vision_tokens']} vision tokens) | vision {t['vision_ms']:.1f} ms, prefill "
            f"{t['prefill_ms']:.1f} ms, decode {t['tokens_per_s']:.1f} tok/s")


def run(config: RunConfig):
    """Load the engine and answer; streams text to stdout unless config.json."""
    import runtime

    pipe = runtime.load(config.engine_dir, providers=[config.provider], threads=config.threads)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    return pipe.generate(
        config.prompt, image=config.image, keep_ratio=config.ratio, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, seed=config.seed,
        stream=None if config.json else write,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)  # argparse exits 2 on usage errors
    logging.basicConfig(level=logging.INFO if config.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(message)s")
    try:
        out = run(config)
    except (EngineError, InputError) as exc:
        if config.verbose:
            log.exception("failed")
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if config.json:
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "kept_positions": out.kept_positions,
                          "timings": out.timings, "keep_ratio": out.keep_ratio}))
    else:
        print()
        print(summary(out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

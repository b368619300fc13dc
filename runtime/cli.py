"""What the five command-line tools share (python -m export.build, export.trt, export.check_trt,
runtime.run and scripts/bench.py). Standard library only, so the torch-free runtime and the export
side both use it, and --help stays instant.

The convention:
- exit codes: 0 done; 1 failed (EXIT_FAILURE); 2 usage error (EXIT_USAGE: a bad flag or value, found
  before any work starts); runtime.run exits 130 on Ctrl-C (EXIT_INTERRUPTED), the export tools 1
  with "nothing was written".
- every error is ONE line on stderr, `error: ...`, without terminal escape codes and with other
  control characters shown escaped; the traceback only with -v.
- `Parser`: one-line usage errors that name the --help to read, values such as -inf or -1e3 passed to
  options (the option's own check then says what is wrong), defaults shown in --help.
- defaults come from the tool's config dataclass (`dataclass_defaults`), never repeated as literals.
- `--engine-dir DIR` names the engine directory in every tool that reads one.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import signal
import sys
from pathlib import PurePath

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

# What argparse should read as a value, not as an unknown flag: -5, -.5, -1e3, -inf, -Infinity, -nan.
# argparse's own matcher misses -inf, -Infinity, -nan (r'-\.?\d' in recent 3.12 / 3.13+) and, before
# that (r'^-\d+$|^-\d*\.\d+$'), -1e3 too.
NEGATIVE_VALUE = re.compile(r"^-(?:\.?\d|(?:inf|infinity|nan)$)", re.IGNORECASE)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")  # CSI sequences (colours) and 2-byte escapes
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# --- one-line messages -------------------------------------------------------------------------------


def plain(text: str) -> str:
    """`text` without terminal escape codes (some libraries colour their exception messages)."""
    return _ANSI.sub("", str(text))


def one_line(text: str) -> str:
    """`text` as one line for a terminal: escape codes removed, other control characters (newlines,
    a lone ESC) shown escaped, runs of whitespace collapsed."""
    text = _CONTROL.sub(lambda m: " " if m.group() in "\n\r\t" else f"\\x{ord(m.group()):02x}", plain(text))
    return " ".join(text.split())


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, as one_line; the type name if it has none.
    (Libraries such as torch.onnx put pages of detail after the first line: -v shows them.)"""
    lines = plain(str(exc)).strip().splitlines()
    return one_line(lines[0]) if lines else type(exc).__name__


# --- parsing -------------------------------------------------------------------------------------------


def allow_negative_values(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser` pass tokens that look like negative numbers (-1, -.5, -1e3, -inf, -nan, ...) to
    the option before them, so `--ratio -inf` reaches the option's own check instead of failing with
    argparse's "expected one argument". argparse reads the parser's `_negative_number_matcher` (an
    instance attribute) in _parse_optional on Python 3.10-3.14 (3.10-3.13 tested). As in argparse, it
    stays inactive if the parser has an option that looks like a negative number (-1), and options
    are looked up first: a short option -i or -n would take "-inf" / "-nan" as itself + a value."""
    parser._negative_number_matcher = NEGATIVE_VALUE
    return parser


def dataclass_defaults(cls) -> dict[str, object]:
    """{field: default} of a config dataclass (default_factory called), for a CLI's `default=`."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def show_default(value) -> str:
    """How --help writes a default: sequences comma-separated (as the flag takes them), paths as given."""
    if isinstance(value, (tuple, list)):
        return ",".join(show_default(v) for v in value)
    return str(value) if isinstance(value, (str, PurePath)) else repr(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog kept as written; `(default: X)` after the help of every option that
    takes a value and has a default. Not for None (the help says what happens then), flags (store_true
    and friends) and required options."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS or action.required
                or action.nargs == 0 or "%(default)" in text):
            return text
        return f"{text} (default: {show_default(action.default).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`error: ... (see: PROG --help)`, exit 2), negative numbers
    read as values, and defaults shown in --help (HelpFormatter)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)
        allow_negative_values(self)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {one_line(message)} (see: {self.prog} --help)\n")


# --- failures ------------------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so `finally` / `except BaseException` clean-ups run."""


def handle_sigterm() -> None:
    """Make SIGTERM behave like Ctrl-C (call from a CLI's main(), not from library code)."""

    def raise_terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)


def fail(message: str, verbose: bool = False, code: int = EXIT_FAILURE) -> int:
    """Print `error: MESSAGE` as one line on stderr and return `code`. With `verbose`, the exception
    being handled is logged first, with its traceback (call from an `except` block)."""
    if verbose:
        log.exception("failed")
    print(f"error: {one_line(message)}", file=sys.stderr)
    return code


def report(exc: BaseException, verbose: bool, kind: str | None = None, code: int = EXIT_FAILURE) -> int:
    """Call from a CLI main()'s `except` block. With -v the exception is re-raised (Python prints the
    traceback, exit 1); else prints `error: KIND: first line` and returns `code`. KIND defaults to the
    exception's type name; "" leaves it out. KeyboardInterrupt prints `error: interrupted; nothing was
    written` (SIGTERM: `terminated (SIGTERM); ...`) and returns 1, with or without -v."""
    if verbose and not isinstance(exc, KeyboardInterrupt):
        raise exc
    if isinstance(exc, Terminated):
        return fail("terminated (SIGTERM); nothing was written")
    if isinstance(exc, KeyboardInterrupt):
        return fail("interrupted; nothing was written")
    kind = type(exc).__name__ if kind is None else kind
    return fail(f"{kind}: {first_line(exc)}" if kind else first_line(exc), code=code)

"""What the command-line tools (export.build, export.trt, scripts/bench.py) share: errors a user can
cause end as one line on stderr with exit code 1 (2 for usage errors), the traceback only with -v;
SIGTERM stops an export like Ctrl-C (the staging directory is removed)."""

from __future__ import annotations

import argparse
import re
import signal
import sys

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def plain(text: str) -> str:
    """`text` without terminal escape codes (some libraries colour their exception messages)."""
    return _ANSI.sub("", text)


def one_line(e: BaseException) -> str:
    text = plain(str(e)).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) and values such as -inf, -1e3 or -5 passed to
    the option instead of being read as unknown flags (our own checks then say what is wrong)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from runtime.run import allow_negative_values

        allow_negative_values(self)

    def error(self, message: str):
        self.exit(2, f"error: {plain(message)} (see: {self.prog} --help)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so `finally` / `except BaseException` clean-ups run."""


def handle_sigterm() -> None:
    """Make SIGTERM behave like Ctrl-C (call from a CLI's main(), not from library code)."""

    def raise_terminated(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)


def report(e: BaseException, verbose: bool, kind: str | None = None) -> int:
    """Call from an `except` block: re-raises with -v, else prints `error: KIND: first line` and
    returns 1 (the exit code). KeyboardInterrupt prints `error: interrupted` (SIGTERM: `terminated`)."""
    if verbose and not isinstance(e, KeyboardInterrupt):
        raise e
    if isinstance(e, Terminated):
        print("error: terminated (SIGTERM); nothing was written", file=sys.stderr)
    elif isinstance(e, KeyboardInterrupt):
        print("error: interrupted; nothing was written", file=sys.stderr)
    else:
        print(f"error: {kind or type(e).__name__}: {one_line(e)}", file=sys.stderr)
    return 1

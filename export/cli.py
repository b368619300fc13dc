"""What the command-line tools (export.build, export.trt, scripts/bench.py) share: errors a user can
cause end as one line on stderr with exit code 1, the traceback only with -v."""

from __future__ import annotations

import sys


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def report(e: BaseException, verbose: bool, kind: str | None = None) -> int:
    """Call from an `except` block: re-raises with -v, else prints `error: KIND: first line` and
    returns 1 (the exit code). KeyboardInterrupt prints `error: interrupted`."""
    if verbose and not isinstance(e, KeyboardInterrupt):
        raise e
    if isinstance(e, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
    else:
        print(f"error: {kind or type(e).__name__}: {one_line(e)}", file=sys.stderr)
    return 1

"""The export tools' side of the CLI convention (export.build, export.trt, export.check_trt,
scripts/bench.py): everything lives in runtime/cli.py (standard library only), so the runtime and
the export tools share one implementation. Errors a user can cause end as one line on stderr with
exit code 1 (2 for usage errors), the traceback only with -v; SIGTERM stops an export like Ctrl-C
(the staging directory is removed)."""

from __future__ import annotations

from runtime.cli import (  # noqa: F401  (re-exported)
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    HelpFormatter,
    Parser,
    Terminated,
    dataclass_defaults,
    handle_sigterm,
    plain,
    report,
)
from runtime.cli import first_line as one_line  # noqa: F401  (its name here: exception -> first line)

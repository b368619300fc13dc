"""The two errors a runtime user can meet. Messages are one line: what is wrong, what to do."""

from __future__ import annotations


class EngineError(Exception):
    """The engine directory is missing, corrupt, of an unknown format, or cannot run here."""


class InputError(ValueError):
    """A bad argument to generate() or the CLI: unreadable image, ratio outside (0, 1], prompt too
    long for the engine, neither prompt nor input_ids, ..."""

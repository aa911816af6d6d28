"""Errors that the command line turns into one clear line and an exit code (never a traceback)."""

from __future__ import annotations


class SpectoolError(Exception):
    """A failure the user can act on. ``exit_code`` is 1 for failures and 2 for bad usage."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(SpectoolError):
    """Bad input on the command line (a missing path, an out-of-range option): exit code 2."""

    exit_code = 2

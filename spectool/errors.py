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


def json_problem(exc, *, line: bool = False) -> str:
    """A JSONDecodeError in words: "Expecting ',' delimiter at column 8" (json's own message for some errors ends
    in "at", as in "Invalid control character at", which would read "at at column")."""
    where = f"line {exc.lineno}, column {exc.colno}" if line else f"column {exc.colno}"
    return f"{exc.msg.removesuffix(' at')} at {where}"

"""User-facing errors.

Anything the user can fix (a wrong path, a bad recipe value, a checkpoint we refuse to read)
raises :class:`CompressError`. The CLI prints its message as one line and exits with code 2;
library callers get a normal exception. Bugs stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class CompressError(Exception):
    """A problem with the user's input: one line that names the problem and the fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem} — {fix}")


class NumericsError(CompressError):
    """NaN/Inf in weights or statistics, or a factorisation that failed after every retry."""

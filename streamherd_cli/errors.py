"""What can go wrong in the CLI, each with the exit code a script may rely on.

    CliError                      exit_code
     ├── UsageError               2  a bad flag, an unreadable file, a missing setting
     ├── Refused                  1  the orchestrator answered with an error (its code shown)
     │    └── TooOld              4  the orchestrator lacks this (v1.1) endpoint
     ├── Unreachable              3  no answer: refused connection, DNS, timeout, not JSON
     └── SourceFailed             6  the SQL source failed (connect, no such table, bad query)

``PARTIAL`` (5) is not an error: an import that finished but refused some rows, listed in
its report. Foreign exceptions (httpx, websockets, SQLAlchemy) become these at exactly one
place each (``client.py``, ``live.py``, ``sql.py``); ``app.main`` prints ``str(error)`` as
the single line.
"""

from __future__ import annotations

from typing import Any, Final

OK: Final = 0
REFUSED: Final = 1
USAGE: Final = 2
UNREACHABLE: Final = 3
TOO_OLD: Final = 4
PARTIAL: Final = 5
SOURCE_FAILED: Final = 6
INTERRUPTED: Final = 130


class CliError(Exception):
    exit_code: int = REFUSED


class UsageError(CliError):
    exit_code = USAGE


class Refused(CliError):
    """An error answer: ``code`` is the contract's (``UNAUTHORIZED``, ``NOT_FOUND``...)."""

    exit_code = REFUSED

    def __init__(
        self, code: str, message: str, *, status: int, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code}: {message}" + (f" (HTTP {status})" if status else ""))
        self.code = code
        self.message = message
        self.status = status
        self.details = details or {}


class TooOld(Refused):
    exit_code = TOO_OLD

    def __init__(self, what: str) -> None:
        super().__init__(
            "NOT_SUPPORTED",
            f"the orchestrator is too old for {what} (it needs contract v1.1)",
            status=0,
        )


class Unreachable(CliError):
    exit_code = UNREACHABLE


class SourceFailed(CliError):
    exit_code = SOURCE_FAILED

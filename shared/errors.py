"""Error codes of the contract and the HTTP status each one travels with.

Every error body is ``{"error": {"code", "message", "details"}}`` (see ``ErrorBody``).
"""

from enum import StrEnum


class ErrorCode(StrEnum):
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    VALIDATION_ERROR = "VALIDATION_ERROR"
    STALE_EPOCH = "STALE_EPOCH"
    CONFLICT = "CONFLICT"
    RATE_LIMITED = "RATE_LIMITED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"

    @property
    def status(self) -> int:
        return STATUS_BY_CODE[self]


STATUS_BY_CODE: dict[ErrorCode, int] = {
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.VALIDATION_ERROR: 422,
    ErrorCode.STALE_EPOCH: 409,
    ErrorCode.CONFLICT: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class StaleReason(StrEnum):
    """Why a session is over: ``details.reason`` of every ``409 STALE_EPOCH`` (v1.1), and of
    the ``409 CONFLICT`` that refuses a superseded instance's registration."""

    # The caller's epoch is current, but its lease ran out or an admin declared it lost.
    LEASE_EXPIRED = "lease_expired"
    # The same instance (or a client that sends no instance id) registered again since.
    RE_REGISTERED = "re_registered"
    # Another live instance registered this worker id: stop, and never register again.
    SUPERSEDED = "superseded"

"""Every error the API answers with, and the one place where foreign errors become ours.

    ApiError                     -> {"error": {"code", "message", "details"}}
    ├── Unauthorized             401 UNAUTHORIZED
    ├── Forbidden                403 FORBIDDEN
    ├── NotFound                 404 NOT_FOUND
    ├── ValidationFailed         422 VALIDATION_ERROR
    ├── StaleEpoch               409 STALE_EPOCH
    ├── Conflict                 409 CONFLICT
    ├── RateLimited              429 RATE_LIMITED (+ Retry-After, Connection: close)
    └── Unavailable              503 UNAVAILABLE (+ Retry-After)

Database failures that go away when the database comes back (SQLite busy, PostgreSQL
restarting, any failure to open a connection: ``db.py`` marks those as disconnects) become
``Unavailable`` in ``database_errors()``, the one boundary (as httpx's
``map_httpcore_exceptions``), which ``Database.read``/``write`` and the reaper run inside.
``install_error_handlers`` maps FastAPI's validation errors, Starlette's HTTP errors and
anything that escaped that boundary onto the tree; anything else is a bare 500 INTERNAL
without a traceback in the answer. Every ``Unauthorized`` is charged to its source address
here (``ratelimit``): past the address's burst it is answered as ``RateLimited`` instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.ratelimit import AuthFailureLimiter, retry_after_header
from shared.errors import ErrorCode

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER_S = 1
DATABASE_UNAVAILABLE = "the database is unavailable; retry shortly"


class ApiError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return self.code.status


class Unauthorized(ApiError):
    code = ErrorCode.UNAUTHORIZED

    def __init__(self, message: str = "missing or invalid bearer token") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    code = ErrorCode.FORBIDDEN


class NotFound(ApiError):
    code = ErrorCode.NOT_FOUND


class ValidationFailed(ApiError):
    code = ErrorCode.VALIDATION_ERROR


class StaleEpoch(ApiError):
    code = ErrorCode.STALE_EPOCH


class Conflict(ApiError):
    code = ErrorCode.CONFLICT


class RateLimited(ApiError):
    code = ErrorCode.RATE_LIMITED

    def __init__(self, retry_after_s: float) -> None:
        retry_after = retry_after_header(retry_after_s)
        super().__init__(
            "too many failed authentications from this address; retry later",
            details={"retry_after_s": retry_after},
            # The caller's next attempt is a new connection, which the server refuses
            # before any HTTP while the address is limited (``server.ConnectionGate``).
            headers={"Retry-After": str(retry_after), "Connection": "close"},
        )


class Unavailable(ApiError):
    code = ErrorCode.UNAVAILABLE

    def __init__(self, message: str, *, retry_after: int = DEFAULT_RETRY_AFTER_S) -> None:
        super().__init__(
            message,
            details={"retry_after_s": retry_after},
            headers={"Retry-After": str(retry_after)},
        )


def error_body(
    code: ErrorCode | str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"error": {"code": str(code), "message": message, "details": details or {}}}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(error.code, error.message, jsonable_encoder(error.details)),
        status_code=error.status,
        headers=error.headers,
    )


_DB_TROUBLE = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    ConnectionError,
    OSError,
    TimeoutError,
)


# SQLSTATE classes and codes that mean "the database is not there right now": connection
# exceptions, authorization refused (only ever raised while connecting), shutdown or
# start-up in progress, too many connections or no resources, no schema (yet).
_TROUBLE_SQLSTATE_PREFIXES = ("08", "28", "57P", "53")
_UNDEFINED_TABLE = "42P01"
_ASYNCPG_TROUBLE = {
    "ConnectionDoesNotExistError",
    "CannotConnectNowError",
    "ConnectionFailureError",
    "AdminShutdownError",
    "CrashShutdownError",
    "TooManyConnectionsError",
    "InterfaceError",
    "InternalClientError",
}


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception, what it wraps (``.orig``) and its causes, a few links deep."""
    chain: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(chain) < 8:
        item = todo.pop(0)
        if item is None or item in chain:
            continue
        chain.append(item)
        orig = getattr(item, "orig", None)
        todo.extend(
            [orig if isinstance(orig, BaseException) else None, item.__cause__, item.__context__]
        )
    return chain


def is_database_trouble(exc: BaseException) -> bool:
    """True for failures that go away when the database comes back: answer 503, not 500."""
    for item in _causes(exc):
        if isinstance(item, sa_exc.DBAPIError) and item.connection_invalidated:
            return True
        if isinstance(item, _DB_TROUBLE):
            return True
        state = getattr(item, "sqlstate", None) or getattr(item, "pgcode", None)
        if state and (
            str(state).startswith(_TROUBLE_SQLSTATE_PREFIXES) or state == _UNDEFINED_TABLE
        ):
            return True
        module = type(item).__module__ or ""
        if "no such table" in str(item) and module.startswith(("sqlite3", "sqlalchemy")):
            return True
        if module.startswith("asyncpg") and type(item).__name__ in _ASYNCPG_TROUBLE:
            return True
    return False


def is_missing_table(exc: BaseException) -> bool:
    """True when a statement failed because its table does not exist (no schema yet)."""
    for item in _causes(exc):
        state = getattr(item, "sqlstate", None) or getattr(item, "pgcode", None)
        module = type(item).__module__ or ""
        if state == _UNDEFINED_TABLE or (
            "no such table" in str(item) and module.startswith(("sqlite3", "sqlalchemy"))
        ):
            return True
    return False


def _is_outage(exc: BaseException) -> bool:
    # SQLite's busy error outlasting ``busy_timeout`` says "locked", whatever its class.
    return is_database_trouble(exc) or "database is locked" in str(exc)


@contextmanager
def database_errors() -> Iterator[None]:
    """Turn a database that is away into ``Unavailable`` (503 + Retry-After), from here only.

    Anything else (an ``ApiError`` raised inside, a constraint broken by a bug) passes
    through unchanged.
    """
    try:
        yield
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        if isinstance(exc, OSError) or _is_outage(exc):
            raise Unavailable(DATABASE_UNAVAILABLE) from exc
        raise


def as_api_error(exc: BaseException) -> ApiError | None:
    """The API error ``exc`` answers as, or None for a bug (500)."""
    if isinstance(exc, ApiError):
        return exc
    if _is_outage(exc):
        return Unavailable(DATABASE_UNAVAILABLE)
    return None


def _validation_details(exc: RequestValidationError) -> dict[str, Any]:
    problems = []
    for err in exc.errors()[:50]:
        problems.append(
            {
                "loc": [str(part) for part in err.get("loc", ())],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return {"errors": problems}


def request_address(request: Request, limiter: AuthFailureLimiter) -> str:
    """The source address a failed authentication is charged to."""
    peer = request.client.host if request.client is not None else None
    forwarded = request.headers.get("x-forwarded-for") if limiter.trusted_proxies else None
    return limiter.address(peer, forwarded)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if isinstance(exc, Unauthorized):
            limiter: AuthFailureLimiter | None = getattr(request.app.state, "auth_limiter", None)
            if limiter is not None and limiter.enabled:
                wait = limiter.charge(request_address(request, limiter))
                if wait is not None:
                    request.app.state.metrics.auth_rate_limited.inc()
                    return error_response(RateLimited(wait))
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(
            ValidationFailed(
                "the request does not match the contract", details=_validation_details(exc)
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {
            401: ErrorCode.UNAUTHORIZED,
            403: ErrorCode.FORBIDDEN,
            404: ErrorCode.NOT_FOUND,
            # The contract knows no 405: a method a path does not take is "no such endpoint".
            405: ErrorCode.NOT_FOUND,
            409: ErrorCode.CONFLICT,
            429: ErrorCode.RATE_LIMITED,
            503: ErrorCode.UNAVAILABLE,
        }
        code = codes.get(
            exc.status_code,
            ErrorCode.VALIDATION_ERROR if exc.status_code < 500 else ErrorCode.INTERNAL,
        )
        message = "no such endpoint" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(
            error_body(code, message),
            status_code=code.status,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        mapped = as_api_error(exc)
        if mapped is not None:
            log.warning(
                "orchestrator.database_unavailable",
                extra={"error": type(exc).__name__, "path": request.url.path},
            )
            return error_response(mapped)
        if isinstance(exc, RecursionError):
            return error_response(ValidationFailed("the request body is nested too deeply"))
        log.exception("orchestrator.internal_error", extra={"path": request.url.path})
        return JSONResponse(error_body(ErrorCode.INTERNAL, "internal error"), status_code=500)


@contextlib.contextmanager
def stream_id_conflicts() -> Iterator[None]:
    """Creating streams: a taken id, or an id sequence run out, is 409, not a 500."""
    try:
        yield
    except sa_exc.IntegrityError as exc:
        raise Conflict("a stream with one of these ids already exists") from exc
    except sa_exc.DBAPIError as exc:
        # The id sequence ran out (an explicit id at the top of the range). The drivers
        # say so only in the message (PostgreSQL: "reached maximum value of sequence").
        text = str(exc).lower()
        if "sequence" in text or "overflow" in text:
            raise Conflict("no stream ids are left above the largest existing id") from exc
        raise

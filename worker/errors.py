"""What can go wrong when a worker talks to the orchestrator, as one exception tree.

    OrchestratorError                  anything the client could not get done
    ├── OrchestratorUnavailable        the orchestrator did not answer usefully: retried,
    │   │                              counts against the breaker, leads to local mode
    │   ├── ConnectFailed              connection refused, reset, DNS, TLS handshake
    │   ├── RequestTimedOut            connect/read/write/pool timeout
    │   │   └── ConnectTimedOut        no connection within the timeout (nobody there)
    │   ├── ServerError                5xx (503 may carry Retry-After)
    │   ├── RateLimited                429 (carries Retry-After)
    │   └── CircuitOpenError           the breaker refuses calls: fail fast, never retried
    ├── RequestRejected                a 4xx for our own request: not retried, neutral for
    │   │                              the breaker (carries status, code, message, details)
    │   ├── StaleEpochError            409 STALE_EPOCH: register again, presenting what we hold
    │   └── Superseded                 409 STALE_EPOCH or CONFLICT, reason "superseded":
    │                                  another process registered our worker id; stop for good
    ├── InvalidAnswer                  a 2xx whose body does not match the contract
    └── ClientClosed                   the client was closed (shutdown) before the call

httpx's own errors become these in exactly one place, ``worker.transport``
(``raise ... from exc``); nothing outside ``worker/transport.py`` sees an httpx exception.
"""

from __future__ import annotations

from typing import Any


class OrchestratorError(Exception):
    """Base of every error the worker client raises."""


class OrchestratorUnavailable(OrchestratorError):
    """The orchestrator could not be reached or could not serve the call right now."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        # Seconds the orchestrator asked us to wait (Retry-After), already parsed.
        self.retry_after = retry_after


class ConnectFailed(OrchestratorUnavailable):
    pass


class RequestTimedOut(OrchestratorUnavailable):
    pass


class ConnectTimedOut(RequestTimedOut):
    """Not even a connection within the timeout: like ``ConnectFailed``, nobody there."""


class ServerError(OrchestratorUnavailable):
    pass


class RateLimited(OrchestratorUnavailable):
    pass


class CircuitOpenError(OrchestratorUnavailable):
    """The breaker is open: the call was not even attempted.

    ``retry_after`` is the time until the breaker lets a probe through, or ``None`` when an
    operator forced it open (no time is known).
    """


class RequestRejected(OrchestratorError):
    """The orchestrator refused this request (4xx): our request, not the orchestrator, is wrong."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or {}


class StaleEpochError(RequestRejected):
    """Our epoch or session is over (lease lost, or we registered again elsewhere)."""


class InvalidAnswer(OrchestratorError):
    """A success status whose body is not what the contract promises."""


class ClientClosed(OrchestratorError):
    """The client was closed; no more calls go out."""


class Superseded(RequestRejected):
    """Another live process registered our worker id and the orchestrator fenced us
    (``details.reason`` "superseded"): stop every stream and never register again."""

    @property
    def instance(self) -> str | None:
        """The instance that took the worker id over, if the orchestrator said."""
        value = self.details.get("instance")
        return value if isinstance(value, str) else None

    @property
    def address(self) -> str | None:
        """Where that instance registered from (host:port), if the orchestrator said."""
        value = self.details.get("address")
        return value if isinstance(value, str) else None

    def line(self, worker_id: str) -> str:
        """The one line a superseded worker process exits with."""
        return (
            f"worker {worker_id} superseded by another process"
            f" (instance {self.instance or 'unknown'}) registered from"
            f" {self.address or 'an unknown address'}; exiting: two hosts share WORKER_ID"
        )

"""The orchestrator's settings: one pydantic-settings class, ``ORCH_*`` variables and flags.

Validators refuse configurations that make no sense, so a bad deployment stops at start
with one line naming the setting instead of failing later under load.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.limits import DEFAULT_MAX_BODY_BYTES

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./streamherd.db"
SUPPORTED_SCHEMES = ("sqlite+aiosqlite", "postgresql+asyncpg")
# A client may fail to authenticate this many times in a burst, then this many per second.
DEFAULT_AUTH_FAIL_BURST = 100
DEFAULT_AUTH_FAIL_PER_S = 10.0


# A hand-off times out after this many heartbeat intervals unless configured
# (capped by the lease TTL): enough for the new owner's first beat and its confirming one.
DEFAULT_HANDOFF_INTERVALS = 2.0
# While a hand-off waits on a worker it is asked to beat this many times an interval: a
# quarter interval measured overlaps of up to 1.6 beats on a loaded machine (bench 7).
HANDOFF_POLLS_PER_INTERVAL = 8


class PlannedMoves(StrEnum):
    """How a planned move (balancing, a drain, a rule change) hands a stream over."""

    # The new owner gets it first; the previous one stops once the new one runs it.
    MAKE_BEFORE_BREAK = "make_before_break"
    # The owner is told to stop; the stream goes to the new owner once handed back.
    REVOKE_FIRST = "revoke_first"


# Tokens shorter than this are accepted but warned about at start (guessable).
WEAK_TOKEN_LEN = 16
DEFAULT_TLS_RELOAD_INTERVAL_S = 5.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCH_", extra="ignore", frozen=True)

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    admin_token: SecretStr | None = None
    worker_token: SecretStr | None = None
    # Rotation: the value being replaced, still accepted until it is dropped.
    admin_token_previous: SecretStr | None = None
    worker_token_previous: SecretStr | None = None
    # Register only with a per-worker token (or the admin token): the cluster token is refused.
    worker_credentials_only: bool = False
    # Failed authentications per source address: a token bucket (0 burst: no limit).
    auth_fail_burst: int = Field(default=DEFAULT_AUTH_FAIL_BURST, ge=0)
    auth_fail_per_s: float = Field(default=DEFAULT_AUTH_FAIL_PER_S, gt=0)
    # An address that keeps connecting while refused 429 is dropped in the kernel (a
    # socket filter on the listener, Linux) for its Retry-After; elsewhere: ignored.
    auth_fail_kernel_drop: bool = True
    # Proxies whose X-Forwarded-For names the client: addresses or networks, comma-separated.
    trusted_proxies: str = ""
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    lease_ttl_s: float = Field(default=15.0, gt=0)
    reaper_interval_s: float = Field(default=1.0, gt=0)
    quarantine_after: int = Field(default=5, ge=1)
    quarantine_window_s: float = Field(default=600.0, gt=0)
    auto_migrate: bool = True
    events_heartbeat_s: float = Field(default=10.0, gt=0)
    # Most streams a rebalance pass moves, so a join never causes a storm of handovers.
    max_moves_per_pass: int = Field(default=100, ge=1)
    # With make-before-break hand-offs a move costs no gap, so the cap follows how many
    # workers are starting streams: up to this many moves to each worker below its target
    # per pass (never fewer than max_moves_per_pass in all). revoke_first keeps the cap.
    max_moves_per_receiver: int = Field(default=25, ge=1)
    # A reaper pass balances only when an event was written since the last one that did
    # (reaper.Reaper._pass); every this many passes a drift check plans a balance in a
    # read session and, if it finds work, makes the next pass balance (_check_drift).
    reaper_full_balance_every: int = Field(default=30, ge=1)
    # How long a revoked stream may stay with its owner before it is moved regardless.
    revoke_timeout_s: float | None = Field(default=None, gt=0)
    planned_moves: PlannedMoves = PlannedMoves.MAKE_BEFORE_BREAK
    # How long the previous owner of a handed-off stream may run it before it is told to
    # stop whether or not the new owner reported it running (None: see the property).
    handoff_timeout_s: float | None = Field(default=None, gt=0)
    idempotency_ttl_s: float = Field(default=900.0, ge=600)
    events_retention: int = Field(default=100_000, ge=1000)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    db_pool_size: int = Field(default=10, ge=1)
    # SQLite's writer: statements on the event loop's thread ("inline", orchestrator/
    # sqlite_inline.py) or through aiosqlite's thread ("thread", as before).
    sqlite_writes: Literal["inline", "thread"] = "inline"
    # How long start-up waits for a database that does not answer yet (0: not at all).
    db_startup_timeout_s: float = Field(default=0.0, ge=0)
    log_level: str = "INFO"
    log_json: bool = False
    replica_id: str | None = None
    # --- TLS served by the orchestrator itself (orchestrator/tls.py; docs/operations.md) --
    # PEM certificate (chain) and its key; both or neither.
    tls_cert: str | None = None
    tls_key: str | None = None
    # PEM CA bundle: with it, every connection must present a client certificate it issued.
    tls_client_ca: str | None = None
    # A register must come with a certificate naming its worker_id; unset: on with a client CA.
    tls_bind_worker_id: bool | None = None
    # How often the files are checked for a new certificate (0: only on SIGHUP).
    tls_reload_interval_s: float = Field(default=DEFAULT_TLS_RELOAD_INTERVAL_S, ge=0)

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0]
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(
                f"unsupported scheme {scheme!r}; use one of {', '.join(SUPPORTED_SCHEMES)}"
            )
        if scheme.startswith("sqlite"):
            path = value.split(":///", 1)[1] if ":///" in value else ""
            if not path or path.startswith(":memory:") or path.startswith("file::memory"):
                raise ValueError("needs a SQLite file path (an in-memory database is not shared)")
            parent = Path(path.split("?", 1)[0]).expanduser().parent
            if not parent.is_dir():
                raise ValueError(f"the directory {str(parent)!r} of the SQLite file does not exist")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value.upper()

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for item in filter(None, (part.strip() for part in value.split(","))):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    @field_validator("admin_token", "worker_token", "admin_token_previous", "worker_token_previous")
    @classmethod
    def _usable_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value() == "":
            return None
        if value is not None and not value.get_secret_value().isprintable():
            raise ValueError("must be printable characters (it is sent as a Bearer token)")
        if value is not None and any(c.isspace() for c in value.get_secret_value()):
            raise ValueError("must not contain whitespace (it is sent as a Bearer token)")
        return value

    @field_validator("tls_cert", "tls_key", "tls_client_ca")
    @classmethod
    def _readable_file(cls, value: str | None) -> str | None:
        if not value:
            return None
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"no such file: {value}")
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {value}: {exc.strerror or exc}") from None
        return str(path)

    @property
    def weak_tokens(self) -> list[str]:
        """The token settings shorter than ``WEAK_TOKEN_LEN``: warned about at start.

        Not refused: the contract sets no minimum, and a test cluster may use short ones.
        """
        tokens = {
            "ORCH_ADMIN_TOKEN": self.admin_token,
            "ORCH_WORKER_TOKEN": self.worker_token,
            "ORCH_ADMIN_TOKEN_PREVIOUS": self.admin_token_previous,
            "ORCH_WORKER_TOKEN_PREVIOUS": self.worker_token_previous,
        }
        return [
            name
            for name, token in tokens.items()
            if token is not None and len(token.get_secret_value()) < WEAK_TOKEN_LEN
        ]

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.heartbeat_interval_s >= self.lease_ttl_s:
            raise ValueError(
                "ORCH_HEARTBEAT_INTERVAL_S must be below ORCH_LEASE_TTL_S "
                f"({self.heartbeat_interval_s} >= {self.lease_ttl_s})"
            )
        self._coherent_tls()
        if self.handoff_timeout_s is not None and self.handoff_timeout_s > self.lease_ttl_s:
            raise ValueError(
                "ORCH_HANDOFF_TIMEOUT_S must be at most ORCH_LEASE_TTL_S "
                f"({self.handoff_timeout_s} > {self.lease_ttl_s}): a hand-off's overlap is "
                "bounded by a lease"
            )
        # A previous value alone would leave the current one open to anyone.
        if self.admin_token_previous is not None and self.admin_token is None:
            raise ValueError("ORCH_ADMIN_TOKEN_PREVIOUS needs ORCH_ADMIN_TOKEN (the new value)")
        if self.worker_token_previous is not None and self.worker_token is None:
            raise ValueError("ORCH_WORKER_TOKEN_PREVIOUS needs ORCH_WORKER_TOKEN (the new value)")
        if not self.is_loopback_host and not (self.admin_token and self.worker_token):
            raise ValueError(
                f"ORCH_HOST={self.host} is not a loopback address: set ORCH_ADMIN_TOKEN and "
                "ORCH_WORKER_TOKEN before serving beyond this machine"
            )
        return self

    def _coherent_tls(self) -> None:
        if self.tls_cert and not self.tls_key:
            raise ValueError("ORCH_TLS_CERT needs ORCH_TLS_KEY (the certificate's private key)")
        if self.tls_key and not self.tls_cert:
            raise ValueError("ORCH_TLS_KEY needs ORCH_TLS_CERT")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(
                "ORCH_TLS_CLIENT_CA needs ORCH_TLS_CERT and ORCH_TLS_KEY (mutual TLS is TLS)"
            )
        if self.tls_bind_worker_id and not self.tls_client_ca:
            raise ValueError(
                "ORCH_TLS_BIND_WORKER_ID needs ORCH_TLS_CLIENT_CA (no client certificates "
                "to bind to)"
            )

    @property
    def serves_tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def tls_binds_worker_id(self) -> bool:
        """A register must come with a client certificate naming its worker_id."""
        if self.tls_bind_worker_id is not None:
            return self.tls_bind_worker_id
        return self.tls_client_ca is not None

    @property
    def is_loopback_host(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        parts = (part.strip() for part in self.trusted_proxies.split(","))
        return tuple(ipaddress.ip_network(p, strict=False) for p in parts if p)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def lease_flush_interval_s(self) -> float:
        """How often buffered heartbeats are written: a small slice of the lease's slack."""
        return min(0.25, max(0.01, (self.lease_ttl_s - self.heartbeat_interval_s) / 4))

    @property
    def leader_ttl_s(self) -> float:
        """How long a replica's claim to run the reaper lasts without renewal."""
        return 2 * self.reaper_interval_s

    @property
    def outage_gap_s(self) -> float:
        """A reaper silence longer than this means no replica was watching (an outage).

        Longer than a leader handover (a replica dying is not an outage), short enough that
        any real outage gives every worker a fresh lease when the orchestrator returns.
        """
        natural = self.leader_ttl_s + 2 * self.reaper_interval_s + 0.5
        # Never longer than the lease's slack: a silence long enough to expire a healthy
        # worker's lease must count as an outage, or that worker would be blamed for it.
        slack = self.lease_ttl_s - self.heartbeat_interval_s - self.lease_flush_interval_s
        return max(min(natural, slack), 1.5 * self.reaper_interval_s)

    @property
    def stall_gap_s(self) -> float:
        """A silence this long in this replica's own reaper loop is an outage.

        This replica was frozen (SIGSTOP, a paused VM, a starved event loop) or cut off from
        its database, and nobody could renew a lease meanwhile. Measured from the loop's
        last turn that reached the database, so a pass that is merely slow (a large fleet)
        is never mistaken for one.
        """
        return min(max(2 * self.reaper_interval_s, 0.5), self.outage_gap_s)

    @property
    def effective_revoke_timeout_s(self) -> float:
        return self.revoke_timeout_s if self.revoke_timeout_s is not None else self.lease_ttl_s

    @property
    def make_before_break(self) -> bool:
        return self.planned_moves == PlannedMoves.MAKE_BEFORE_BREAK

    @property
    def effective_handoff_timeout_s(self) -> float:
        """How long a hand-off waits for the new owner before the old one is told to stop."""
        if self.handoff_timeout_s is not None:
            return self.handoff_timeout_s
        return min(DEFAULT_HANDOFF_INTERVALS * self.heartbeat_interval_s, self.lease_ttl_s)

    @property
    def handoff_poll_s(self) -> float:
        """How soon both workers of a pending hand-off are asked to beat again (a hint):
        the new owner to report the stream running, the previous one to hear it may stop.
        The overlap is about two of these (plus the worker's spread of each), well inside
        one heartbeat interval; the extra beats last only as long as the hand-off."""
        return self.heartbeat_interval_s / HANDOFF_POLLS_PER_INTERVAL

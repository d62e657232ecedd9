"""The worker's settings: one pydantic-settings class, ``WORKER_*`` variables and ``--flags``.

Validators refuse nonsense at start, and ``load_settings`` turns any refusal into one
line naming the setting (``invalid setting WORKER_MAX_STREAMS: ...``), never a traceback.

Defaults worth knowing:
- ``WORKER_ID``: the host name, with anything outside ``[A-Za-z0-9._-]`` replaced by
  ``-`` and cut to 63 characters, so one worker per host needs no configuration.
- ``WORKER_STATE_DIR``: ``./state`` under the working directory; the client names its file
  after the worker (``worker-<id>.json``), so workers started from one directory never
  share a state file.
- ``WORKER_HEALTH_HOST``: ``127.0.0.1``, like the orchestrator's own default: nothing is
  served beyond the machine unless asked. Set ``0.0.0.0`` for probes from elsewhere
  (a Kubernetes kubelet, a Prometheus on another host); the server only reads.

Flags are the settings' names in kebab case (``--max-streams``, ``--health-port``; the
worker id is ``--id`` or ``--worker-id``). A flag beats the environment. We map flags with
argparse rather than pydantic-settings' CLI source: its help output and its handling of
negative numbers (``--max-streams -1``) are ours to control, and an unknown flag becomes the
same one-line error as any other setting.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Self

from pydantic import (
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared import cli
from shared.cli import CommandLineError, settings_parser
from shared.limits import MAX_CAPACITY, WORKER_ID_PATTERN, WORKER_ID_RE
from shared.models import Labels, web_url
from worker import breaker, retry
from worker.breaker import BreakerConfig
from worker.processors import ProcessorSpecError, parse_processor_spec, resolve_callable
from worker.retry import DEFAULT_REQUEST_TIMEOUT_S, RetryPolicy
from worker.runtime import (
    DEFAULT_LOCAL_GIVE_UP_AFTER,
    DEFAULT_RESTART_BASE_S,
    DEFAULT_RESTART_MAX_S,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
)

ENV_PREFIX = "WORKER_"
PROG = "streamherd-worker"
DEFAULT_ORCHESTRATOR_URL = "http://127.0.0.1:8000"
DEFAULT_STATE_DIR = Path("state")
DEFAULT_HEALTH_HOST = "127.0.0.1"
DEFAULT_HEALTH_PORT = 8081
DEFAULT_MAX_STREAMS = 10
FALLBACK_WORKER_ID = "worker"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_LABELS = TypeAdapter(Labels)


# A setting that makes no sense; ``str()`` is the one line printed at start.
ConfigError = CommandLineError


def default_worker_id(hostname: str | None = None) -> str:
    """The host name bent into the worker-id pattern (dots survive, anything else becomes -)."""
    raw = socket.gethostname() if hostname is None else hostname
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", raw).lstrip("._-")[:63]
    return cleaned or FALLBACK_WORKER_ID


def parse_labels(value: object) -> dict[str, str]:
    """``{"zone": "eu"}`` as JSON, or ``zone=eu,tier=gold``; empty means no labels."""
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if not isinstance(value, str):
        raise ValueError("expected a JSON object or k=v,k=v")
    text = value.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc.msg}") from None
        if not isinstance(decoded, dict) or not all(isinstance(v, str) for v in decoded.values()):
            raise ValueError("expected a JSON object of strings")
        return decoded
    labels: dict[str, str] = {}
    for pair in text.split(","):
        key, sep, val = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected k=v, got {pair.strip()!r}")
        labels[key.strip()] = val.strip()
    return labels


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """What one ``ResilientWorkerClient`` needs: who it is, where the orchestrator is, and
    how it calls it (``breaker`` and ``retry`` hold their own defaults, written once)."""

    orchestrator_url: str
    worker_id: str
    capacity: int
    # The cluster worker token, only sent to register; never printed.
    token: str | None = field(default=None, repr=False)
    state_dir: str | Path | None = None
    labels: dict[str, str] = field(default_factory=dict)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    # Attempts and delays of an ordinary call; ``retry.default_policies`` scales the policy
    # of each operation (deadlines, heartbeat bounds) from it.
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    # The client keeps its own lease alive while an event loop runs (``worker.keepalive``);
    # off for an owner that beats on schedule itself (the worker runtime).
    keepalive: bool = True

    def __post_init__(self) -> None:
        # BreakerConfig and RetryPolicy refuse their own nonsense when they are built.
        if not WORKER_ID_RE.match(self.worker_id):
            raise ValueError(f"worker_id must match {WORKER_ID_PATTERN}")
        if not 0 <= self.capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be within 0..{MAX_CAPACITY}")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if self.client_key and not self.client_cert:
            raise ValueError("client_key needs client_cert")


def _existing_file(value: str | None) -> str | None:
    if value is not None and not Path(value).is_file():
        raise ValueError(f"no such file: {value}")
    if value is not None:
        try:
            with open(value, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {value}: {exc.strerror or exc}") from None
    return value


def _ssl_reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _usable_tls_files(ca_file: str | None, cert: str | None, key: str | None) -> None:
    """Load the files as the client will, so a bad PEM is one line at start, not a
    traceback on the first call."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"WORKER_CA_FILE={ca_file} is not a usable CA bundle: {_ssl_reason(exc)}"
            ) from None
    if cert:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            pair = f"WORKER_CLIENT_CERT={cert}" + (f" with WORKER_CLIENT_KEY={key}" if key else "")
            raise ValueError(
                f"{pair} is not a usable certificate and matching key: {_ssl_reason(exc)}"
            ) from None


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    orchestrator_url: str = DEFAULT_ORCHESTRATOR_URL
    id: str = Field(default_factory=default_worker_id, pattern=WORKER_ID_PATTERN)
    max_streams: int = Field(default=DEFAULT_MAX_STREAMS, ge=0, le=MAX_CAPACITY)
    # The cluster worker token: only sent to register. SecretStr keeps it out of reprs.
    token: SecretStr | None = None
    state_dir: Path | None = None
    health_host: str = DEFAULT_HEALTH_HOST
    health_port: int = Field(default=DEFAULT_HEALTH_PORT, ge=0, le=65535)
    # Where others reach the health endpoint (sent at register, linked by the dashboard);
    # unset: derived from health_host/health_port, nothing on loopback (worker.advertise).
    health_advertise_url: str | None = None
    processor: str = "demo"
    labels: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    log_level: str = "INFO"
    log_json: bool = False
    shutdown_timeout_s: float = Field(default=DEFAULT_SHUTDOWN_TIMEOUT_S, gt=0)
    processor_restart_base_s: float = Field(default=DEFAULT_RESTART_BASE_S, gt=0)
    processor_restart_max_s: float = Field(default=DEFAULT_RESTART_MAX_S, gt=0)
    # Failures in a row after which a worker in local mode gives a stream up itself.
    local_give_up_after: int = Field(default=DEFAULT_LOCAL_GIVE_UP_AFTER, ge=1)
    circuit_failure_threshold: int = Field(default=breaker.DEFAULT_FAILURE_THRESHOLD, ge=1)
    circuit_recovery_timeout_s: float = Field(default=breaker.DEFAULT_RECOVERY_TIMEOUT_S, gt=0)
    circuit_success_threshold: int = Field(default=breaker.DEFAULT_SUCCESS_THRESHOLD, ge=1)
    circuit_half_open_max_calls: int = Field(default=breaker.DEFAULT_HALF_OPEN_MAX_CALLS, ge=1)
    circuit_max_recovery_timeout_s: float = Field(
        default=breaker.DEFAULT_MAX_RECOVERY_TIMEOUT_S, gt=0
    )
    retry_max_attempts: int = Field(default=retry.DEFAULT_MAX_ATTEMPTS, ge=1)
    retry_base_delay_s: float = Field(default=retry.DEFAULT_BASE_DELAY_S, ge=0)
    retry_max_delay_s: float = Field(default=retry.DEFAULT_MAX_DELAY_S, ge=0)
    request_timeout_s: float = Field(default=DEFAULT_REQUEST_TIMEOUT_S, gt=0)
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    @field_validator("orchestrator_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("health_advertise_url")
    @classmethod
    def _web_url(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        return web_url(value) if value else None

    @field_validator("processor")
    @classmethod
    def _known_processor(cls, value: str) -> str:
        try:
            spec = parse_processor_spec(value)
            if spec.kind == "module":
                resolve_callable(spec.argument)
        except ProcessorSpecError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: object) -> dict[str, str]:
        try:
            return _LABELS.validate_python(parse_labels(value))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{where}: {first['msg']}" if where else first["msg"]) from None

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.upper()

    @field_validator("token")
    @classmethod
    def _empty_token_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is not None and not value.get_secret_value() else value

    @field_validator("ca_file", "client_cert", "client_key")
    @classmethod
    def _file_exists(cls, value: str | None) -> str | None:
        return _existing_file(value or None)

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.processor_restart_max_s < self.processor_restart_base_s:
            raise ValueError(
                "WORKER_PROCESSOR_RESTART_MAX_S must be at least WORKER_PROCESSOR_RESTART_BASE_S "
                f"({self.processor_restart_max_s} < {self.processor_restart_base_s})"
            )
        if self.retry_max_delay_s < self.retry_base_delay_s:
            raise ValueError(
                "WORKER_RETRY_MAX_DELAY_S must be at least WORKER_RETRY_BASE_DELAY_S "
                f"({self.retry_max_delay_s} < {self.retry_base_delay_s})"
            )
        if self.circuit_max_recovery_timeout_s < self.circuit_recovery_timeout_s:
            raise ValueError(
                "WORKER_CIRCUIT_MAX_RECOVERY_TIMEOUT_S must be at least "
                "WORKER_CIRCUIT_RECOVERY_TIMEOUT_S "
                f"({self.circuit_max_recovery_timeout_s} < {self.circuit_recovery_timeout_s})"
            )
        if self.client_key and not self.client_cert:
            raise ValueError("WORKER_CLIENT_KEY needs WORKER_CLIENT_CERT")
        _usable_tls_files(self.ca_file, self.client_cert, self.client_key)
        return self

    @property
    def worker_id(self) -> str:
        return self.id

    @property
    def effective_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else DEFAULT_STATE_DIR

    def client_config(self) -> ClientConfig:
        return ClientConfig(
            orchestrator_url=self.orchestrator_url,
            worker_id=self.id,
            capacity=self.max_streams,
            token=self.token.get_secret_value() if self.token else None,
            state_dir=self.effective_state_dir,
            labels=dict(self.labels),
            breaker=BreakerConfig(
                failure_threshold=self.circuit_failure_threshold,
                recovery_timeout=self.circuit_recovery_timeout_s,
                success_threshold=self.circuit_success_threshold,
                half_open_max_calls=self.circuit_half_open_max_calls,
                max_recovery_timeout=self.circuit_max_recovery_timeout_s,
            ),
            retry=RetryPolicy(
                max_attempts=self.retry_max_attempts,
                base_delay=self.retry_base_delay_s,
                max_delay=self.retry_max_delay_s,
            ),
            request_timeout=self.request_timeout_s,
            ca_file=self.ca_file,
            client_cert=self.client_cert,
            client_key=self.client_key,
            # The runtime's loop beats at the orchestrator's interval: no second beater.
            keepalive=False,
        )


# --- the command line ---------------------------------------------------------------

_EXTRA_FLAGS: dict[str, tuple[str, ...]] = {"id": ("--worker-id",)}
_HELP_DEFAULTS: dict[str, object] = {
    "token": "unset; prefer the environment, flags show up in ps",
    "state_dir": f"./{DEFAULT_STATE_DIR}",
}


def build_parser() -> argparse.ArgumentParser:
    return settings_parser(
        WorkerSettings,
        prog=PROG,
        description="Run one streamherd worker. Every flag also reads from its WORKER_* "
        "environment variable; a flag wins over the environment.",
        env_prefix=ENV_PREFIX,
        extra_flags=_EXTRA_FLAGS,
        help_defaults=_HELP_DEFAULTS,
    )


def load_settings(argv: Sequence[str] | None = None) -> WorkerSettings:
    """Environment plus flags, validated; any nonsense raises ``ConfigError`` with one line."""
    return cli.load_settings(WorkerSettings, build_parser(), argv, env_prefix=ENV_PREFIX)

"""``streamherd-orchestrator`` / ``python -m orchestrator``: serve the API with uvicorn.

Every ``ORCH_*`` setting is also a flag (``ORCH_LEASE_TTL_S`` is ``--lease-ttl-s``); flags
win over the environment. A setting that makes no sense ends the start with one line that
names it and exit status 2, never a traceback; so does a database that cannot be opened
(or, with ``ORCH_AUTO_MIGRATE``, migrated) before the server starts. A database already at
head is not migrated at all; one behind is, by ``python -m orchestrator.migrate`` in a
child process, so this one never loads Alembic (``orchestrator.migrations``). With
``ORCH_DB_STARTUP_TIMEOUT_S`` a database that does not answer yet is waited for that long
(``orchestrator.startup``: one log line per attempt, ``/health`` answering meanwhile).
With ``ORCH_TLS_CERT``/``ORCH_TLS_KEY`` it serves HTTPS (``orchestrator.tls``); certificate
files that cannot make a context end the start the same way, naming the setting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import ssl
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import make_url

from orchestrator.config import Settings
from shared import cli
from shared.cli import CommandLineError, settings_parser
from shared.logs import configure_logging

if TYPE_CHECKING:
    from orchestrator.tls import ServerTLS

PROG = "streamherd-orchestrator"
ENV_PREFIX = "ORCH_"
EXIT_BAD_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
# How long a stopping server waits for requests in flight before it cuts them off.
GRACEFUL_SHUTDOWN_S = 10

log = logging.getLogger("orchestrator")


def build_parser() -> argparse.ArgumentParser:
    return settings_parser(
        Settings,
        prog=PROG,
        description="Serve the streamherd orchestrator API. Flags override ORCH_* variables.",
        env_prefix=ENV_PREFIX,
    )


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    """Environment plus flags, validated; nonsense raises ``CommandLineError``."""
    return cli.load_settings(Settings, build_parser(), argv, env_prefix=ENV_PREFIX)


def _reason(exc: BaseException) -> str:
    """The driver's own words for why (the innermost cause), on one line."""
    root = exc
    for _ in range(8):
        if root.__cause__ is None:
            break
        root = root.__cause__
    message = " ".join(str(root).split())[:300]
    return f"{message} ({type(root).__name__})" if message else type(root).__name__


def prepare_database(
    settings: Settings, sock: socket.socket | None = None, ssl_context: ssl.SSLContext | None = None
) -> str | None:
    """Open the database, and migrate it with ORCH_AUTO_MIGRATE, before serving.

    None when it is ready to serve from, else one line saying why not. Without
    ORCH_AUTO_MIGRATE a reachable database whose schema is behind still starts (``/ready``
    says what is missing); one that cannot be opened at all does not. With a
    ``db_startup_timeout_s`` and the API's socket (``sock``), one that cannot be opened is
    waited for, with probes answered on ``sock`` meanwhile.
    """
    return asyncio.run(_prepare(settings, sock, ssl_context))


async def _prepare(
    settings: Settings, sock: socket.socket | None, ssl_context: ssl.SSLContext | None = None
) -> str | None:
    from orchestrator.migrations import MigrationFailed, check_connection, upgrade_to_head
    from orchestrator.startup import wait_for_database

    url = settings.database_url
    masked = make_url(url).render_as_string(hide_password=True)
    where = f"ORCH_DATABASE_URL={masked}"

    async def check() -> None:
        await check_connection(url)

    if sock is not None and settings.db_startup_timeout_s > 0:
        failure = await wait_for_database(
            check,
            timeout_s=settings.db_startup_timeout_s,
            sock=sock,
            describe=lambda exc: _without_password(_reason(exc), url),
            ssl_context=ssl_context,
        )
        if failure is not None:
            return (
                f"cannot open the database {where}: {_reason(failure)} "
                f"(waited ORCH_DB_STARTUP_TIMEOUT_S={settings.db_startup_timeout_s:g})"
            )
    else:
        try:
            await check()
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is said in one line
            return f"cannot open the database {where}: {_reason(exc)}"
    if settings.auto_migrate:
        try:
            await upgrade_to_head(url)
        except MigrationFailed as exc:  # the child's own line: the reason and its type
            return f"cannot migrate the database {where} (ORCH_AUTO_MIGRATE): {exc}"
        except Exception as exc:  # noqa: BLE001 - as above
            return f"cannot migrate the database {where} (ORCH_AUTO_MIGRATE): {_reason(exc)}"
    return None


def _without_password(line: str, url: str) -> str:
    """``line`` with the URL's password (user part or ``password=`` parameter) as ***,
    wherever it appears: in the URL we echo, or in a driver's message."""
    parsed = make_url(url)
    query = parsed.query.get("password", ())
    secrets = {parsed.password, *((query,) if isinstance(query, str) else query)}
    for secret in sorted((str(s) for s in secrets if s), key=len, reverse=True):
        if len(secret) >= 3:  # shorter ones would mangle the line, and are no secret
            line = line.replace(secret, "***")
    return line


def _log_transport(settings: Settings, tls: ServerTLS | None) -> None:
    """One line on how clients reach this process: HTTPS (and whom it admits) or plain."""
    if tls is None:
        if not settings.is_loopback_host:
            log.warning(
                "orchestrator.plain_http: tokens cross the network in clear unless a TLS "
                "proxy terminates in front; set ORCH_TLS_CERT and ORCH_TLS_KEY to serve HTTPS",
                extra={"host": settings.host},
            )
        return
    log.info(
        "orchestrator.tls: serving HTTPS with certificate %s; client certificates %s",
        tls.fingerprint,
        "required" if settings.tls_client_ca else "not asked for",
        extra={
            "client_ca": settings.tls_client_ca,
            "bind_worker_id": settings.tls_binds_worker_id,
            "reload_interval_s": settings.tls_reload_interval_s,
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except CommandLineError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    configure_logging(level=settings.log_level, json_format=settings.log_json)
    tls = None
    if settings.serves_tls:
        from orchestrator.tls import ServerTLS, TLSFiles, TLSFilesError

        files = TLSFiles.from_settings(settings)
        assert files is not None
        try:
            tls = ServerTLS(files)
        except TLSFilesError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return EXIT_BAD_CONFIG
    sock: socket.socket | None = None
    if settings.db_startup_timeout_s > 0:
        # Bound before the wait: probes answer on it meanwhile, the API serves on it after.
        from orchestrator.startup import bind

        try:
            sock = bind(settings.host, settings.port)
        except OSError as exc:
            print(
                f"{PROG}: cannot serve on {settings.host}:{settings.port}: {exc}", file=sys.stderr
            )
            return 1
    try:
        problem = prepare_database(settings, sock, tls.context if tls is not None else None)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if problem is not None:
        print(f"{PROG}: {_without_password(problem, settings.database_url)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if settings.admin_token is None and settings.worker_token is None:
        log.warning(
            "orchestrator.no_tokens: serving on loopback only; set ORCH_ADMIN_TOKEN and "
            "ORCH_WORKER_TOKEN to serve other hosts",
            extra={"host": settings.host},
        )
    _log_transport(settings, tls)

    from orchestrator.app import create_app
    from orchestrator.server import run_server

    # Migrated above: the lifespan need not do it again (nor fail there, in a traceback).
    app = create_app(settings.model_copy(update={"auto_migrate": False}))
    if tls is not None:
        tls.metrics = app.state.metrics
    try:
        run_server(
            app,
            sockets=[sock] if sock is not None else None,
            tls=tls,
            tls_reload_interval_s=settings.tls_reload_interval_s,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    except OSError as exc:
        print(f"{PROG}: cannot serve on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

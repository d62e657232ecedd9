"""``streamherd-worker`` / ``python -m worker``: settings, logging, signals, then the runtime.

Exit status: 0 after a graceful stop, 2 for a setting that makes no sense (one line on
stderr, no traceback), including a ``WORKER_TOKEN`` the orchestrator refuses at the first
registration, 1 when start-up fails otherwise (port taken), 3 when another process registered
the same ``WORKER_ID`` and the orchestrator fenced this one (one line on stderr naming the
other; the streams were stopped first), 128+signal when a second signal cuts the graceful
stop short.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from shared.logs import configure_logging
from worker.advertise import advertised_health_url
from worker.config import PROG, ConfigError, WorkerSettings, load_settings
from worker.health import HealthServer
from worker.host import HostFigures
from worker.processors import build_processor
from worker.runtime import RegistrationRefused, Runtime, WorkerSuperseded, describe

logger = logging.getLogger("worker")

EXIT_OK = 0
EXIT_STARTUP = 1
EXIT_CONFIG = 2
EXIT_SUPERSEDED = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartupError(Exception):
    """The worker cannot start; ``str()`` is the one line printed."""


async def serve(settings: WorkerSettings) -> int:
    # Imported here: the client pulls in httpx, which --help and bad settings do not need.
    from worker.client import ResilientWorkerClient

    processor = build_processor(settings.processor)
    client = ResilientWorkerClient(settings.client_config())
    runtime = Runtime(
        client,
        processor,
        worker_id=settings.worker_id,
        capacity=settings.max_streams,
        shutdown_timeout=settings.shutdown_timeout_s,
        restart_base=settings.processor_restart_base_s,
        restart_max=settings.processor_restart_max_s,
        local_give_up_after=settings.local_give_up_after,
        host=HostFigures(disk_path=settings.effective_state_dir),
    )
    health = HealthServer(runtime, host=settings.health_host, port=settings.health_port)
    try:
        await health.start()
    except OSError as exc:
        await client.aclose()
        raise StartupError(
            f"cannot serve health on {settings.health_host}:{settings.health_port} "
            f"(WORKER_HEALTH_HOST/WORKER_HEALTH_PORT): {exc.strerror or exc}"
        ) from None
    # Known once the health server listens (WORKER_HEALTH_PORT=0 picks its port).
    client.health_url = advertised_health_url(
        settings.health_advertise_url, host=settings.health_host, port=health.port
    )
    logger.info(
        "worker.starting",
        extra={
            "worker_id": settings.worker_id,
            "orchestrator_url": settings.orchestrator_url,
            "max_streams": settings.max_streams,
            "processor": processor.kind,
            "state_dir": str(settings.effective_state_dir),
            "health_port": health.port,
            "health_url": client.health_url,
        },
    )
    stop = asyncio.Event()
    _install_signal_handlers(stop, runtime)
    try:
        await runtime.run(stop)
    except RegistrationRefused as exc:
        raise ConfigError(_refused_token_message(settings, exc)) from None
    except WorkerSuperseded as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return EXIT_SUPERSEDED
    except Exception as exc:
        logger.error(
            "worker.failed", extra={"worker_id": settings.worker_id, "error": describe(exc)}
        )
        return EXIT_STARTUP
    finally:
        _remove_signal_handlers()
        await health.close()
    return EXIT_OK


def _refused_token_message(settings: WorkerSettings, exc: RegistrationRefused) -> str:
    """The one line for a refused first registration, naming the setting to fix."""
    where = f"the orchestrator at {settings.orchestrator_url}"
    if settings.token is None:
        return f"invalid setting WORKER_TOKEN: not set, and {where} requires one ({exc})"
    return f"invalid setting WORKER_TOKEN: {where} refused it ({exc})"


def _install_signal_handlers(stop: asyncio.Event, runtime: Runtime) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            logger.info("worker.signal", extra={"signal": sig.name, "action": "graceful_stop"})
            stop.set()
            return
        # A second signal means the operator will not wait: no leave, no deadline.
        logger.warning("worker.signal", extra={"signal": sig.name, "action": "exit_now"})
        runtime.abort()
        logging.shutdown()
        os._exit(128 + sig.value)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)


def _remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.remove_signal_handler(sig)


def _importable_working_directory() -> None:
    """``module:pkg.mod:fn`` finds modules beside the operator, as ``uvicorn`` does: the
    console script's sys.path starts at its bin directory, not the working directory."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: Sequence[str] | None = None) -> int:
    _importable_working_directory()
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(level=settings.log_level, json_format=settings.log_json)
    # httpx logs every request at INFO: one line per heartbeat drowns the worker's own events.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return asyncio.run(serve(settings))
    except StartupError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())

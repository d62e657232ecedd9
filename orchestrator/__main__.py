"""``streamherd-orchestrator`` / ``python -m orchestrator``: serve the API with uvicorn.

Every ``ORCH_*`` setting is also a flag (``ORCH_LEASE_TTL_S`` is ``--lease-ttl-s``); flags
win over the environment. A setting that makes no sense ends the start with one line that
names it and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from orchestrator.config import Settings
from shared.logs import configure_logging

PROG = "streamherd-orchestrator"
EXIT_BAD_CONFIG = 2

log = logging.getLogger("orchestrator")


def _env_name(field: str) -> str:
    return f"ORCH_{field.upper()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve the streamherd orchestrator API. Flags override ORCH_* variables.",
    )
    for name, field in Settings.model_fields.items():
        default = field.default
        if hasattr(default, "get_secret_value"):
            default = "(set)"
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            metavar=name.upper(),
            help=f"{_env_name(name)} (default: {default})",
        )
    return parser


def explain(error: ValidationError) -> str:
    """One line naming the first offending setting."""
    first = error.errors()[0]
    loc = first.get("loc", ())
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc:
        return f"invalid setting {_env_name(str(loc[0]))}: {message}"
    return f"invalid settings: {message}"


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ValidationError as exc:
        print(f"{PROG}: {explain(exc)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    configure_logging(level=settings.log_level, json_format=settings.log_json)
    if settings.admin_token is None and settings.worker_token is None:
        log.warning(
            "orchestrator.no_tokens: serving on loopback only; set ORCH_ADMIN_TOKEN and "
            "ORCH_WORKER_TOKEN to serve other hosts",
            extra={"host": settings.host},
        )

    from orchestrator.app import create_app
    from orchestrator.live import run_server

    app = create_app(settings)
    try:
        run_server(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    except OSError as exc:
        print(f"{PROG}: cannot serve on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

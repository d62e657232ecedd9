"""``python -m orchestrator.migrate``: ``alembic upgrade head`` on ``ORCH_DATABASE_URL``,
the child process ``orchestrator.migrations`` starts so the server never loads Alembic.

Exit status 0 once at head; otherwise 1 and one line on stderr saying why (the reason
the server prints in its own one line).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from orchestrator.migrations import URL_VARIABLE, project_root

EXIT_FAILED = 1


def alembic_config(database_url: str) -> Config:
    root = project_root()
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "alembic"))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def alembic_head() -> str | None:
    """The head as Alembic itself finds it (``migrations.head_revision`` must agree)."""
    return ScriptDirectory.from_config(alembic_config("sqlite+aiosqlite://")).get_current_head()


def upgrade(database_url: str) -> None:
    """``alembic upgrade head``, in this process (the tests' templates use it directly)."""
    command.upgrade(alembic_config(database_url), "head")


def _reason(exc: BaseException) -> str:
    root = exc
    for _ in range(8):  # the innermost cause: the driver's own words
        if root.__cause__ is None:
            break
        root = root.__cause__
    message = " ".join(str(root).split())[:300]
    return f"{message} ({type(root).__name__})" if message else type(root).__name__


def main(argv: Sequence[str] | None = None) -> int:
    del argv  # no flags: the URL comes from the environment, out of sight of ``ps``
    url = os.environ.get(URL_VARIABLE)
    if not url:
        print(f"{URL_VARIABLE} is not set", file=sys.stderr)
        return EXIT_FAILED
    try:
        upgrade(url)
    except Exception as exc:  # noqa: BLE001 - said in one line, for the server to repeat
        print(_reason(exc), file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())

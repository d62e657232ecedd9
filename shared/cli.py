"""Settings as command-line flags, and a bad setting as one line: for both entry points.

Every field of a pydantic-settings class becomes ``--field-name`` (flags win over the
environment); a value that fails validation is reported as one line naming the
environment variable, never a traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

S = TypeVar("S", bound=BaseSettings)


class CommandLineError(ValueError):
    """A flag or setting that makes no sense, said in one line."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints its usage and exits on a bad flag; we want our single line."""

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(message)


def env_name(prefix: str, field: str) -> str:
    return f"{prefix}{field.upper()}"


def settings_parser(
    settings: type[BaseSettings],
    *,
    prog: str,
    description: str,
    env_prefix: str,
    extra_flags: Mapping[str, tuple[str, ...]] | None = None,
    help_defaults: Mapping[str, object] | None = None,
) -> argparse.ArgumentParser:
    """One flag per field of ``settings``; a flag left out is absent from the result, so
    the environment (or the field's default) decides."""
    parser = _OneLineParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    extra = extra_flags or {}
    shown = help_defaults or {}
    for name, field in settings.model_fields.items():
        default = shown.get(name, field.get_default(call_default_factory=True))
        if hasattr(default, "get_secret_value"):
            default = "(set)"
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            *extra.get(name, ()),
            dest=name,
            metavar=name.upper(),
            help=f"{env_name(env_prefix, name)} (default: {default})",
        )
    return parser


def one_line(exc: ValidationError, env_prefix: str) -> str:
    """Every offending setting, named by its environment variable, on one line."""
    parts = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        loc = error["loc"]
        if loc:
            parts.append(f"invalid setting {env_name(env_prefix, str(loc[0]))}: {message}")
        else:
            parts.append(f"invalid settings: {message}")
    return "; ".join(parts)


def load_settings(
    settings: type[S],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    env_prefix: str,
) -> S:
    """Environment plus flags, validated; nonsense raises ``CommandLineError``."""
    flags: dict[str, Any] = vars(parser.parse_args(argv))
    try:
        return settings(**flags)
    except ValidationError as exc:
        raise CommandLineError(one_line(exc, env_prefix)) from None
    except SettingsError as exc:
        # pydantic-settings fails this way on an environment value it cannot even decode.
        raise CommandLineError(f"invalid settings: {exc}") from None

"""What every `pipeline` command shares: the `main` group, one-line errors, the console,
the client, who runs the command."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import psycopg
    from rich.console import Console

    from pipeline.client import Client

# The errors a user can cause, each shown as one line (prefix + its first line): module,
# class, prefix. They are looked up in sys.modules when an error reaches the CLI: the
# commands import lazily, and an error of a module never imported cannot have been raised.
# `PipelineError` is the root of every error the library raises on purpose.
USER_ERRORS = (
    ("pipeline.errors", "PipelineError", ""),
    ("builtins", "TimeoutError", ""),
    ("sqlalchemy.exc", "OperationalError", "database error: "),
    ("psycopg", "OperationalError", "database error: "),
    ("kombu.exceptions", "OperationalError", "broker error: "),
)
# Bad inputs `submit` lists line by line; the rest are counted.
SHOWN_PROBLEMS = 20
# Rows of `results --out` (inputs of `submit`) between two progress bar updates.
PROGRESS_STEP = 1000
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables.")


@cache
def _console() -> Console:
    from rich.console import Console

    return Console()


def _loaded(module: str, name: str) -> type[BaseException] | None:
    """The exception class `module.name` when that module has been imported, else None."""
    kind: type[BaseException] | None = getattr(sys.modules.get(module), name, None)
    return kind


def _user_error_line(error: Exception) -> str | None:
    """The one line shown for an error a user can cause; None for any other error (a bug,
    which keeps its traceback)."""
    from pipeline.redaction import error_line, redact

    if "pydantic" in sys.modules:  # a ValidationError can only come from a loaded pydantic
        from pydantic import ValidationError

        from pipeline.errors import validation_line

        if isinstance(error, ValidationError):
            return redact(validation_line(error))
    for module, name, prefix in USER_ERRORS:
        kind = _loaded(module, name)
        if kind is not None and isinstance(error, kind):
            return prefix + error_line(error)
    return None


def _usage_line(error: click.UsageError) -> str:
    """A bad command line as one line, with where to read the command's usage."""
    if error.ctx is None:
        return error.format_message()
    return f"{error.format_message().rstrip('.')} (see `{error.ctx.command_path} --help`)"


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Re-raise a bad command line and an error a user can cause as a one-line ClickException
    (exit code 1); anything else, a bug, keeps its traceback."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # a bare `pipeline` or `pipeline models`: click shows the help
    except click.UsageError as error:
        raise click.ClickException(_usage_line(error)) from None
    except click.ClickException:
        raise
    except Exception as error:
        line = _user_error_line(error)
        if line is None:
            raise
        raise click.ClickException(line) from None


class _Group(click.Group):
    """Shows bad command lines and the library's expected errors as one line, exit code 1.

    Exit code 2 is not used for a bad command line (click's default), because
    `submit --wait` exits 2 for a batch that finished otherwise than succeeded.
    """

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        with _one_line_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_errors():
            return super().invoke(ctx)


def _client(publishes: bool = False) -> Client:
    """A client on a reachable, migrated ledger (and a reachable broker when the command publishes)."""
    from pipeline import health
    from pipeline.client import Client

    client = Client()
    health.check_ledger(client.engine)
    if publishes:
        health.check_broker(client.app)
    return client


def _ledger_connection() -> psycopg.Connection[Any]:
    """A psycopg connection on a reachable, migrated ledger, located as `Settings` locates it
    (PIPELINE_DATABASE_URL, else the embedded PostgreSQL, started here): for a command that
    only reads the ledger and loads neither SQLAlchemy nor pydantic-settings. Other settings
    are not read."""
    from pipeline import health
    from pipeline.database import ledger_settings

    return health.ledger_connection(ledger_settings().resolved_database_url())


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` into one line naming it."""
    try:
        yield
    except OSError as error:
        raise click.ClickException(f"cannot write {path}: {error.strerror}") from None


@click.group(cls=_Group)
def main() -> None:
    """Async fan-out / aggregate inference pipeline."""


def _actor() -> str:
    """Who runs this command, as the registry records it: user@host."""
    import getpass
    import socket

    return f"{getpass.getuser()}@{socket.gethostname()}"

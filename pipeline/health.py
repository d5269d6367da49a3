"""Is a service ready for a command: the broker answers, the ledger database answers
and its schema is at this code's migration head.

The ledger check reads Alembic's version table with plain SQL (on an engine's connection,
or on a psycopg connection of its own for a command that loads no SQLAlchemy) and this
code's heads from the migration files' `revision` / `down_revision` assignments (parsed,
not run), without importing Alembic: a CLI command pays neither Alembic's import nor
loading every migration script (each imports Alembic); `tests/test_cli.py` checks the
heads against Alembic's.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import psycopg

from pipeline.database import libpq_url, sqlalchemy_url
from pipeline.errors import ServiceNotReadyError
from pipeline.redaction import error_line, redact

if TYPE_CHECKING:
    from celery import Celery
    from sqlalchemy import Engine

# Alembic's version table: whether it exists (no ledger schema when not), then its revisions.
VERSION_TABLE_EXISTS = "SELECT to_regclass('alembic_version') IS NOT NULL"
CURRENT_REVISIONS = "SELECT version_num FROM alembic_version"


def _described(url: str) -> str:
    """`url` (in SQLAlchemy's form, as an engine shows it) without its password; a Unix-socket
    directory (libpq's `?host=/dir`, as the embedded PostgreSQL uses) shown in brackets where
    a host name would be."""
    parts = urlsplit(url)
    socket_dirs = parse_qs(parts.query).get("host", [])
    if parts.hostname is None and len(socket_dirs) == 1:
        user = f"{parts.username}@" if parts.username else ""
        return f"{parts.scheme}://{user}[{socket_dirs[0]}]{parts.path}"
    return redact(url)


def _assigned_revisions(source: str) -> dict[str, object]:
    """The literal values a migration file assigns to `revision` and `down_revision`."""
    values: dict[str, object] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
                values[target.id] = ast.literal_eval(value)
    return values


@lru_cache(maxsize=1)
def migration_revisions() -> tuple[frozenset[str], frozenset[str]]:
    """(every revision, the heads) of this code's migrations, read from `migrations/versions`.

    Raises:
        ValueError: a migration file has no literal `revision`.
    """
    known: set[str] = set()
    parents: set[str] = set()
    for path in files("migrations").joinpath("versions").iterdir():
        if not path.name.endswith(".py") or path.name.startswith("_"):
            continue
        values = _assigned_revisions(path.read_text(encoding="utf-8"))
        if not isinstance(values.get("revision"), str):
            raise ValueError(f"migration {path.name} has no literal `revision`")
        known.add(str(values["revision"]))
        down = values.get("down_revision")
        parents.update([down] if isinstance(down, str) else down if isinstance(down, (tuple, list)) else [])
    return frozenset(known), frozenset(known - parents)


def _check_schema(conn: psycopg.Connection[Any], where: str) -> None:
    """Return when the database on `conn` is migrated to this code's head (or to a revision
    this code does not know: newer code migrated it).

    Raises:
        ServiceNotReadyError: no ledger schema, or an older migration than this code needs.
        psycopg.OperationalError: the connection failed.
    """
    exists = conn.execute(VERSION_TABLE_EXISTS).fetchone()
    current = {row[0] for row in conn.execute(CURRENT_REVISIONS)} if exists and exists[0] else set()
    if not current:
        raise ServiceNotReadyError(f"the database {where} has no ledger schema: run `pipeline migrate`")
    known, heads = migration_revisions()
    behind = sorted((current & known) - heads)
    if behind:
        raise ServiceNotReadyError(
            f"the ledger schema of {where} is at migration {', '.join(behind)}, this code needs"
            f" {', '.join(sorted(heads))}: run `pipeline migrate`"
        )


def _unreachable(where: str, error: Exception) -> ServiceNotReadyError:
    return ServiceNotReadyError(f"cannot reach PostgreSQL at {where}: {error_line(error)}")


def check_ledger(engine: Engine) -> None:
    """Return when the database answers and its schema is migrated to this code's head.

    A database at a revision this code does not know (newer code migrated it) passes.

    Raises:
        ServiceNotReadyError: the database is unreachable, has no ledger schema, or is
            at an older migration than this code needs.
    """
    import sqlalchemy.exc

    from pipeline.ledger.connection import driver_connection

    where = _described(engine.url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            _check_schema(driver_connection(conn), where)
    except (sqlalchemy.exc.OperationalError, psycopg.OperationalError) as error:
        raise _unreachable(where, error) from None


def ledger_connection(database_url: str) -> psycopg.Connection[Any]:
    """An autocommit psycopg connection on the ledger at `database_url`, once it answers and
    its schema is migrated to this code's head (as `check_ledger`); the caller closes it.
    For a command that only reads and loads no SQLAlchemy (`pipeline status`).

    Raises:
        ServiceNotReadyError: as `check_ledger`.
    """
    where = _described(sqlalchemy_url(database_url))
    try:
        conn = psycopg.connect(libpq_url(database_url), autocommit=True)
        try:
            _check_schema(conn, where)
        except BaseException:
            conn.close()
            raise
    except psycopg.OperationalError as error:
        raise _unreachable(where, error) from None
    return conn


def check_broker(app: Celery) -> None:
    """Return when the broker accepts a connection (one attempt, no retries).

    Raises:
        ServiceNotReadyError: the broker is unreachable.
    """
    import kombu.exceptions

    with app.connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=0)
        except kombu.exceptions.OperationalError as error:
            where = redact(conn.as_uri(include_password=True))
            raise ServiceNotReadyError(f"cannot reach the broker at {where}: {error_line(error)}") from None

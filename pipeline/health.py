"""Is a service ready for a command: the broker answers, the ledger database answers
and its schema is at this code's migration head."""

from __future__ import annotations

from importlib.resources import files

import kombu.exceptions
import sqlalchemy.exc
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from celery import Celery
from sqlalchemy import URL, Engine

from pipeline.errors import ServiceNotReadyError


def first_line(error: BaseException) -> str:
    """The first line of an error's message (a driver's cause when SQLAlchemy wraps one)."""
    cause = getattr(error, "orig", None) or error
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0]


def _described(url: URL) -> str:
    """The URL without its password; a Unix-socket directory (libpq's `?host=/dir`, as the
    embedded PostgreSQL uses) shown in brackets where a host name would be."""
    socket_dir = url.query.get("host")
    if url.host is None and isinstance(socket_dir, str):
        user = f"{url.username}@" if url.username else ""
        return f"{url.drivername}://{user}[{socket_dir}]/{url.database}"
    return url.render_as_string(hide_password=True)


def check_ledger(engine: Engine) -> None:
    """Return when the database answers and its schema is migrated to this code's head.

    A database at a revision this code does not know (newer code migrated it) passes.

    Raises:
        ServiceNotReadyError: the database is unreachable, has no ledger schema, or is
            at an older migration than this code needs.
    """
    where = _described(engine.url)
    try:
        with engine.connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    except sqlalchemy.exc.OperationalError as error:
        raise ServiceNotReadyError(f"cannot reach PostgreSQL at {where}: {first_line(error)}") from None
    if not current:
        raise ServiceNotReadyError(f"the database {where} has no ledger schema: run `pipeline migrate`")
    script = ScriptDirectory(str(files("migrations")))
    heads = set(script.get_heads())
    known = {revision.revision for revision in script.walk_revisions()}
    behind = sorted((current & known) - heads)
    if behind:
        raise ServiceNotReadyError(
            f"the ledger schema of {where} is at migration {', '.join(behind)}, this code needs"
            f" {', '.join(sorted(heads))}: run `pipeline migrate`"
        )


def check_broker(app: Celery) -> None:
    """Return when the broker accepts a connection (one attempt, no retries).

    Raises:
        ServiceNotReadyError: the broker is unreachable.
    """
    with app.connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=0)
        except kombu.exceptions.OperationalError as error:
            where = conn.as_uri()
            raise ServiceNotReadyError(f"cannot reach the broker at {where}: {first_line(error)}") from None

"""Connections to the ledger: the engine, migrations, autocommit reads, transactions on
either an engine or an autocommit connection, and COPY."""

from __future__ import annotations

import random
import select
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib.resources import files
from typing import Any, TypeVar

import psycopg
from psycopg import _queries as psycopg_queries
from psycopg import pq
from psycopg.errors import DeadlockDetected
from pydantic_core import from_json
from sqlalchemy import Connection, Engine, create_engine, event, func, literal
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from pipeline.database import sqlalchemy_url

T = TypeVar("T")
# psycopg turns a statement's `%(name)s` placeholders into `$n` at every execution, from an LRU
# cache of 128 statements, but not for a text over 4 KB or with over 50 parameters (its guard
# against an ORM's ever-different statements). The ledger's are fixed, and the claim and
# completion of every worker turn are over either limit: each re-parsed its text in Python,
# a quarter of the completion's time in a one-input batch's turn (py-spy). Raised so every
# ledger statement is converted once (`test_the_hot_statements_placeholders_are_converted_once`
# fails if psycopg stops reading these).
psycopg_queries.MAX_CACHED_STATEMENT_LENGTH = max(psycopg_queries.MAX_CACHED_STATEMENT_LENGTH, 64 * 1024)
psycopg_queries.MAX_CACHED_STATEMENT_PARAMS = max(psycopg_queries.MAX_CACHED_STATEMENT_PARAMS, 256)
# Runs of a transaction PostgreSQL chose as a deadlock's victim, and the longest pause (s)
# before the next: random, so the two sides do not meet again in step.
DEADLOCK_RUNS = 5
DEADLOCK_PAUSE_S = 0.05
# The execution option of a statement whose rows come back in PostgreSQL's binary format
# (`binary_results`): a `bytea` value then travels as its bytes, not hex-escaped at twice
# its size (measured, a 1.2 MB `bytea` read: 1.26 ms binary, 4.9 ms text).
BINARY_RESULTS = {"binary_results": True}


def make_engine(database_url: str, durable_commits: bool = True) -> Engine:
    """An engine on the ledger at `database_url`; a pooled connection is checked before use
    (`check_on_checkout`), so the first statement after a PostgreSQL restart does not fail.
    JSON columns are parsed by pydantic-core (result pages, manifests: several times faster
    than `json.loads`).

    Without `durable_commits`, its sessions commit without waiting for the WAL flush
    (`synchronous_commit = off`): for a worker's turns only, whose claims and completions a
    PostgreSQL crash may undo (never half: each is one statement), to be redone like a lost
    worker's, once its sub-task's lease expires. The commits a client is told about (a
    stored batch, a finished one) stay durable: the aggregate sets it back in its lock
    statement (`ledger.lock_aggregation`), and a durable commit flushes every earlier one."""
    options = {} if durable_commits else {"connect_args": {"options": "-c synchronous_commit=off"}}
    engine = create_engine(sqlalchemy_url(database_url), json_deserializer=from_json, **options)
    event.listen(engine, "checkout", check_on_checkout)
    event.listen(engine, "before_cursor_execute", binary_results)
    return engine


def check_on_checkout(
    dbapi_connection: psycopg.Connection[Any], record: ConnectionPoolEntry, proxy: PoolProxiedConnection
) -> None:
    """Before the pool hands out a connection: check it without a round trip (SQLAlchemy's
    pre-ping costs one per checkout, four on a one-input batch's path). An idle pooled
    connection has nothing to read, so a readable socket means the server spoke: most often
    to end the connection (a terminated backend, a restart: a FATAL message, then EOF). Only
    then is it pinged.

    Raises:
        DisconnectionError: the connection is closed or fails the ping; the pool discards
            it and hands out a new one.
    """
    if dbapi_connection.closed:
        raise DisconnectionError("the ledger connection is closed")
    poll = select.poll()
    poll.register(dbapi_connection.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    if not poll.poll(0):
        return
    try:
        dbapi_connection.execute(";")
    except psycopg.OperationalError as error:
        raise DisconnectionError(f"the ledger connection was closed: {error}") from error


def binary_results(
    conn: Connection, cursor: psycopg.Cursor[Any], statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    """Before a statement runs: its rows come back in binary format when it carries the
    `BINARY_RESULTS` execution option (the cursor is the statement's own). psycopg loads
    every type to the same Python value from either format."""
    if context is not None and context.execution_options.get("binary_results"):
        cursor.format = pq.Format.BINARY


def migrate(database_url: str) -> None:
    """Apply every Alembic migration to the database at `database_url`."""
    from alembic import command  # imported here: only `migrate` needs Alembic
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(files("migrations")))
    # configparser interpolates '%': escape it (percent-encoded passwords).
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    command.upgrade(config, "head")


def now() -> Any:
    """The statement's clock: `clock_timestamp()`, not `now()`, so a long transaction does
    not stamp its start time."""
    return func.clock_timestamp()


def inline(value: str) -> Any:
    """`value` written into the statement's SQL instead of bound. After five runs PostgreSQL
    settles on a prepared statement's generic plan (no planning per run) only when it costs
    no more than the plans made with the values: a bound value keeps a generic plan from a
    partial index whose predicate names it, so with a backlog the statement is planned
    again at every run (0.7 ms for a claim)."""
    return literal(value, literal_execute=True)


def autocommit(engine: Engine) -> Connection:
    """A connection on which each statement commits on its own: a transition or a read that
    is one statement costs one round trip, with no BEGIN and COMMIT (or ROLLBACK) around it."""
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def retrying_deadlocks(transaction: Callable[[], T]) -> T:
    """Run `transaction` (a function that opens and commits its own transaction), again
    when PostgreSQL rolled it back as a deadlock's victim: the rollback was whole, so a new
    run is safe, and the other side has gone on. Transactions that lock a batch's row and
    then its sub-tasks' (cancel, abort) meet ones that lock them the other way (a worker's
    completion, the sweep), and no single order serves both.

    Raises:
        sqlalchemy.exc.OperationalError: a deadlock on the last of `DEADLOCK_RUNS` runs, or
            any other operational error at once.
    """
    for run in range(1, DEADLOCK_RUNS):
        try:
            return transaction()
        except OperationalError as error:
            if not isinstance(error.orig, DeadlockDetected):
                raise
        time.sleep(random.uniform(0, DEADLOCK_PAUSE_S * run))
    return transaction()


# What a ledger function that is one statement or one transaction runs on: an Engine (it
# checks out a connection of its own) or a caller's Connection (a worker's turn holds one).
Bind = Engine | Connection


def connected(bind: Bind) -> AbstractContextManager[Connection]:
    """The connection a statement of `bind` runs on: Connection `bind` as it is (the caller's
    transaction, or autocommit), else an `autocommit` connection of Engine `bind`, closed on exit."""
    return nullcontext(bind) if isinstance(bind, Connection) else autocommit(bind)


@contextmanager
def transaction(bind: Bind) -> Iterator[Connection]:
    """One transaction, committed when the block ends and rolled back when it raises: on a
    connection of Engine `bind` (`engine.begin()`), or on `autocommit` Connection `bind`
    itself, so a caller holding one checks out no other; that connection is in autocommit
    again afterwards (unless it was invalidated: it is then useless anyway)."""
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            yield conn
        return
    # Each statement has committed already: this only ends SQLAlchemy's autobegun
    # transaction (nothing is sent), which must end before the isolation level changes.
    bind.commit()
    bind.execution_options(isolation_level=bind.default_isolation_level)
    try:
        with bind.begin():
            yield bind
    finally:
        if not bind.invalidated:
            bind.execution_options(isolation_level="AUTOCOMMIT")


def driver_connection(conn: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under `conn`, on its transaction: for COPY, and for the reads
    shared with code that loads no SQLAlchemy (`listing`)."""
    driver = conn.connection.driver_connection
    assert driver is not None, "a checked-out connection has its driver connection"
    return driver  # type: ignore[no-any-return]


def copy_rows(
    conn: Connection, statement: str, rows: Iterable[Sequence[Any]], binary_types: Sequence[str] | None = None
) -> int:
    """COPY `rows` with `statement` (COPY ... FROM STDIN) on `conn`'s transaction; return the count.

    With `binary_types` (the PostgreSQL type of each column) the rows go in binary
    format: packed float32 bytes are sent as they are instead of hex-escaped.
    """
    count = 0
    if binary_types is not None:
        statement += " (FORMAT BINARY)"
    with driver_connection(conn).cursor() as cursor, cursor.copy(statement) as copy:
        if binary_types is not None:
            copy.set_types(list(binary_types))
        for row in rows:
            copy.write_row(row)
            count += 1
    return count

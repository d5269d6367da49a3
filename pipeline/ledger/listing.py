"""What `pipeline status` lists, read on a plain psycopg connection so the command loads
no SQLAlchemy: the newest batches' statuses (`Client.batches` reads them here too, on its
engine's connection) and the open alerts. The SQL is `queries.sql`'s, as every read's."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from pipeline.ledger.raw_sql import for_psycopg

BATCH_STATUSES = for_psycopg("batch_statuses")
OPEN_ALERTS = for_psycopg("open_alerts")


def batch_statuses(conn: psycopg.Connection[Any], state: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` rows of the `batch_status` view with each batch's result and
    metrics, newest first, optionally of one `state`."""
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(BATCH_STATUSES, {"state": state, "limit": limit}).fetchall()


def open_alerts(conn: psycopg.Connection[Any], pipeline: str | None) -> list[dict[str, Any]]:
    """The open alerts of `pipeline` (or of all), oldest first: the columns of
    `ledger.open_alerts`' rows."""
    with conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(OPEN_ALERTS, {"pipeline": pipeline}).fetchall()

"""A batch's status as the client and the CLI show it (`BatchStatus`), and the newest
batches' statuses: read on a plain psycopg connection, so `pipeline status` lists them
without loading SQLAlchemy, and `Client.batches` reads them through the same function."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import psycopg
from pydantic import BaseModel

from pipeline.errors import InvalidArgumentError
from pipeline.ledger import listing
from pipeline.states import BatchState, Priority

# Most batches `newest_batches` lists at once.
MAX_LISTED_BATCHES = 10_000


class BatchStatus(BaseModel):
    """One row of the `batch_status` view, with the batch's result and metrics."""

    id: uuid.UUID
    pipeline: str
    state: BatchState
    priority: Priority
    items: int
    total: int
    succeeded: int
    failed: int
    cancelled: int
    remaining: int
    progress: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    wait_s: float | None
    aggregation_s: float | None
    elapsed_s: float | None
    error: str | None
    # Every input's result is readable: the batch is in a final state and its results are
    # written (a cancelled batch is `cancelled` at once, its results come once its running
    # sub-tasks have finished).
    results_ready: bool
    result: dict[str, Any] | None
    metrics: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        """True once the batch is `succeeded`, `partial`, `failed` or `cancelled` and its
        results are readable (`results_ready`)."""
        return self.results_ready


def newest_batches(conn: psycopg.Connection[Any], state: str | None, limit: int) -> list[BatchStatus]:
    """The statuses of the newest `limit` batches (1 .. 10,000), newest first, optionally
    only those in `state`, read on `conn`.

    Raises:
        InvalidArgumentError: `state` is not a batch state, or `limit` is out of range.
    """
    if state is not None and state not in BatchState.__members__:
        known = ", ".join(BatchState.__members__)
        raise InvalidArgumentError(f"state {state!r} is not a batch state; known: {known}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LISTED_BATCHES:
        raise InvalidArgumentError(f"limit must be an integer from 1 to {MAX_LISTED_BATCHES}, got {limit!r}")
    return [BatchStatus.model_validate(row) for row in listing.batch_statuses(conn, state, limit)]

"""Batches: storing a new one with its input pages, reading statuses, cancelling."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, Float, Interval, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from pipeline.definition import InputPage
from pipeline.errors import IdempotencyKeyError
from pipeline.ledger import queries
from pipeline.ledger.connection import autocommit, copy_rows, now
from pipeline.ledger.counters import Outcome, cancel_subtasks, counters_complete
from pipeline.schema import Batch, BatchState, FailurePolicy, Priority, Subtask, SubtaskState

# The channel a batch's finish is announced on (payload: its id).
NOTIFY_CHANNEL = "batch_finished"

INSERT_BATCH = (
    pg_insert(Batch)
    .values(
        id=bindparam("id"),
        pipeline=bindparam("pipeline"),
        items=bindparam("items"),
        idempotency_key=bindparam("idempotency_key"),
        failure_policy=bindparam("failure_policy"),
        priority=bindparam("priority"),
        max_failed_fraction=bindparam("max_failed_fraction", type_=Float),
        # NULL without a deadline.
        deadline_at=now() + bindparam("deadline", type_=Interval),
    )
    .on_conflict_do_nothing(index_elements=[Batch.idempotency_key])
    .returning(Batch.id)
)


def insert_batch(
    conn: Connection,
    pipeline: str,
    pages: Sequence[InputPage],
    idempotency_key: str | None,
    failure_policy: FailurePolicy = FailurePolicy.best_effort,
    max_failed_fraction: float | None = None,
    deadline_s: float | None = None,
    priority: Priority = Priority.bulk,
) -> tuple[uuid.UUID, bool]:
    """Insert a `pending` batch and its input pages on `conn`'s transaction.

    Returns (batch id, created). With an `idempotency_key` already used, returns the
    existing batch and writes nothing.

    Raises:
        IdempotencyKeyError: the key belongs to a batch of another pipeline.
    """
    batch_id = uuid.uuid4()
    inserted = conn.execute(
        INSERT_BATCH,
        {
            "id": batch_id,
            "pipeline": pipeline,
            "items": sum(page.count for page in pages),
            "idempotency_key": idempotency_key,
            "failure_policy": failure_policy.value,
            "priority": priority.value,
            "max_failed_fraction": max_failed_fraction,
            "deadline": None if deadline_s is None else timedelta(seconds=deadline_s),
        },
    ).scalar_one_or_none()
    if inserted is None:
        existing_id, existing_pipeline = conn.execute(
            select(Batch.id, Batch.pipeline).where(Batch.idempotency_key == idempotency_key)
        ).one()
        if existing_pipeline != pipeline:
            raise IdempotencyKeyError(
                f"idempotency_key {idempotency_key!r} already names batch {existing_id}"
                f" of pipeline {existing_pipeline!r}, not {pipeline!r}"
            )
        return existing_id, False
    copy_rows(
        conn,
        queries.COPY_INPUT_PAGES,
        ((batch_id, page.first, page.count, _packed(page.X), page.data) for page in pages),
        binary_types=("uuid", "int4", "int4", "bytea", "json"),
    )
    return batch_id, True


def _packed(X: np.ndarray | None) -> bytes | None:
    return None if X is None else np.ascontiguousarray(X, dtype="<f4").tobytes()


def batch_status_row(engine: Engine, batch_id: uuid.UUID) -> dict[str, Any] | None:
    """The `batch_status` view's row of one batch, plus its result and metrics."""
    with autocommit(engine) as conn:
        row = conn.execute(queries.BATCH_STATUS, {"id": batch_id}).mappings().first()
    return dict(row) if row is not None else None


def batch_status_rows(engine: Engine, state: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` rows of the `batch_status` view, optionally of one state."""
    with autocommit(engine) as conn:
        rows = conn.execute(queries.BATCH_STATUSES, {"state": state, "limit": limit}).mappings().all()
    return [dict(row) for row in rows]


def first_subtask_started(engine: Engine, batch_id: uuid.UUID) -> datetime | None:
    """When a worker first started a sub-task of the batch; None before any did."""
    with autocommit(engine) as conn:
        started: datetime | None = conn.execute(
            select(func.min(Subtask.started_at)).where(Subtask.batch_id == batch_id)
        ).scalar_one()
    return started


def cancel_batch(engine: Engine, batch_id: uuid.UUID) -> Outcome:
    """`pending`/`running` → `cancelled`; its `pending`/`dispatched` sub-tasks → `cancelled`.

    Running sub-tasks finish; the result assembly (aggregate) then writes what was
    produced. `recorded` is False when the batch was not cancellable; `aggregate`
    is True when no sub-task is left running, so results can be assembled now.
    """
    with engine.begin() as conn:
        cancelled = conn.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.state.in_((BatchState.pending, BatchState.running)))
            .values(state=BatchState.cancelled, finished_at=now())
            .returning(Batch.id)
        ).first()
        if cancelled is None:
            return Outcome(recorded=False)
        cancel_subtasks(conn, batch_id, (SubtaskState.pending, SubtaskState.dispatched))
        complete = conn.execute(select(counters_complete()).where(Batch.id == batch_id)).scalar_one()
    return Outcome(recorded=True, aggregate=bool(complete))

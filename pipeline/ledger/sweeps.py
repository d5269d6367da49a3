"""The sweeper's reconciliation of the ledger with what should be in flight."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, func, select, update

from pipeline.ledger.aggregation import aggregate_due
from pipeline.ledger.connection import now
from pipeline.ledger.counters import (
    DEADLINE_REASON,
    UNFINISHED_SUBTASK_STATES,
    abort_batch,
    count_cancelled,
    count_finished,
)
from pipeline.ledger.split import Dispatch
from pipeline.schema import Batch, BatchState, Subtask, SubtaskRole, SubtaskState

# pg_try_advisory_xact_lock key: one sweep at a time across every aggregator process.
SWEEP_LOCK_KEY = 7_240_113


@dataclass(frozen=True)
class Sweep:
    """What one sweep found: messages to publish again, and how many sub-tasks it gave up on."""

    predict: list[Dispatch]
    split: list[uuid.UUID]
    aggregate: list[uuid.UUID]
    gave_up: int


def _serving(subtasks: Sequence[Any]) -> Counter[uuid.UUID]:
    """Per batch, how many of (batch id, role) `subtasks` serve: shadow ones are never counted."""
    return Counter(batch_id for batch_id, role in subtasks if role == SubtaskRole.serve)


def sweep(engine: Engine, lease_s: float, limit: int = 20_000) -> Sweep | None:
    """Reconcile the ledger with what should be in flight, in one transaction.

    - batches past their deadline are finished with what they have;
    - unfinished sub-tasks of a cancelled batch whose lease expired (their worker died, or
      a retry came due) are cancelled, not published again, so the batch's results are
      assembled even when no worker is left;
    - `running` sub-tasks whose lease expired on their last attempt become `failed`;
    - unfinished sub-tasks whose lease expired go back to `dispatched` with a new lease
      (at most `limit`), to be published again;
    - batches still `pending` a lease after submission (or after their split was last
      published again) are split again, once a lease;
    - batches due for aggregation for longer than a lease are aggregated again.

    Returns None when another process holds the sweep lock. Publishing the returned
    messages is the caller's job, after this commits.
    """
    lease = timedelta(seconds=lease_s)
    stamp = now()
    aggregate: list[uuid.UUID] = []
    with engine.begin() as conn:
        if not conn.execute(select(func.pg_try_advisory_xact_lock(SWEEP_LOCK_KEY))).scalar_one():
            return None
        overdue = conn.execute(
            select(Batch.id).where(Batch.state.in_((BatchState.pending, BatchState.running)), Batch.deadline_at < stamp)
        ).scalars()
        aggregate += [batch_id for batch_id in overdue.all() if abort_batch(conn, batch_id, DEADLINE_REASON)]

        # Once a lease per batch, not every sweep: a split that is slow to start (a busy
        # aggregator) is not republished at every sweep. Batch rows are locked here, before
        # any sub-task's: a cancel locks a batch's row, then its sub-tasks', and this order
        # meets it without a deadlock.
        split = (
            conn.execute(
                update(Batch)
                .where(
                    Batch.state == BatchState.pending,
                    func.coalesce(Batch.split_published_at, Batch.created_at) < stamp - lease,
                )
                .values(split_published_at=stamp)
                .returning(Batch.id)
            )
            .scalars()
            .all()
        )
        awaiting_results = select(Batch.id).where(Batch.state == BatchState.cancelled, Batch.aggregate_runs == 0)
        orphaned = conn.execute(
            update(Subtask)
            .where(
                Subtask.batch_id.in_(awaiting_results.scalar_subquery()),
                Subtask.state.in_(UNFINISHED_SUBTASK_STATES),
                func.coalesce(Subtask.lease_until, Subtask.queued_at + lease) < stamp,
            )
            .values(state=SubtaskState.cancelled, finished_at=stamp, lease_until=None)
            .returning(Subtask.batch_id, Subtask.role)
        ).all()
        for batch_id, count in _serving(orphaned).items():
            if count_cancelled(conn, batch_id, count):
                aggregate.append(batch_id)

        lost = conn.execute(
            update(Subtask)
            .where(
                Subtask.state == SubtaskState.running,
                Subtask.lease_until < stamp,
                Subtask.attempts >= Subtask.max_attempts,
            )
            .values(
                state=SubtaskState.failed,
                error=func.concat(
                    Subtask.error, "lease expired on the last attempt (", Subtask.attempts, "): worker lost"
                ),
                finished_at=stamp,
                lease_until=None,
            )
            .returning(Subtask.batch_id, Subtask.role)
        ).all()
        for batch_id, count in _serving(lost).items():
            if count_finished(conn, batch_id, succeeded=0, failed=count):
                aggregate.append(batch_id)

        expired = (
            select(Subtask.id)
            .where(
                Subtask.state.in_(UNFINISHED_SUBTASK_STATES),
                func.coalesce(Subtask.lease_until, Subtask.queued_at + lease) < stamp,
            )
            .order_by(Subtask.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        predict = conn.execute(
            update(Subtask)
            .where(Subtask.id.in_(expired.scalar_subquery()))
            # A rider no turn took gets a message of its own now, like any other.
            .values(state=SubtaskState.dispatched, lease_until=stamp + lease, rides=False)
            .returning(Subtask.id, Subtask.model, Subtask.priority)
        ).all()

        aggregate += (
            conn.execute(
                select(Batch.id).where(
                    aggregate_due(), func.coalesce(Batch.aggregating_at, Batch.finished_at) < stamp - lease
                )
            )
            .scalars()
            .all()
        )
    # A batch may be found twice (a cancelled one whose last sub-task was cancelled here).
    predicts = [Dispatch(row.id, row.model, row.priority) for row in predict]
    return Sweep(predicts, list(split), list(dict.fromkeys(aggregate)), len(lost))

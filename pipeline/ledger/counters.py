"""A batch's sub-task counters and the rules that end a batch: counting a finished
sub-task, the flip to `aggregating`, failure policies, aborts and cancellation.

Counters only grow and each sub-task is counted once, so exactly one statement sees
them reach the total: the one after which the batch must be aggregated.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, Update, and_, case, update

from pipeline.ledger.connection import now
from pipeline.schema import Batch, BatchState, FailurePolicy, Subtask, SubtaskRole, SubtaskState

if TYPE_CHECKING:
    from pipeline.ledger.aggregation import OnePageBatch

FAIL_FAST_REASON = "fail_fast: a sub-task failed"
DEADLINE_REASON = "deadline passed"
UNFINISHED_SUBTASK_STATES = (SubtaskState.pending, SubtaskState.dispatched, SubtaskState.running)


def too_many_failures_reason(max_failed_fraction: float) -> str:
    """The error of a batch aborted by its `max_failed_fraction`."""
    return f"more than {max_failed_fraction:.0%} of the sub-tasks failed"


@dataclass(frozen=True)
class Outcome:
    """What a finishing transition did: `recorded` is False for a stale claim or duplicate;
    `aggregate` is True for the one transaction that completed the batch."""

    recorded: bool
    aggregate: bool = False
    # The aggregate's read of the batch, when the completion that made it due read it too.
    due: OnePageBatch | None = None


def counters_complete() -> Any:
    """True when every sub-task of the batch is counted."""
    return Batch.succeeded + Batch.failed + Batch.cancelled == Batch.total


def counting(succeeded: Any, failed: Any) -> Update:
    """The UPDATE (its WHERE is the caller's) that adds `succeeded` and `failed` (numbers, or
    SQL expressions of them) to a batch's counters and flips it `running` → `aggregating`
    when they reach the total, returning the updated row and whether its counters are
    `complete`: what `must_aggregate` and the failure policies decide on."""
    complete = Batch.succeeded + succeeded + Batch.failed + failed + Batch.cancelled == Batch.total
    flips = and_(Batch.state == BatchState.running, complete)
    return (
        update(Batch)
        .values(
            succeeded=Batch.succeeded + succeeded,
            failed=Batch.failed + failed,
            state=case((flips, BatchState.aggregating.value), else_=Batch.state),
            aggregating_at=case((flips, now()), else_=Batch.aggregating_at),
        )
        # The whole row as updated: a completion that made the batch due reads its aggregate
        # beside it (`pipeline.ledger.outcomes`).
        .returning(*Batch.__table__.columns, counters_complete().label("complete"))
    )


def must_aggregate(counted: Row[Any]) -> bool:
    """After a count: True when it completed the batch, either flipping it to `aggregating`
    or finishing the last running sub-task of a cancelled batch."""
    return bool(counted.complete) and (
        counted.state == BatchState.aggregating
        or (counted.state == BatchState.cancelled and counted.aggregate_runs == 0)
    )


def count_finished(conn: Connection, batch_id: uuid.UUID, succeeded: int, failed: int) -> bool:
    """Add to a batch's counters (`counting`), or abort the batch when its failure policy
    says so. Returns True for the one call after which the batch must be aggregated."""
    row = conn.execute(counting(succeeded, failed).where(Batch.id == batch_id)).one()
    # While the split is still committing steps the batch is `pending`: it may abort too.
    if not row.complete and failed and row.state in (BatchState.pending, BatchState.running):
        if row.failure_policy == FailurePolicy.fail_fast:
            return abort_batch(conn, batch_id, FAIL_FAST_REASON)
        if row.max_failed_fraction is not None and row.failed > row.max_failed_fraction * row.total:
            return abort_batch(conn, batch_id, too_many_failures_reason(row.max_failed_fraction))
    return must_aggregate(row)


def abort_batch(conn: Connection, batch_id: uuid.UUID, reason: str) -> bool:
    """`pending`/`running` → `aggregating` with `reason`, cancelling every unfinished sub-task
    (a running one's late completion is then refused). Returns True when it aborted."""
    aborted = conn.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state.in_((BatchState.pending, BatchState.running)))
        .values(state=BatchState.aggregating, aggregating_at=now(), error=reason)
        .returning(Batch.id)
    ).first()
    if aborted is None:
        return False
    cancel_subtasks(conn, batch_id, UNFINISHED_SUBTASK_STATES)
    return True


def count_cancelled(conn: Connection, batch_id: uuid.UUID, count: int) -> bool:
    """Add `count` sub-tasks the caller cancelled to the batch's `cancelled` counter. Returns
    True when that completed the counters of a cancelled batch not yet aggregated: its
    results can be assembled now."""
    counted = conn.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(cancelled=Batch.cancelled + count)
        .returning(Batch.state, counters_complete().label("complete"), Batch.aggregate_runs)
    ).one()
    return bool(counted.complete and counted.state == BatchState.cancelled and counted.aggregate_runs == 0)


def cancel_subtasks(conn: Connection, batch_id: uuid.UUID, states: Sequence[SubtaskState]) -> int:
    """Cancel a batch's sub-tasks in `states` (its shadow ones too) and count the serve ones
    in `batches.cancelled`; return how many serve ones.

    The caller must have locked (updated) the batch row in this transaction.
    """
    roles = (
        conn.execute(
            update(Subtask)
            .where(Subtask.batch_id == batch_id, Subtask.state.in_(states))
            .values(state=SubtaskState.cancelled, finished_at=now(), lease_until=None)
            .returning(Subtask.role)
        )
        .scalars()
        .all()
    )
    count = roles.count(SubtaskRole.serve)
    if count:
        count_cancelled(conn, batch_id, count)
    return count

"""A claimed sub-task's outcome: complete it with its output (several of one batch in one
statement) or fail it (to retry, or for good). Each is guarded by the claim it holds (its
`attempt`), and counts the batch in the same statement or transaction; each takes an Engine
or a worker turn's Connection, as the claims do (`pipeline.ledger.claims`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    LargeBinary,
    Select,
    Text,
    and_,
    bindparam,
    column,
    func,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import aliased

from pipeline.ledger.aggregation import (
    AGGREGATION_FREE,
    one_page_batch,
    one_page_order,
    one_page_read,
    subtask_output_columns,
)
from pipeline.ledger.claims import Claim
from pipeline.ledger.connection import BINARY_RESULTS, Bind, connected, now, transaction
from pipeline.ledger.counters import Outcome, count_finished, counting, must_aggregate
from pipeline.schema import Batch, BatchState, Subtask, SubtaskRole, SubtaskState


@dataclass(frozen=True)
class Completion:
    """A claimed sub-task's result: its output rows, the version that scored them, their
    drift bin counts, and the CPU seconds of its predict call (and, for a shadow sub-task,
    of the champion's on the same rows)."""

    claim: Claim
    output: bytes
    model_version: str
    bin_counts: bytes | None
    predict_cpu_s: float | None = None
    champion_cpu_s: float | None = None


def _complete_statement() -> Select[Any]:
    done_rows = (
        func.unnest(
            bindparam("done_ids", type_=ARRAY(BigInteger)),
            bindparam("done_attempts", type_=ARRAY(Integer)),
            bindparam("done_outputs", type_=ARRAY(LargeBinary)),
            bindparam("done_bin_counts", type_=ARRAY(LargeBinary)),
            bindparam("done_versions", type_=ARRAY(Text)),
            bindparam("done_predict_cpu_s", type_=ARRAY(Float)),
            bindparam("done_champion_cpu_s", type_=ARRAY(Float)),
        )
        .table_valued(
            column("subtask_id", BigInteger),
            column("attempt", Integer),
            column("output", LargeBinary),
            column("bin_counts", LargeBinary),
            column("model_version", Text),
            column("predict_cpu_s", Float),
            column("champion_cpu_s", Float),
        )
        .render_derived(name="done_rows")
    )
    done = (
        update(Subtask)
        .where(
            Subtask.id == done_rows.c.subtask_id,
            Subtask.state == SubtaskState.running,
            Subtask.attempts == done_rows.c.attempt,
        )
        .values(
            state=SubtaskState.succeeded,
            output=done_rows.c.output,
            bin_counts=done_rows.c.bin_counts,
            error=None,
            model_version=done_rows.c.model_version,
            predict_cpu_s=done_rows.c.predict_cpu_s,
            champion_cpu_s=done_rows.c.champion_cpu_s,
            finished_at=now(),
            lease_until=None,
        )
        .returning(Subtask.id, Subtask.batch_id, Subtask.role, *subtask_output_columns(Subtask))
        .cte("done")
    )
    # A shadow sub-task only stores its output: it adds 0 (the batch row is still returned,
    # so a shadow finishing after its batch is recorded as well).
    counted = (
        select(done.c.batch_id, func.count().filter(done.c.role == SubtaskRole.serve).label("serves"))
        .group_by(done.c.batch_id)
        .cte("counted")
    )
    batch = (
        counting(succeeded=counted.c.serves, failed=0)
        .where(Batch.id == counted.c.batch_id)
        .returning(counted.c.serves)
        .cte("counted_batch")
    )
    # The batch's serve sub-tasks as the statement leaves them: those it completed as it
    # completed them, the others as its snapshot sees them.
    others = aliased(Subtask)
    outputs = union_all(
        select(*(column for column in done.c if column.name.startswith("subtask_"))).where(
            done.c.role == SubtaskRole.serve
        ),
        select(*subtask_output_columns(others)).where(
            others.batch_id == bindparam("of_batch"),
            others.role == SubtaskRole.serve,
            others.id.not_in(select(done.c.id)),
        ),
    ).subquery("outputs")
    # When it made a one-page batch of at most :read_items inputs due (one the worker's turn
    # aggregates), the aggregate's read of it, as `ONE_PAGE_DUE` reads it: the turn finishes
    # the batch without reading it again.
    read = one_page_read(
        batch,
        outputs,
        batch.c.state == BatchState.aggregating,
        batch.c.complete,
        batch.c["items"] <= bindparam("read_items"),
        AGGREGATION_FREE,
    )
    return (
        select(batch, read)
        .select_from(batch)
        .outerjoin(read, true())
        .order_by(*one_page_order(read))
        .execution_options(**BINARY_RESULTS)
    )


COMPLETE = _complete_statement()


def complete_subtasks(bind: Bind, completions: Sequence[Completion], read_items: int = 0) -> Outcome:
    """`running` → `succeeded` for each of `completions` (sub-tasks of one batch), only for
    the claim it holds, and the batch counter for those recorded: one statement (committed
    on its own on an Engine or an autocommit Connection). `recorded` when any was. When they
    made a batch of one input page and at most `read_items` inputs due for aggregation, the
    outcome's `due` is its aggregate's read (`one_page_batch_due`), made by the same
    statement (None when the statement's snapshot missed a sub-task another completion
    finished meanwhile)."""
    parameters = {
        "of_batch": completions[0].claim.batch_id,
        "read_items": read_items,
        "done_ids": [done.claim.subtask_id for done in completions],
        "done_attempts": [done.claim.attempt for done in completions],
        "done_outputs": [done.output for done in completions],
        "done_bin_counts": [done.bin_counts for done in completions],
        "done_versions": [done.model_version for done in completions],
        "done_predict_cpu_s": [done.predict_cpu_s for done in completions],
        "done_champion_cpu_s": [done.champion_cpu_s for done in completions],
    }
    assert all(done.claim.batch_id == parameters["of_batch"] for done in completions), "sub-tasks of one batch"
    with connected(bind) as conn:
        rows = conn.execute(COMPLETE, parameters).all()
    if not rows:
        return Outcome(recorded=False)
    counted = rows[0]
    aggregate = counted.serves > 0 and must_aggregate(counted)
    return Outcome(recorded=True, aggregate=aggregate, due=one_page_batch(rows) if aggregate else None)


def complete_subtask(
    bind: Bind,
    claim: Claim,
    output: bytes,
    model_version: str,
    bin_counts: bytes | None,
    *,
    predict_cpu_s: float | None = None,
    champion_cpu_s: float | None = None,
) -> Outcome:
    """`complete_subtasks` of one sub-task."""
    return complete_subtasks(
        bind, [Completion(claim, output, model_version, bin_counts, predict_cpu_s, champion_cpu_s)]
    )


def fail_subtask(bind: Bind, claim: Claim, error: str, retry: bool, lease_s: float) -> Outcome:
    """`running` → `pending` (when `retry`, to run again) or → `failed` with the batch counter,
    in one transaction (`transaction`: of Engine `bind`, or on autocommit Connection `bind`)."""
    with transaction(bind) as conn:
        guard = and_(
            Subtask.id == claim.subtask_id,
            Subtask.state == SubtaskState.running,
            Subtask.attempts == claim.attempt,
        )
        if retry:
            again = conn.execute(
                update(Subtask)
                .where(guard)
                .values(state=SubtaskState.pending, error=error, lease_until=now() + timedelta(seconds=lease_s))
                .returning(Subtask.id)
            ).first()
            return Outcome(recorded=again is not None)
        failed = conn.execute(
            update(Subtask)
            .where(guard)
            .values(state=SubtaskState.failed, error=error, finished_at=now(), lease_until=None)
            .returning(Subtask.id)
        ).first()
        if failed is None:
            return Outcome(recorded=False)
        if claim.role == SubtaskRole.shadow:
            return Outcome(recorded=True)
        return Outcome(recorded=True, aggregate=count_finished(conn, claim.batch_id, succeeded=0, failed=1))

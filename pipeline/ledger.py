"""The batch ledger: every state change of batches and sub-tasks.

PostgreSQL is the source of truth. Each transition is one statement guarded by
the state it expects; when it matches no row the caller lost a race or holds a
duplicate message, and does nothing more. Bulk writes use COPY.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib.resources import files
from typing import Any

import numpy as np
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Engine,
    Float,
    Integer,
    Interval,
    LargeBinary,
    Row,
    Select,
    Text,
    Update,
    and_,
    bindparam,
    case,
    cast,
    create_engine,
    func,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import aliased

from pipeline.definition import InputPage
from pipeline.schema import Batch, BatchState, FailurePolicy, ResultPage, StoredInputPage, Subtask, SubtaskState
from pipeline.settings import sqlalchemy_url

NOTIFY_CHANNEL = "batch_finished"
FAIL_FAST_REASON = "fail_fast: a sub-task failed"
DEADLINE_REASON = "deadline passed"


def too_many_failures_reason(max_failed_fraction: float) -> str:
    return f"more than {max_failed_fraction:.0%} of the sub-tasks failed"


UNFINISHED_SUBTASK_STATES = (SubtaskState.pending, SubtaskState.dispatched, SubtaskState.running)


def make_engine(database_url: str) -> Engine:
    return create_engine(sqlalchemy_url(database_url), pool_pre_ping=True)


def migrate(database_url: str) -> None:
    """Apply every Alembic migration to the database at `database_url`."""
    config = Config()
    config.set_main_option("script_location", str(files("migrations")))
    # configparser interpolates '%': escape it (percent-encoded passwords).
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    command.upgrade(config, "head")


def _now() -> Any:
    # clock_timestamp, not now(): a long transaction must not stamp its start time.
    return func.clock_timestamp()


def _autocommit(engine: Engine) -> Connection:
    """A connection on which each statement commits on its own: a transition or a read that
    is one statement costs one round trip, with no BEGIN and COMMIT (or ROLLBACK) around it."""
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def _copy_rows(
    conn: Connection, statement: str, rows: Iterable[Sequence[Any]], binary_types: Sequence[str] | None = None
) -> int:
    """COPY `rows` with `statement` (COPY ... FROM STDIN) on `conn`'s transaction; return the count.

    With `binary_types` (the PostgreSQL type of each column) the rows go in binary
    format: packed float32 bytes are sent as they are instead of hex-escaped.
    """
    count = 0
    if binary_types is not None:
        statement += " (FORMAT BINARY)"
    with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
        with cursor.copy(statement) as copy:
            if binary_types is not None:
                copy.set_types(list(binary_types))
            for row in rows:
                copy.write_row(row)
                count += 1
    return count


# --- client -------------------------------------------------------------------------------


INSERT_BATCH = (
    pg_insert(Batch)
    .values(
        id=bindparam("id"),
        pipeline=bindparam("pipeline"),
        items=bindparam("items"),
        idempotency_key=bindparam("idempotency_key"),
        failure_policy=bindparam("failure_policy"),
        max_failed_fraction=bindparam("max_failed_fraction", type_=Float),
        # NULL without a deadline.
        deadline_at=_now() + bindparam("deadline", type_=Interval),
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
) -> tuple[uuid.UUID, bool]:
    """Insert a `pending` batch and its input pages on `conn`'s transaction.

    Returns (batch id, created). With an `idempotency_key` already used, returns the
    existing batch and writes nothing.

    Raises:
        ValueError: the key belongs to a batch of another pipeline.
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
            "max_failed_fraction": max_failed_fraction,
            "deadline": None if deadline_s is None else timedelta(seconds=deadline_s),
        },
    ).scalar_one_or_none()
    if inserted is None:
        existing_id, existing_pipeline = conn.execute(
            select(Batch.id, Batch.pipeline).where(Batch.idempotency_key == idempotency_key)
        ).one()
        if existing_pipeline != pipeline:
            raise ValueError(
                f"idempotency_key {idempotency_key!r} already names a {existing_pipeline!r} batch, not {pipeline!r}"
            )
        return existing_id, False
    _copy_rows(
        conn,
        "COPY input_pages (batch_id, first_item, items, features, data) FROM STDIN",
        ((batch_id, page.first, page.count, _packed(page.X), page.data) for page in pages),
        binary_types=("uuid", "int4", "int4", "bytea", "json"),
    )
    return batch_id, True


def _packed(X: np.ndarray | None) -> bytes | None:
    return None if X is None else np.ascontiguousarray(X, dtype="<f4").tobytes()


def batch_status_row(engine: Engine, batch_id: uuid.UUID) -> dict[str, Any] | None:
    """The `batch_status` view's row of one batch, plus its result and metrics."""
    with _autocommit(engine) as conn:
        row = (
            conn.execute(
                text("SELECT s.*, b.result, b.metrics FROM batch_status s JOIN batches b USING (id) WHERE s.id = :id"),
                {"id": batch_id},
            )
            .mappings()
            .first()
        )
    return dict(row) if row is not None else None


def batch_status_rows(engine: Engine, state: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` rows of the `batch_status` view, optionally of one state."""
    with _autocommit(engine) as conn:
        rows = (
            conn.execute(
                text(
                    "SELECT s.*, b.result, b.metrics FROM batch_status s JOIN batches b USING (id)"
                    " WHERE CAST(:state AS text) IS NULL OR s.state = :state"
                    " ORDER BY s.created_at DESC LIMIT :limit"
                ),
                {"state": state, "limit": limit},
            )
            .mappings()
            .all()
        )
    return [dict(row) for row in rows]


@dataclass(frozen=True)
class StoredResult:
    """One input's row of the `results` view."""

    item: int
    output: dict[str, Any] | None
    error: str | None


# A batch's next result page after an item, and whether it holds the batch's last input.
RESULT_PAGE = (
    select(
        ResultPage.first_item,
        ResultPage.outputs,
        ResultPage.errors,
        (
            ResultPage.first_item + ResultPage.items
            >= select(Batch.items).where(Batch.id == ResultPage.batch_id).scalar_subquery()
        ).label("last"),
    )
    .where(ResultPage.batch_id == bindparam("batch_id"), ResultPage.first_item > bindparam("after"))
    .order_by(ResultPage.first_item)
    .limit(1)
)


def iter_results(engine: Engine, batch_id: uuid.UUID) -> Iterator[StoredResult]:
    """Yield a batch's results in item order, one page per query (no query after the last page)."""
    after = -1
    while True:
        with _autocommit(engine) as conn:
            page = conn.execute(RESULT_PAGE, {"batch_id": batch_id, "after": after}).first()
        if page is None:
            return
        errors = page.errors or [None] * len(page.outputs)
        for index, (output, error) in enumerate(zip(page.outputs, errors)):
            yield StoredResult(page.first_item + index, output, error)
        if page.last:
            return
        after = page.first_item


def first_subtask_started(engine: Engine, batch_id: uuid.UUID) -> datetime | None:
    """When a worker first started a sub-task of the batch; None before any did."""
    with _autocommit(engine) as conn:
        return conn.execute(select(func.min(Subtask.started_at)).where(Subtask.batch_id == batch_id)).scalar_one()


def _cancel_subtasks(conn: Connection, batch_id: uuid.UUID, states: Sequence[SubtaskState]) -> int:
    """Cancel a batch's sub-tasks in `states` and count them in `batches.cancelled`; return how many.

    The caller must have locked (updated) the batch row in this transaction.
    """
    count = conn.execute(
        update(Subtask)
        .where(Subtask.batch_id == batch_id, Subtask.state.in_(states))
        .values(state=SubtaskState.cancelled, finished_at=_now(), lease_until=None)
    ).rowcount
    if count:
        conn.execute(update(Batch).where(Batch.id == batch_id).values(cancelled=Batch.cancelled + count))
    return count


def _counters_complete() -> Any:
    return Batch.succeeded + Batch.failed + Batch.cancelled == Batch.total


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
            .values(state=BatchState.cancelled, finished_at=_now())
            .returning(Batch.id)
        ).first()
        if cancelled is None:
            return Outcome(recorded=False)
        _cancel_subtasks(conn, batch_id, (SubtaskState.pending, SubtaskState.dispatched))
        complete = conn.execute(select(_counters_complete()).where(Batch.id == batch_id)).scalar_one()
    return Outcome(recorded=True, aggregate=bool(complete))


# --- splitter -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NewSubtask:
    model: str
    seq: int
    max_attempts: int
    items: np.ndarray
    # None: the rows are the inputs' stored features (`ModelRows.of_inputs`).
    payload: bytes | None

    @property
    def rows(self) -> int:
        return len(self.items)


# Every split step runs these (a small batch's in its client): built once.
LOCK_PENDING_BATCH = (
    select(Batch.__table__)
    .where(Batch.id == bindparam("batch_id"), Batch.state == BatchState.pending)
    .with_for_update()
)
NEW_SUBTASK_IDS = text(
    "SELECT s.id, s.model FROM subtasks s"
    " JOIN unnest(CAST(:models AS text[]), CAST(:first_seqs AS int[])) AS f (model, first_seq)"
    " ON s.model = f.model AND s.seq >= f.first_seq"
    " WHERE s.batch_id = :batch_id ORDER BY s.seq, s.model"
)


def _record_split_statement(finished: bool) -> Update:
    total = Batch.total + bindparam("created")
    complete = Batch.succeeded + Batch.failed + Batch.cancelled == total
    values: dict[str, Any] = {"split_items": bindparam("split_items"), "total": total}
    if finished:
        values |= {
            "state": case((complete, BatchState.aggregating.value), else_=BatchState.running.value),
            "started_at": _now(),
            "aggregating_at": case((complete, _now()), else_=None),
        }
    return (
        update(Batch)
        .where(Batch.id == bindparam("batch_id"), Batch.state == BatchState.pending)
        .values(**values)
        .returning(Batch.state)
    )


RECORD_SPLIT = {finished: _record_split_statement(finished) for finished in (False, True)}


def lock_pending_batch(conn: Connection, batch_id: uuid.UUID) -> Row[Any] | None:
    """Lock a `pending` batch's row for splitting; None when it is not pending (split, or cancelled)."""
    return conn.execute(LOCK_PENDING_BATCH, {"batch_id": batch_id}).first()


# The stored input page holding input `position` or, past a gap, the next one.
INPUT_PAGE = (
    select(StoredInputPage.first_item, StoredInputPage.items, StoredInputPage.features, StoredInputPage.data)
    .where(
        StoredInputPage.batch_id == bindparam("batch_id"),
        StoredInputPage.first_item + StoredInputPage.items > bindparam("position"),
    )
    .order_by(StoredInputPage.first_item)
    .limit(1)
)


def input_pages(
    conn: Connection, batch_id: uuid.UUID, n_features: int, first_item: int = 0, limit_items: int | None = None
) -> Iterator[InputPage]:
    """Yield a batch's inputs from `first_item` on (at most `limit_items` of them) as pages,
    in item order, one stored page per query; a page is cut where the range starts or ends."""
    position = first_item
    end = None if limit_items is None else first_item + limit_items
    while end is None or position < end:
        row = conn.execute(INPUT_PAGE, {"batch_id": batch_id, "position": position}).first()
        if row is None:
            return
        page = InputPage.from_stored(row.first_item, row.items, row.features, row.data, n_features)
        stop = page.first + page.count if end is None else min(end, page.first + page.count)
        yield page.cut(max(position, page.first), stop)
        position = stop


def next_seqs(conn: Connection, batch_id: uuid.UUID) -> dict[str, int]:
    """Per model, the `seq` the batch's next sub-task gets."""
    rows = conn.execute(
        select(Subtask.model, func.max(Subtask.seq) + 1).where(Subtask.batch_id == batch_id).group_by(Subtask.model)
    ).all()
    return {model: seq for model, seq in rows}


INT4_OID = 23


def _int4_array(values: np.ndarray) -> bytes:
    """`values` (not empty) in the binary COPY form of a one-dimensional PostgreSQL int4[]:
    written with numpy, as psycopg's generic list dumper costs a Python call per element."""
    header = struct.pack(">iiIii", 1, 0, INT4_OID, len(values), 1)
    elements = np.empty((len(values), 2), dtype=">i4")
    elements[:, 0] = 4  # each element's byte length
    elements[:, 1] = values
    return header + elements.tobytes()


def copy_subtasks(conn: Connection, batch_id: uuid.UUID, subtasks: Sequence[NewSubtask]) -> list[tuple[int, str]]:
    """Insert sub-tasks as `dispatched` with one COPY; return their (id, model) to publish.

    Their lease runs from `queued_at`: if the messages are never published (a crash
    after commit), the sweeper publishes them once it expires.
    """
    _copy_rows(
        conn,
        "COPY subtasks (batch_id, model, seq, max_attempts, rows, items, payload, state) FROM STDIN",
        (
            (
                batch_id,
                s.model,
                s.seq,
                s.max_attempts,
                s.rows,
                _int4_array(s.items),
                s.payload,
                SubtaskState.dispatched.value,
            )
            for s in subtasks
        ),
        # `items` goes as bytes already in int4[]'s binary form (see _int4_array).
        binary_types=("uuid", "text", "int4", "int4", "int4", "bytea", "bytea", "text"),
    )
    first_seqs: dict[str, int] = {}
    for subtask in subtasks:
        first_seqs.setdefault(subtask.model, subtask.seq)
    if not first_seqs:
        return []
    rows = conn.execute(
        NEW_SUBTASK_IDS,
        {"batch_id": batch_id, "models": list(first_seqs), "first_seqs": list(first_seqs.values())},
    ).all()
    return [(row.id, row.model) for row in rows]


def record_split(conn: Connection, batch_id: uuid.UUID, split_items: int, created: int, finished: bool) -> bool:
    """Count a committed split step on the locked `pending` batch: `split_items` inputs are
    split, `created` more sub-tasks exist. With `finished`, the batch becomes `running`, or
    `aggregating` when every sub-task is already counted (or there is none).

    Returns True when the batch must now be aggregated.
    """
    state = conn.execute(
        RECORD_SPLIT[finished], {"batch_id": batch_id, "split_items": split_items, "created": created}
    ).scalar_one()
    return state == BatchState.aggregating


def fail_pending_batch(conn: Connection, batch_id: uuid.UUID, error: str) -> None:
    """`pending` → `failed` when the batch cannot be split, cancelling the sub-tasks an
    earlier split step made; NOTIFY waiting clients on commit."""
    failed = conn.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state == BatchState.pending)
        .values(state=BatchState.failed, error=error, finished_at=_now())
        .returning(Batch.id)
    ).first()
    if failed is not None:
        _cancel_subtasks(conn, batch_id, UNFINISHED_SUBTASK_STATES)
    conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, str(batch_id))))


# --- worker -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A worker's hold on a running sub-task; `attempt` is its claim token."""

    subtask_id: int
    batch_id: uuid.UUID
    model: str
    attempt: int
    max_attempts: int
    rows: int
    payload: bytes
    # Inputs of the sub-task's batch.
    batch_items: int


@dataclass(frozen=True)
class Outcome:
    """What a finishing transition did: `recorded` is False for a stale claim or duplicate;
    `aggregate` is True for the one transaction that completed the batch."""

    recorded: bool
    aggregate: bool = False


def _claim_statement(*claimable: Any) -> Select[Any]:
    """The claim of the sub-task matching `claimable` (conditions on `Subtask`), returning
    what `Claim` holds."""
    now = _now()
    claimed = (
        update(Subtask)
        .where(*claimable)
        .values(
            state=SubtaskState.running,
            attempts=Subtask.attempts + 1,
            worker=bindparam("worker"),
            started_at=now,
            lease_until=now + bindparam("lease", type_=Interval),
        )
        .returning(
            Subtask.id,
            Subtask.batch_id,
            Subtask.model,
            Subtask.attempts,
            Subtask.max_attempts,
            Subtask.rows,
            Subtask.payload,
            Subtask.items[1].label("first_item"),
        )
        .cte("claimed")
    )
    # Inputs first_item .. first_item + rows - 1, cut from the input pages that hold them.
    page = StoredInputPage
    # Bytes per input: an exact division (SQLAlchemy's `/` on integers is true division).
    width = cast(func.length(page.features) / page.items, Integer)
    lo = func.greatest(claimed.c.first_item, page.first_item) - page.first_item
    hi = func.least(claimed.c.first_item + claimed.c.rows, page.first_item + page.items) - page.first_item
    input_features = (
        select(
            func.string_agg(
                func.substring(page.features, lo * width + 1, (hi - lo) * width),
                aggregate_order_by(literal(b"", LargeBinary), page.first_item),
            )
        )
        .where(
            claimed.c.payload.is_(None),
            page.batch_id == claimed.c.batch_id,
            page.first_item < claimed.c.first_item + claimed.c.rows,
            page.first_item + page.items > claimed.c.first_item,
        )
        .scalar_subquery()
    )
    return select(
        claimed.c.id,
        claimed.c.batch_id,
        claimed.c.model,
        claimed.c.attempts,
        claimed.c.max_attempts,
        claimed.c.rows,
        func.coalesce(claimed.c.payload, input_features).label("payload"),
        select(Batch.items).where(Batch.id == claimed.c.batch_id).scalar_subquery().label("batch_items"),
    )


# The workers' hot path: statements built once, executed with bound parameters (building
# one costs more than running it).
CLAIM = _claim_statement(
    Subtask.id == bindparam("subtask_id"),
    Subtask.attempts < Subtask.max_attempts,
    or_(
        Subtask.state.in_((SubtaskState.pending, SubtaskState.dispatched)),
        and_(Subtask.state == SubtaskState.running, Subtask.lease_until < _now()),
    ),
)
_waiting = aliased(Subtask)
CLAIM_NEXT_OF_BATCH = _claim_statement(
    Subtask.id
    == select(_waiting.id)
    .where(
        _waiting.batch_id == bindparam("of_batch"),
        _waiting.model == func.any(bindparam("models", type_=ARRAY(Text))),
        _waiting.state == SubtaskState.dispatched,
        _waiting.attempts < _waiting.max_attempts,
    )
    .order_by(_waiting.seq)
    .limit(1)
    .with_for_update(skip_locked=True)
    .scalar_subquery(),
    # Checked again on the row the UPDATE locks: it may have been claimed meanwhile.
    Subtask.state == SubtaskState.dispatched,
)


def claim_subtask(engine: Engine, subtask_id: int, worker: str, lease_s: float) -> Claim | None:
    """`pending`/`dispatched` (or `running` past its lease) → `running`, attempts + 1, in one
    statement that also returns the rows to score: the sub-task's payload, or the slice of
    its batch's stored input features that it names (`ModelRows.of_inputs`).

    Returns None when the sub-task is finished, cancelled, or leased by another worker.
    """
    return _claim(engine, CLAIM, {"subtask_id": subtask_id, "worker": worker, "lease": timedelta(seconds=lease_s)})


def claim_next_of_batch(
    engine: Engine, batch_id: uuid.UUID, models: Sequence[str], worker: str, lease_s: float
) -> Claim | None:
    """Claim the batch's first `dispatched` sub-task for one of `models`, like `claim_subtask`
    (its message, when it comes, finds it claimed and is dropped); None when there is none."""
    return _claim(
        engine,
        CLAIM_NEXT_OF_BATCH,
        {"of_batch": batch_id, "models": list(models), "worker": worker, "lease": timedelta(seconds=lease_s)},
    )


def _claim(engine: Engine, statement: Select[Any], parameters: dict[str, Any]) -> Claim | None:
    with _autocommit(engine) as conn:
        row = conn.execute(statement, parameters).first()
    if row is None:
        return None
    return Claim(
        row.id, row.batch_id, row.model, row.attempts, row.max_attempts, row.rows, row.payload, row.batch_items
    )


def _counting(succeeded: int, failed: int) -> Update:
    """The UPDATE (its WHERE is the caller's) that adds to a batch's counters and flips it
    `running` → `aggregating` when they reach the total, returning what `_must_aggregate`
    and the failure policies decide on. Counters only grow and each sub-task is counted
    once, so exactly one statement sees them reach the total."""
    complete = Batch.succeeded + succeeded + Batch.failed + failed + Batch.cancelled == Batch.total
    flips = and_(Batch.state == BatchState.running, complete)
    return (
        update(Batch)
        .values(
            succeeded=Batch.succeeded + succeeded,
            failed=Batch.failed + failed,
            state=case((flips, BatchState.aggregating.value), else_=Batch.state),
            aggregating_at=case((flips, _now()), else_=Batch.aggregating_at),
        )
        .returning(
            Batch.state,
            _counters_complete().label("complete"),
            Batch.aggregate_runs,
            Batch.failure_policy,
            Batch.max_failed_fraction,
            Batch.failed,
            Batch.total,
        )
    )


def _must_aggregate(counted: Row[Any]) -> bool:
    """After a count: True when it completed the batch, either flipping it to `aggregating`
    or finishing the last running sub-task of a cancelled batch."""
    return bool(counted.complete) and (
        counted.state == BatchState.aggregating
        or (counted.state == BatchState.cancelled and counted.aggregate_runs == 0)
    )


def _count_finished(conn: Connection, batch_id: uuid.UUID, succeeded: int, failed: int) -> bool:
    """Add to a batch's counters (`_counting`), or abort the batch when its failure policy
    says so. Returns True for the one call after which the batch must be aggregated."""
    row = conn.execute(_counting(succeeded, failed).where(Batch.id == batch_id)).one()
    # While the split is still committing steps the batch is `pending`: it may abort too.
    if not row.complete and failed and row.state in (BatchState.pending, BatchState.running):
        if row.failure_policy == FailurePolicy.fail_fast:
            return _abort_batch(conn, batch_id, FAIL_FAST_REASON)
        if row.max_failed_fraction is not None and row.failed > row.max_failed_fraction * row.total:
            return _abort_batch(conn, batch_id, too_many_failures_reason(row.max_failed_fraction))
    return _must_aggregate(row)


def _abort_batch(conn: Connection, batch_id: uuid.UUID, reason: str) -> bool:
    """`pending`/`running` → `aggregating` with `reason`, cancelling every unfinished sub-task
    (a running one's late completion is then refused). Returns True when it aborted."""
    aborted = conn.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state.in_((BatchState.pending, BatchState.running)))
        .values(state=BatchState.aggregating, aggregating_at=_now(), error=reason)
        .returning(Batch.id)
    ).first()
    if aborted is None:
        return False
    _cancel_subtasks(conn, batch_id, UNFINISHED_SUBTASK_STATES)
    return True


def _complete_statement() -> Update:
    done = (
        update(Subtask)
        .where(
            Subtask.id == bindparam("subtask_id"),
            Subtask.state == SubtaskState.running,
            Subtask.attempts == bindparam("attempt"),
        )
        .values(
            state=SubtaskState.succeeded,
            output=bindparam("output", type_=LargeBinary),
            bin_counts=bindparam("bin_counts", type_=LargeBinary),
            error=None,
            model_version=bindparam("model_version"),
            finished_at=_now(),
            lease_until=None,
        )
        .returning(Subtask.batch_id)
        .cte("done")
    )
    return _counting(succeeded=1, failed=0).where(Batch.id == done.c.batch_id)


COMPLETE = _complete_statement()


def complete_subtask(
    engine: Engine, claim: Claim, output: bytes, model_version: str, bin_counts: bytes | None
) -> Outcome:
    """`running` → `succeeded` with its output and drift bin counts, only for the claim
    `claim` holds, and the batch counter: one statement, committed on its own."""
    parameters = {
        "subtask_id": claim.subtask_id,
        "attempt": claim.attempt,
        "output": output,
        "bin_counts": bin_counts,
        "model_version": model_version,
    }
    with _autocommit(engine) as conn:
        counted = conn.execute(COMPLETE, parameters).first()
    if counted is None:
        return Outcome(recorded=False)
    return Outcome(recorded=True, aggregate=_must_aggregate(counted))


def fail_subtask(engine: Engine, claim: Claim, error: str, retry: bool, lease_s: float) -> Outcome:
    """`running` → `pending` (when `retry`, to run again) or → `failed` with the batch counter."""
    with engine.begin() as conn:
        guard = and_(
            Subtask.id == claim.subtask_id,
            Subtask.state == SubtaskState.running,
            Subtask.attempts == claim.attempt,
        )
        if retry:
            again = conn.execute(
                update(Subtask)
                .where(guard)
                .values(state=SubtaskState.pending, error=error, lease_until=_now() + timedelta(seconds=lease_s))
                .returning(Subtask.id)
            ).first()
            return Outcome(recorded=again is not None)
        failed = conn.execute(
            update(Subtask)
            .where(guard)
            .values(state=SubtaskState.failed, error=error, finished_at=_now(), lease_until=None)
            .returning(Subtask.id)
        ).first()
        if failed is None:
            return Outcome(recorded=False)
        return Outcome(recorded=True, aggregate=_count_finished(conn, claim.batch_id, succeeded=0, failed=1))


# --- aggregator ---------------------------------------------------------------------------


def _aggregate_due() -> Any:
    """Batches whose results are still to be assembled."""
    return or_(
        Batch.state == BatchState.aggregating,
        and_(Batch.state == BatchState.cancelled, Batch.aggregate_runs == 0, _counters_complete()),
    )


# Every aggregate runs these: built once, executed with bound parameters.
LOCK_AGGREGATING_BATCH = (
    select(Batch.__table__).where(Batch.id == bindparam("batch_id"), _aggregate_due()).with_for_update()
)
# pg_try_advisory_xact_lock class of the per-batch aggregation lock (the key is the batch id's hash).
AGGREGATE_LOCK_CLASS = 7_240_114
TRY_LOCK_AGGREGATION = select(
    func.pg_try_advisory_xact_lock(AGGREGATE_LOCK_CLASS, func.hashtext(bindparam("batch_text", type_=Text)))
)


def lock_aggregating_batch(conn: Connection, batch_id: uuid.UUID) -> Row[Any] | None:
    """Lock the row of a batch due for aggregation (`aggregating`, or `cancelled` with no
    sub-task left running and no results yet); None when it is not (a duplicate)."""
    return conn.execute(LOCK_AGGREGATING_BATCH, {"batch_id": batch_id}).first()


def try_lock_aggregation(conn: Connection, batch_id: uuid.UUID) -> bool:
    """Take the batch's aggregation lock for this transaction; False when another
    aggregation of the batch holds it (a duplicate message, or one started early)."""
    return conn.execute(TRY_LOCK_AGGREGATION, {"batch_text": str(batch_id)}).scalar_one()


def batch_state(conn: Connection, batch_id: uuid.UUID) -> BatchState | None:
    """The batch's state; None when there is no such batch."""
    state = conn.execute(select(Batch.state).where(Batch.id == batch_id)).scalar_one_or_none()
    return None if state is None else BatchState(state)


def running_batch(conn: Connection, batch_id: uuid.UUID) -> Row[Any] | None:
    """A `running` batch whose split is finished (its results may be assembled as its
    sub-tasks finish), unlocked; None otherwise."""
    return conn.execute(
        select(Batch.__table__).where(
            Batch.id == batch_id, Batch.state == BatchState.running, Batch.split_items == Batch.items
        )
    ).first()


def unfinished_before(conn: Connection, batch_id: uuid.UUID, item: int) -> bool:
    """True while a sub-task of the batch holding rows of an input before `item` is unfinished."""
    return conn.execute(
        select(
            select(Subtask.id)
            .where(
                Subtask.batch_id == batch_id,
                Subtask.state.in_(UNFINISHED_SUBTASK_STATES),
                Subtask.items[1] < item,
            )
            .exists()
        )
    ).scalar_one()


@dataclass(frozen=True)
class SubtaskOutput:
    seq: int
    items: np.ndarray
    output: bytes | None
    error: str | None


# Per model (after a `seq` of its own), the sub-tasks of a batch that start before an input:
# one query for every model, each read in `seq` order through the (batch_id, model, seq) index.
SUBTASK_OUTPUTS = text(
    "SELECT c.model, c.seq, c.items, c.output, c.error, c.state"
    " FROM unnest(CAST(:models AS text[]), CAST(:after_seqs AS int[])) AS m (model, after_seq)"
    " CROSS JOIN LATERAL ("
    "  SELECT s.model, s.seq, s.items, s.output, s.error, s.state FROM subtasks s"
    "  WHERE s.batch_id = :batch_id AND s.model = m.model AND s.seq > m.after_seq AND s.items[1] < :before_item"
    "  ORDER BY s.seq LIMIT :limit"
    " ) AS c"
    " ORDER BY c.model, c.seq"
)


def subtask_outputs(
    conn: Connection, batch_id: uuid.UUID, after_seqs: dict[str, int], before_item: int, limit: int
) -> dict[str, list[SubtaskOutput]]:
    """Per model of `after_seqs`, up to `limit` of its sub-tasks of a batch after its `seq`
    there, in `seq` (hence item) order, that start before input `before_item`: their
    outputs, or why they have none."""
    rows = conn.execute(
        SUBTASK_OUTPUTS,
        {
            "models": list(after_seqs),
            "after_seqs": list(after_seqs.values()),
            "batch_id": batch_id,
            "before_item": before_item,
            "limit": limit,
        },
    )
    outputs: dict[str, list[SubtaskOutput]] = {model: [] for model in after_seqs}
    for row in rows:
        succeeded = row.state == SubtaskState.succeeded
        error = "cancelled" if row.state == SubtaskState.cancelled else None if succeeded else row.error
        outputs[row.model].append(
            SubtaskOutput(row.seq, np.asarray(row.items), row.output if succeeded else None, error)
        )
    return outputs


def copy_result_page(
    conn: Connection, batch_id: uuid.UUID, first: int, outputs: Sequence[str | None], errors: Sequence[str | None]
) -> None:
    """Store the results of inputs `first` .. `first + len(outputs) - 1`: per input its
    output as JSON text, or None and in `errors` why it has none."""
    outputs_json = "[" + ",".join("null" if output is None else output for output in outputs) + "]"
    errors_json = json.dumps(list(errors)) if any(error is not None for error in errors) else None
    _copy_rows(
        conn,
        "COPY result_pages (batch_id, first_item, items, outputs, errors) FROM STDIN",
        [(batch_id, first, len(outputs), outputs_json, errors_json)],
    )


def finish_batch(
    conn: Connection,
    batch_id: uuid.UUID,
    state: BatchState,
    error: str | None,
    result: dict[str, Any],
    metrics: dict[str, Any],
) -> None:
    """`aggregating` → final state (a cancelled batch stays `cancelled`) with result and
    metrics, counted in `aggregate_runs`; NOTIFY waiting clients on commit."""
    conn.execute(
        FINISH_BATCH,
        {"batch_id": batch_id, "state": state.value, "error": error, "result": result, "metrics": metrics},
    )


FINISH_BATCH = (
    update(Batch)
    .where(Batch.id == bindparam("batch_id"), _aggregate_due())
    .values(
        state=bindparam("state", type_=Text),
        error=bindparam("error", type_=Text),
        result=bindparam("result", type_=JSONB),
        metrics=bindparam("metrics", type_=JSONB),
        finished_at=case((Batch.state == BatchState.cancelled, Batch.finished_at), else_=_now()),
        aggregate_runs=Batch.aggregate_runs + 1,
    )
    .returning(func.pg_notify(NOTIFY_CHANNEL, cast(Batch.id, Text)))
)


# --- sweeper ------------------------------------------------------------------------------

# pg_try_advisory_xact_lock key: one sweep at a time across every aggregator process.
SWEEP_LOCK_KEY = 7_240_113


@dataclass(frozen=True)
class Sweep:
    """What one sweep found: messages to publish again, and how many sub-tasks it gave up on."""

    predict: list[tuple[int, str]]
    split: list[uuid.UUID]
    aggregate: list[uuid.UUID]
    gave_up: int


def sweep(engine: Engine, lease_s: float, limit: int = 20_000) -> Sweep | None:
    """Reconcile the ledger with what should be in flight, in one transaction.

    - batches past their deadline are finished with what they have;
    - `running` sub-tasks whose lease expired on their last attempt become `failed`;
    - unfinished sub-tasks whose lease expired go back to `dispatched` with a new lease
      (at most `limit`), to be published again;
    - batches still `pending` a lease after submission are split again;
    - batches due for aggregation for longer than a lease are aggregated again.

    Returns None when another process holds the sweep lock. Publishing the returned
    messages is the caller's job, after this commits.
    """
    lease = timedelta(seconds=lease_s)
    now = _now()
    aggregate: list[uuid.UUID] = []
    with engine.begin() as conn:
        if not conn.execute(select(func.pg_try_advisory_xact_lock(SWEEP_LOCK_KEY))).scalar_one():
            return None
        overdue = conn.execute(
            select(Batch.id).where(Batch.state.in_((BatchState.pending, BatchState.running)), Batch.deadline_at < now)
        ).scalars()
        aggregate += [batch_id for batch_id in overdue.all() if _abort_batch(conn, batch_id, DEADLINE_REASON)]

        lost = (
            conn.execute(
                update(Subtask)
                .where(
                    Subtask.state == SubtaskState.running,
                    Subtask.lease_until < now,
                    Subtask.attempts >= Subtask.max_attempts,
                )
                .values(
                    state=SubtaskState.failed,
                    error=func.concat(
                        Subtask.error, "lease expired on the last attempt (", Subtask.attempts, "): worker lost"
                    ),
                    finished_at=now,
                    lease_until=None,
                )
                .returning(Subtask.batch_id)
            )
            .scalars()
            .all()
        )
        for batch_id in set(lost):
            if _count_finished(conn, batch_id, succeeded=0, failed=lost.count(batch_id)):
                aggregate.append(batch_id)

        expired = (
            select(Subtask.id)
            .where(
                Subtask.state.in_(UNFINISHED_SUBTASK_STATES),
                func.coalesce(Subtask.lease_until, Subtask.queued_at + lease) < now,
            )
            .order_by(Subtask.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        predict = conn.execute(
            update(Subtask)
            .where(Subtask.id.in_(expired.scalar_subquery()))
            .values(state=SubtaskState.dispatched, lease_until=now + lease)
            .returning(Subtask.id, Subtask.model)
        ).all()

        split = (
            conn.execute(select(Batch.id).where(Batch.state == BatchState.pending, Batch.created_at < now - lease))
            .scalars()
            .all()
        )
        aggregate += (
            conn.execute(
                select(Batch.id).where(
                    _aggregate_due(), func.coalesce(Batch.aggregating_at, Batch.finished_at) < now - lease
                )
            )
            .scalars()
            .all()
        )
    return Sweep([(row.id, row.model) for row in predict], list(split), aggregate, len(lost))

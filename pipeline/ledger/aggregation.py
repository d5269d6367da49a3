"""The aggregate's reads and writes: the batch due for assembly and its locks, the
finished sub-tasks' outputs, result pages, and the batch's final state."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, FromClause, Row, Text, and_, bindparam, case, cast, func, or_, select, true
from sqlalchemy.dialects.postgresql import JSONB, aggregate_order_by
from sqlalchemy.sql.selectable import LateralFromClause

from pipeline.definition import InputPage
from pipeline.ledger import queries
from pipeline.ledger.batches import NOTIFY_CHANNEL
from pipeline.ledger.connection import BINARY_RESULTS
from pipeline.ledger.counters import UNFINISHED_SUBTASK_STATES, counters_complete
from pipeline.ledger.monitor import Contribution, contribution_parameters
from pipeline.schema import Batch, BatchState, StoredInputPage, Subtask, SubtaskRole, SubtaskState


def aggregate_due() -> Any:
    """Batches whose results are still to be assembled."""
    return or_(
        Batch.state == BatchState.aggregating,
        and_(Batch.state == BatchState.cancelled, Batch.aggregate_runs == 0, counters_complete()),
    )


# Every aggregate runs these: built once, executed with bound parameters.
LOCK_AGGREGATING_BATCH = (
    select(Batch.__table__).where(Batch.id == bindparam("of_batch"), aggregate_due()).with_for_update()
)
# pg_try_advisory_xact_lock class of the per-batch aggregation lock (the key is the batch id's hash).
AGGREGATE_LOCK_CLASS = 7_240_114
# Per model, the versions pinned on the batch's serve sub-tasks (two for a canary's model), as
# [[model, version], ...]: read with the batch's row, in the same round trip.
_pins = (
    select(Subtask.model, Subtask.model_version)
    .where(Subtask.batch_id == bindparam("of_batch"), Subtask.role == SubtaskRole.serve)
    .distinct()
    .subquery("pins")
)
_SERVING = (
    select(
        func.jsonb_agg(
            aggregate_order_by(
                func.jsonb_build_array(_pins.c.model, _pins.c.model_version), _pins.c.model, _pins.c.model_version
            ),
            type_=JSONB,
        )
    )
    .scalar_subquery()
    .label("serving")
)
# The aggregation lock, then the row lock only once it is held (a duplicate never waits on
# the row of a batch being aggregated): one statement. The volatile lock function keeps its
# subquery from being flattened, so it is evaluated once, before the lateral row lock.
_aggregation_lock = select(
    func.pg_try_advisory_xact_lock(AGGREGATE_LOCK_CLASS, func.hashtext(bindparam("batch_text", type_=Text))).label(
        "aggregation_locked"
    ),
    # The aggregate's commit is durable whatever its session's setting (a worker's turn
    # commits its claims and completions without waiting for the WAL flush: `make_engine`):
    # SET LOCAL, in the statement the transaction starts with.
    func.set_config("synchronous_commit", "on", True).label("durable_commit"),
).subquery("aggregation_lock")
_due_locked = (
    select(Batch.__table__, _SERVING)
    .where(Batch.id == bindparam("of_batch"), aggregate_due(), _aggregation_lock.c.aggregation_locked)
    .with_for_update(of=Batch.__table__)
    .lateral("due")
)
# `durable_commit` is selected though nothing reads it: PostgreSQL may drop a subquery's
# unused outputs, and this one must run.
LOCK_AGGREGATION = select(
    _aggregation_lock.c.aggregation_locked, _aggregation_lock.c.durable_commit, _due_locked
).select_from(_aggregation_lock.outerjoin(_due_locked, true()))
RUNNING_BATCH = select(Batch.__table__, _SERVING).where(
    Batch.id == bindparam("of_batch"), Batch.state == BatchState.running, Batch.split_items == Batch.items
)


def lock_aggregating_batch(conn: Connection, batch_id: uuid.UUID) -> Row[Any] | None:
    """Lock the row of a batch due for aggregation (`aggregating`, or `cancelled` with no
    sub-task left running and no results yet); None when it is not (a duplicate)."""
    return conn.execute(LOCK_AGGREGATING_BATCH, {"of_batch": batch_id}).first()


def lock_aggregation(conn: Connection, batch_id: uuid.UUID) -> tuple[bool, Row[Any] | None]:
    """Take the batch's aggregation lock for this transaction and then, in the same
    statement, lock its row when it is due for aggregation (as `lock_aggregating_batch`).
    Returns (False, None) when another aggregation of the batch holds the lock (a duplicate
    message, or one started early); else (True, the locked row with its `serving_versions`
    in column `serving`, or None when it is not due). The transaction's commit is durable
    (`synchronous_commit` on), whatever the session's setting."""
    row = conn.execute(LOCK_AGGREGATION, {"batch_text": str(batch_id), "of_batch": batch_id}).one()
    return bool(row.aggregation_locked), row if row.id is not None else None


def batch_state(conn: Connection, batch_id: uuid.UUID) -> BatchState | None:
    """The batch's state; None when there is no such batch."""
    state = conn.execute(select(Batch.state).where(Batch.id == batch_id)).scalar_one_or_none()
    return None if state is None else BatchState(state)


def running_batch(conn: Connection, batch_id: uuid.UUID) -> Row[Any] | None:
    """A `running` batch whose split is finished (its results may be assembled as its
    sub-tasks finish), unlocked, with its `serving_versions` in column `serving`; None otherwise."""
    return conn.execute(RUNNING_BATCH, {"of_batch": batch_id}).first()


def unfinished_before(conn: Connection, batch_id: uuid.UUID, item: int) -> bool:
    """True while a serve sub-task of the batch holding rows of an input before `item` is
    unfinished (shadow ones never hold the results up)."""
    return bool(
        conn.execute(
            select(
                select(Subtask.id)
                .where(
                    Subtask.batch_id == batch_id,
                    Subtask.state.in_(UNFINISHED_SUBTASK_STATES),
                    Subtask.role == SubtaskRole.serve,
                    Subtask.items[1] < item,
                )
                .exists()
            )
        ).scalar_one()
    )


# The error of the rows of a cancelled sub-task.
CANCELLED_ERROR = "cancelled"
# The states of a sub-task that ran to an outcome: the ones a batch's latency counts.
OUTCOME_STATES = (SubtaskState.succeeded, SubtaskState.failed)


@dataclass(frozen=True)
class SubtaskTiming:
    """When a sub-task that ran to an outcome was queued, started (its last attempt) and
    finished, and the model rows it scored."""

    rows: int
    queued_at: datetime
    started_at: datetime
    finished_at: datetime


@dataclass(frozen=True)
class SubtaskOutput:
    """A finished sub-task's rows for the aggregate: its output, or why it has none; and,
    for one that ran to an outcome (succeeded or failed), its timing."""

    seq: int
    items: np.ndarray
    output: bytes | None
    error: str | None
    # A succeeded sub-task's drift bin counts (`<i8`), when its version has a reference profile.
    bin_counts: bytes | None = None
    timing: SubtaskTiming | None = None


# One output stream of a batch: a model and the version pinned on its sub-tasks (None only
# for sub-tasks split before revision 0010).
StreamKey = tuple[str, str | None]


def serving_versions(batch: Row[Any]) -> dict[str, list[str | None]]:
    """Per model, the versions pinned on the serve sub-tasks of `batch` (a row of
    `lock_aggregation` or `running_batch`): one, or a canary's two."""
    return _by_model(batch.serving or ())


def _by_model(streams: Iterable[Sequence[Any]]) -> dict[str, list[str | None]]:
    """Per model, the versions of `streams` ((model, version) pairs), in their order."""
    versions: dict[str, list[str | None]] = {}
    for model, version in streams:
        versions.setdefault(model, []).append(version)
    return versions


def _subtask_output(row: Row[Any]) -> SubtaskOutput:
    """A finished sub-task's `SubtaskOutput` from its `subtask_*` columns (`SUBTASK_OUTPUTS`, `ONE_PAGE_DUE`)."""
    state = row.subtask_state
    succeeded = state == SubtaskState.succeeded
    ran = state in OUTCOME_STATES and row.subtask_started_at is not None and row.subtask_finished_at is not None
    return SubtaskOutput(
        row.subtask_seq,
        np.asarray(row.subtask_items),
        row.subtask_output if succeeded else None,
        CANCELLED_ERROR if state == SubtaskState.cancelled else None if succeeded else row.subtask_error,
        row.subtask_bin_counts if succeeded else None,
        SubtaskTiming(row.subtask_rows, row.subtask_queued_at, row.subtask_started_at, row.subtask_finished_at)
        if ran
        else None,
    )


def subtask_outputs(
    conn: Connection, batch_id: uuid.UUID, after_seqs: dict[StreamKey, int], before_item: int, limit: int
) -> dict[StreamKey, list[SubtaskOutput]]:
    """Per stream (model, version) of `after_seqs`, up to `limit` of its serve sub-tasks of a
    batch after its `seq` there, in `seq` (hence item) order, that start before input
    `before_item`: their outputs (with their drift bin counts), or why they have none, and
    the timing of those that ran to an outcome."""
    keys = list(after_seqs)
    rows = conn.execute(
        queries.SUBTASK_OUTPUTS,
        {
            "models": [model for model, _ in keys],
            "versions": [version for _, version in keys],
            "after_seqs": list(after_seqs.values()),
            "batch_id": batch_id,
            "before_item": before_item,
            "limit": limit,
        },
    )
    outputs: dict[StreamKey, list[SubtaskOutput]] = {key: [] for key in keys}
    for row in rows:
        outputs[keys[row.n - 1]].append(_subtask_output(row))
    return outputs


# The batch's aggregation lock is free: taken, then released as the statement's own
# transaction ends.
AGGREGATION_FREE = func.pg_try_advisory_xact_lock(
    AGGREGATE_LOCK_CLASS, func.hashtext(cast(bindparam("of_batch"), Text))
)
# The sub-task columns `_subtask_output` reads, each as `subtask_<column>` (beside a batch's own).
_OUTPUT_COLUMNS = (
    "seq", "items", "output", "error", "state", "bin_counts", "rows", "queued_at", "started_at", "finished_at"
)  # fmt: skip


def subtask_output_columns(subtask: Any) -> list[Any]:
    """The columns of `subtask` (`Subtask`, or an alias) that a one-page read returns per serve
    sub-task (`_subtask_output`), with its stream: `subtask_model`, `subtask_version`,
    `subtask_<column>`."""
    return [
        subtask.model.label("subtask_model"),
        subtask.model_version.label("subtask_version"),
        *(getattr(subtask, column).label(f"subtask_{column}") for column in _OUTPUT_COLUMNS),
    ]


def one_page_read(batch: Any, outputs: FromClause, *due: Any) -> LateralFromClause:
    """The aggregate's read of a due batch whose inputs are one stored page, beside its row
    `batch` (a FROM with its `id` and `items`), where `due` holds: its input page (on the
    first row only) and each of its serve sub-tasks' `outputs` (a FROM of
    `subtask_output_columns`; a row of NULLs when it has none), as a LATERAL subquery. The
    versions serving the batch are those of the outputs (`OnePageBatch.serving`). Order the
    rows by `one_page_order` of it."""
    first_row = func.row_number().over(order_by=one_page_order(outputs)) == 1
    return (
        select(
            true().label("read_whole"),
            case((first_row, StoredInputPage.features)).label("page_features"),
            case((first_row, cast(StoredInputPage.data, Text))).label("page_data"),
            *outputs.c,
        )
        .select_from(StoredInputPage)
        .outerjoin(outputs, true())
        .where(
            StoredInputPage.batch_id == batch.c.id,
            StoredInputPage.first_item == 0,
            StoredInputPage.items == batch.c["items"],
            *due,
        )
        .lateral("one_page")
    )


def one_page_order(outputs: Any) -> tuple[Any, ...]:
    """The order of a one-page read's rows (`one_page_read`): by stream, then `seq`."""
    return (outputs.c.subtask_model, outputs.c.subtask_version, outputs.c.subtask_seq)


_batch = Batch.__table__
_ONE_PAGE = one_page_read(
    _batch,
    select(*subtask_output_columns(Subtask))
    .where(Subtask.batch_id == bindparam("of_batch"), Subtask.role == SubtaskRole.serve)
    .subquery("outputs"),
)
ONE_PAGE_DUE = (
    select(_batch, _ONE_PAGE)
    .join(_ONE_PAGE, true())
    .where(_batch.c.id == bindparam("of_batch"), aggregate_due(), AGGREGATION_FREE)
    .order_by(*one_page_order(_ONE_PAGE))
    # Features and outputs are `bytea`: read in binary format.
    .execution_options(**BINARY_RESULTS)
)


@dataclass(frozen=True)
class OnePageBatch:
    """A batch due for aggregation whose inputs are one stored page, read whole
    (`one_page_batch_due`): its row, its stored page's columns, and its serve sub-tasks'
    outputs per stream, in `seq` order."""

    batch: Row[Any]
    features: bytes | None
    data: str | None
    outputs: dict[StreamKey, list[SubtaskOutput]]

    @property
    def serving(self) -> dict[str, list[str | None]]:
        """Per model, the versions pinned on the batch's serve sub-tasks (as `serving_versions`),
        from the outputs read: the statement that completed them may have set a version
        where the split pinned none (a sub-task split before revision 0010)."""
        # In `serving_versions`' order: by model, then version, NULL last.
        return _by_model(sorted(self.outputs, key=lambda key: (key[0], key[1] is None, key[1] or "")))

    def input_page(self, n_features: int) -> InputPage:
        """The batch's inputs as one page, for a pipeline of `n_features` features."""
        return InputPage.from_stored(0, self.batch.items, self.features, self.data, n_features)


def one_page_batch(rows: Sequence[Row[Any]]) -> OnePageBatch | None:
    """The `OnePageBatch` a one-page read returned (`one_page_read` beside the batch's row, in
    its order); None when it returned nothing, or a serve sub-task that is not finished:
    a read in a completion's snapshot, which misses a completion committed meanwhile (the
    counters the completion updated see it)."""
    if not rows or not rows[0].read_whole:
        return None
    outputs: dict[StreamKey, list[SubtaskOutput]] = {}
    for row in rows:
        if row.subtask_state in UNFINISHED_SUBTASK_STATES:
            return None
        if row.subtask_seq is not None:
            outputs.setdefault((row.subtask_model, row.subtask_version), []).append(_subtask_output(row))
    return OnePageBatch(rows[0], rows[0].page_features, rows[0].page_data, outputs)


def one_page_batch_due(conn: Connection, batch_id: uuid.UUID) -> OnePageBatch | None:
    """A batch due for aggregation (as `lock_aggregating_batch` finds it, unlocked) whose
    inputs are one stored page, with all its aggregate reads, in one statement; None when
    the batch is not due, has more pages, or another aggregation holds its lock.
    `finish_batch` then moves it only if nothing changed it meanwhile: no transaction."""
    return one_page_batch(conn.execute(ONE_PAGE_DUE, {"of_batch": batch_id}).all())


# The last-page parameters of `finish_batch` for a batch without one.
NO_PAGE = dict.fromkeys(("page_first", "page_items", "page_outputs", "page_errors", "page_versions"))


def finish_batch(
    conn: Connection,
    batch: Row[Any],
    state: BatchState,
    error: str | None,
    result: dict[str, Any],
    metrics: dict[str, Any],
    contributions: Sequence[Contribution] = (),
    last_page: dict[str, Any] | None = None,
) -> bool | None:
    """`batch` (its row as read due for aggregation: `lock_aggregation`, `one_page_batch_due`)
    → final state (a cancelled batch stays `cancelled`) with result and metrics, counted in
    `aggregate_runs`, its window `contributions` stored (as `record_contributions` stores
    them) and its `last_page` of results (`result_page_row`, as `insert_result_page` stores
    it): one statement (`queries.sql: finish_batch`), which moves the batch only if its row
    is still as read and no other aggregation holds its lock. NOTIFY waiting clients on
    commit, which is durable. Returns None when the batch did not move, else whether its
    split followed a roll-out (shadow or canary: it is one of `rollout_batches`)."""
    assert last_page is None or last_page["batch_id"] == batch.id, "a batch's own results"
    parameters = {
        "batch_id": batch.id,
        "read_state": batch.state,
        "read_runs": batch.aggregate_runs,
        "state": state.value,
        "error": error,
        "result": json.dumps(result),
        "metrics": json.dumps(metrics),
        "lock_class": AGGREGATE_LOCK_CLASS,
        "channel": NOTIFY_CHANNEL,
        **contribution_parameters(contributions),
        **(NO_PAGE if last_page is None else last_page),
    }
    row = conn.execute(queries.FINISH_BATCH, parameters).first()
    return None if row is None else bool(row.followed_rollout)

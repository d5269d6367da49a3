"""The split's writes: locking a `pending` batch, copying its new sub-tasks, counting each
committed step, and failing a batch that cannot be split."""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from sqlalchemy import Connection, Row, Text, Update, bindparam, case, func, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from pipeline.ledger import queries
from pipeline.ledger.batches import NOTIFY_CHANNEL, batch_row, request_fingerprint, same_request, stored_pages
from pipeline.ledger.connection import copy_rows, now
from pipeline.ledger.counters import UNFINISHED_SUBTASK_STATES, cancel_subtasks
from pipeline.schema import Batch, BatchState, FailurePolicy, Subtask, SubtaskRole, SubtaskState
from pipeline.states import Priority

if TYPE_CHECKING:
    from pipeline.definition import InputPage


class Dispatch(NamedTuple):
    """A sub-task to publish: its id, its model (the queue) and its priority rank."""

    subtask_id: int
    model: str
    priority: int


@dataclass(frozen=True)
class NewSubtask:
    """A sub-task a split step writes: one chunk of one model's rows."""

    model: str
    seq: int
    max_attempts: int
    # `Priority.rank`: lower is claimed first.
    priority: int
    items: np.ndarray
    # None: the rows are the inputs' stored features (`ModelRows.of_inputs`).
    payload: bytes | None
    # The model version (artifact SHA-256) that must score it.
    model_version: str | None
    # `serve`, or `shadow` (a roll-out's copy of the serve sub-task numbered -1 - seq).
    role: SubtaskRole = SubtaskRole.serve

    @property
    def rows(self) -> int:
        return len(self.items)


# Every split step runs these (a small batch's in its client): built once. The batch is read
# without a lock: a step's work (its pages, the pipeline's split, the chunks) runs while
# workers count finished sub-tasks on the batch's row; `record_split` counts the step only
# if no other split did meanwhile.
PENDING_BATCH = select(Batch.__table__).where(Batch.id == bindparam("batch_id"), Batch.state == BatchState.pending)


def _record_split_statement(finished: bool) -> Update:
    total = Batch.total + bindparam("created")
    complete = Batch.succeeded + Batch.failed + Batch.cancelled == total
    values: dict[str, Any] = {
        "split_items": bindparam("split_items"),
        "total": total,
        "model_versions": func.coalesce(Batch.model_versions, bindparam("model_versions", type_=JSONB)),
    }
    if finished:
        values |= {
            "state": case((complete, BatchState.aggregating.value), else_=BatchState.running.value),
            "started_at": now(),
            "aggregating_at": case((complete, now()), else_=None),
        }
    return (
        update(Batch)
        .where(
            Batch.id == bindparam("batch_id"),
            Batch.state == BatchState.pending,
            Batch.split_items == bindparam("split_from"),
        )
        .values(**values)
        .returning(Batch.state)
    )


RECORD_SPLIT = {finished: _record_split_statement(finished) for finished in (False, True)}


def pending_batch(conn: Connection, batch_id: uuid.UUID) -> Row[Any] | None:
    """A `pending` batch's row, not locked; None when it is not pending (split, or cancelled)."""
    return conn.execute(PENDING_BATCH, {"batch_id": batch_id}).first()


def next_seqs(conn: Connection, batch_id: uuid.UUID) -> dict[str, int]:
    """Per model, the `seq` the batch's next serve sub-task gets (shadows' seqs are negative)."""
    rows = conn.execute(
        select(Subtask.model, func.max(Subtask.seq) + 1).where(Subtask.batch_id == batch_id).group_by(Subtask.model)
    ).all()
    return {model: seq for model, seq in rows}


INT4_OID = 23
# Announces, on commit, interactive sub-tasks just written: a worker process busy with a bulk
# sub-task takes them between two slices of its predict (`workers.interactive`).
INTERACTIVE_CHANNEL = "interactive_subtasks"


def _int4_array(values: np.ndarray) -> bytes:
    """`values` (not empty) in the binary COPY form of a one-dimensional PostgreSQL int4[]:
    written with numpy, as psycopg's generic list dumper costs a Python call per element."""
    header = struct.pack(">iiIii", 1, 0, INT4_OID, len(values), 1)
    elements = np.empty((len(values), 2), dtype=">i4")
    elements[:, 0] = 4  # each element's byte length
    elements[:, 1] = values
    return header + elements.tobytes()


class RideQuery(NamedTuple):
    """What a small batch's split asks the ledger for its sub-tasks to ride on each other's
    messages (`rollouts.serving_of`): each model's queue as the broker names it, and how old a
    worker's heartbeat may be to count, which is also a rider's lease."""

    queues: dict[str, str]
    max_age_s: float


class Riding(NamedTuple):
    """Who consumed each model's queue when the split read it (live workers by their
    heartbeats; a model none consumes is left out), and until when a rider is leased."""

    consumers: dict[str, tuple[str, ...]]
    lease_until: datetime


def first_seqs(subtasks: Sequence[NewSubtask]) -> dict[str, int]:
    """Per model, the lowest seq of its serve sub-tasks among `subtasks`."""
    first: dict[str, int] = {}
    for subtask in subtasks:
        if subtask.role == SubtaskRole.serve:
            first[subtask.model] = min(subtask.seq, first.get(subtask.model, subtask.seq))
    return first


def riders(first: dict[str, int], consumers: dict[str, tuple[str, ...]]) -> set[tuple[str, int]]:
    """(model, seq) of the sub-tasks that ride on another one's message, of new sub-tasks
    whose first serve seq per model is `first` (`first_seqs`). A worker whose turn claims a
    small batch's sub-task claims the batch's first `dispatched` one of every model it serves
    with it (`claim_turn`): of the models the same live workers consume (`consumers`), the
    first by name gets a message, and the others' first serve sub-tasks ride on it."""
    messaged: set[tuple[str, ...]] = set()
    riding: set[tuple[str, int]] = set()
    for model in sorted(first):
        workers = consumers.get(model)
        if not workers:
            continue
        if workers in messaged:
            riding.add((model, first[model]))
        messaged.add(workers)
    return riding


def _rider_leases(first: dict[str, int], riding: Riding | None) -> dict[tuple[str, int], datetime]:
    """(model, seq) of each rider among new sub-tasks whose first serve seq per model is
    `first` → its lease (`riding.lease_until`); none without `riding` (a shadow's seq is
    negative: never one of them)."""
    return {} if riding is None else dict.fromkeys(riders(first, riding.consumers), riding.lease_until)


def _announcement(subtasks: Sequence[NewSubtask]) -> dict[str, Any]:
    """The parameters of the NOTIFY announcing interactive sub-tasks among `subtasks`."""
    return {
        "announce": any(s.priority == Priority.interactive.rank for s in subtasks),
        "channel": INTERACTIVE_CHANNEL,
    }


def copy_subtasks(
    conn: Connection, batch_id: uuid.UUID, subtasks: Sequence[NewSubtask], riding: Riding | None = None
) -> list[Dispatch]:
    """Insert sub-tasks as `dispatched` with one COPY; return those to publish. Interactive
    ones are also announced on `INTERACTIVE_CHANNEL` when the transaction commits.

    Their lease runs from `queued_at`: if the messages are never published (a crash
    after commit), the sweeper publishes them once it expires. With `riding` (a small
    batch's), the `riders` are not returned: marked `rides` (a message that claims one is
    published again, `workers.inference.run_subtask`), and leased until `riding.lease_until`
    only: had the heartbeats been stale and no turn claimed one with another's, the sweeper
    publishes it then.
    """
    first = first_seqs(subtasks)
    leases = _rider_leases(first, riding)
    copy_rows(
        conn,
        queries.COPY_SUBTASKS,
        (
            (
                batch_id,
                s.model,
                s.seq,
                s.max_attempts,
                s.priority,
                s.rows,
                _int4_array(s.items),
                s.payload,
                SubtaskState.dispatched.value,
                s.model_version,
                s.role.value,
                (s.model, s.seq) in leases,
                leases.get((s.model, s.seq)),
            )
            for s in subtasks
        ),
        # `items` goes as bytes already in int4[]'s binary form (see _int4_array).
        binary_types=(
            "uuid", "text", "int4", "int4", "int2", "int4", "bytea", "bytea", "text", "text", "text", "bool",
            "timestamptz",
        ),
    )  # fmt: skip
    if not first:
        return []
    rows = conn.execute(
        queries.NEW_SUBTASK_IDS,
        {
            "batch_id": batch_id,
            "models": list(first),
            "first_seqs": list(first.values()),
            **_announcement(subtasks),
        },
    ).all()
    return [Dispatch(row.id, row.model, row.priority) for row in rows if (row.model, row.seq) not in leases]


class WholeSplit(NamedTuple):
    """A small batch's whole split, made by its client before anything is stored
    (`store_split_batch`): its sub-tasks, how many serve, the versions they pin, who
    consumes each model's queue (`riders`), the roll-outs the batch follows, and per model
    the champion and active roll-out (None: none) the split read, to be still current
    when the batch is stored."""

    subtasks: list[NewSubtask]
    serving: int
    model_versions: dict[str, str]
    riding: Riding | None
    rollout_ids: list[int]
    pins: dict[str, tuple[str | None, int | None]]


class StoredBatch(NamedTuple):
    """A submission stored: its batch, whether this call created it, its sub-tasks to publish
    and whether it is due for aggregation (it has none)."""

    batch_id: uuid.UUID
    created: bool
    published: list[Dispatch]
    aggregate: bool


def store_split_batch(
    conn: Connection,
    pipeline: str,
    pages: list[InputPage],
    idempotency_key: str | None,
    failure_policy: FailurePolicy,
    max_failed_fraction: float | None,
    deadline_s: float | None,
    priority: Priority,
    split: Callable[[uuid.UUID, list[InputPage]], WholeSplit],
    batch_id: uuid.UUID | None = None,
) -> StoredBatch | None:
    """Store a small batch (every page in hand) with its whole split, `split(batch id,
    pages)` (its reads run on `conn` before the write), in one statement that commits on its
    own (`STORE_SPLIT_BATCH`, on an autocommit `conn`): what `insert_batch`, `copy_subtasks`
    and a finished `record_split` write on a batch's storing transaction, in one round trip
    instead of eight. With an `idempotency_key` already used by the same request, returns
    that batch and writes nothing. Returns None, writing nothing, when a champion or an
    active roll-out the split read is no longer current (`WholeSplit.pins`): split again.
    A new batch gets id `batch_id` (default: a new one).

    Raises:
        IdempotencyKeyError: as `insert_batch`.
        SplitError, NoChampionError: from `split`; nothing was written.
    """
    fingerprint = request_fingerprint(idempotency_key, pipeline, failure_policy, max_failed_fraction, deadline_s)
    in_hand = list(stored_pages(pages, fingerprint))
    batch_id = batch_id or uuid.uuid4()
    whole = split(batch_id, [page for page, _, _ in in_hand])
    subtasks = whole.subtasks
    leases = _rider_leases(first_seqs(subtasks), whole.riding)
    bounds = np.cumsum([0, *(s.rows for s in subtasks)])
    items = sum(page.count for page, _, _ in in_hand)
    row = batch_row(
        batch_id,
        pipeline,
        items,
        fingerprint,
        idempotency_key,
        failure_policy,
        max_failed_fraction,
        deadline_s,
        priority,
    )
    rows = conn.execute(
        queries.STORE_SPLIT_BATCH,
        row
        | {
            "total": whole.serving,
            "model_versions": json.dumps(whole.model_versions),
            "page_firsts": [page.first for page, _, _ in in_hand],
            "page_counts": [page.count for page, _, _ in in_hand],
            "page_features": [features for _, features, _ in in_hand],
            "page_data": [data for _, _, data in in_hand],
            "subtask_items": np.concatenate([s.items for s in subtasks]).tolist() if subtasks else [],
            "models": [s.model for s in subtasks],
            "seqs": [s.seq for s in subtasks],
            "max_attempts": [s.max_attempts for s in subtasks],
            "priorities": [s.priority for s in subtasks],
            "items_from": bounds[:-1].tolist(),
            "items_to": bounds[1:].tolist(),
            "payloads": [s.payload for s in subtasks],
            "versions": [s.model_version for s in subtasks],
            "roles": [s.role.value for s in subtasks],
            "rides": [(s.model, s.seq) in leases for s in subtasks],
            "leases": [leases.get((s.model, s.seq)) for s in subtasks],
            "rollout_ids": whole.rollout_ids,
            "pinned_models": list(whole.pins),
            "pinned_champions": [champion for champion, _ in whole.pins.values()],
            "pinned_rollouts": [rollout for _, rollout in whole.pins.values()],
            **_announcement(subtasks),
        },
    ).all()
    if not rows[0].pinned_current:
        return None
    if rows[0].state is None:
        assert idempotency_key is not None and fingerprint is not None, "only a key conflicts with a new uuid"
        return StoredBatch(same_request(conn, idempotency_key, pipeline, [], fingerprint), False, [], False)
    published = [Dispatch(row.id, row.model, row.priority) for row in rows if row.id is not None]
    return StoredBatch(batch_id, True, published, BatchState(rows[0].state) == BatchState.aggregating)


def record_split(
    conn: Connection,
    batch_id: uuid.UUID,
    split_from: int,
    split_items: int,
    created: int,
    finished: bool,
    model_versions: dict[str, str],
) -> BatchState | None:
    """Count a split step of a `pending` batch whose first `split_from` inputs were split:
    now `split_items` are, and `created` more sub-tasks exist (the caller writes them next,
    on the same transaction, holding the batch's row); the first step records the
    `model_versions` it pinned (later steps keep them). With `finished`, the batch becomes
    `running`, or `aggregating` when every sub-task is already counted (or there is none).

    Returns the batch's new state; None, writing nothing, when it is no longer `pending`
    or another split counted inputs past `split_from` meanwhile.
    """
    state = conn.execute(
        RECORD_SPLIT[finished],
        {
            "batch_id": batch_id,
            "split_from": split_from,
            "split_items": split_items,
            "created": created,
            "model_versions": model_versions,
        },
    ).scalar_one_or_none()
    return None if state is None else BatchState(state)


def fail_pending_batch(conn: Connection, batch_id: uuid.UUID, error: str) -> None:
    """`pending` → `failed` when the batch cannot be split, cancelling the sub-tasks an
    earlier split step made and giving every input `error` as its result (one result page
    per input page, one statement); NOTIFY waiting clients on commit."""
    failed = conn.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state == BatchState.pending)
        .values(state=BatchState.failed, error=error, finished_at=now())
        .returning(Batch.id)
    ).first()
    if failed is not None:
        cancel_subtasks(conn, batch_id, UNFINISHED_SUBTASK_STATES)
        conn.execute(queries.FAILED_RESULT_PAGES, {"batch_id": batch_id, "error": error})
    conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, str(batch_id))))


# Sub-tasks of at least this many rows measure a model's cost per row (smaller ones are
# mostly the per-call overhead); the partial index `subtasks_model_cost` holds just them.
COST_MIN_ROWS = 1000
# A model's cost per row: over its newest succeeded sub-tasks of at least COST_MIN_ROWS rows
# (the partial index read backwards: a few index pages whatever the table's size).
MODEL_ROW_COSTS = text(
    f"""
    SELECT m.model, c.cpu_s_per_row
    FROM unnest(:models) AS m(model)
    CROSS JOIN LATERAL (
        SELECT sum(recent.predict_cpu_s) / sum(recent.rows) AS cpu_s_per_row
        FROM (
            SELECT predict_cpu_s, rows FROM subtasks
            WHERE model = m.model AND state = 'succeeded' AND predict_cpu_s IS NOT NULL
              AND rows >= {COST_MIN_ROWS}
            ORDER BY id DESC
            LIMIT 20
        ) AS recent
    ) AS c
    WHERE c.cpu_s_per_row IS NOT NULL
    """
).bindparams(bindparam("models", type_=ARRAY(Text)))


def model_row_costs(conn: Connection, models: Sequence[str]) -> dict[str, float]:
    """Per model of `models`, the predict CPU seconds per row its newest large sub-tasks
    took (a model without any is left out)."""
    return {row.model: float(row.cpu_s_per_row) for row in conn.execute(MODEL_ROW_COSTS, {"models": list(models)})}

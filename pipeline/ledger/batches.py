"""Batches: storing a new one with its input pages, reading statuses, cancelling."""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, Float, Interval, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from pipeline.errors import IdempotencyKeyError
from pipeline.garbage import collection_paused
from pipeline.json_array import JsonArray
from pipeline.ledger import queries
from pipeline.ledger.connection import autocommit, copy_rows, now, retrying_deadlocks
from pipeline.ledger.counters import Outcome, cancel_subtasks, counters_complete
from pipeline.ledger.pages import ResultsPage, results_page
from pipeline.schema import Batch, BatchState, FailurePolicy, Priority, Subtask, SubtaskState

if TYPE_CHECKING:
    from pipeline.definition import InputPage

# Called after each input page of a new batch is written: (connection, batch id, page).
PageStored = Callable[[Connection, uuid.UUID, "InputPage"], None]

# The channel a batch's finish is announced on (payload: its id).
NOTIFY_CHANNEL = "batch_finished"

INSERT_BATCH = (
    pg_insert(Batch)
    .values(
        id=bindparam("id"),
        pipeline=bindparam("pipeline"),
        items=bindparam("items"),
        request_sha256=bindparam("request_sha256"),
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


class RequestFingerprint:
    """The SHA-256 of a submission as it is stored: its pipeline and options, then per input
    page its range, packed features and JSON data, each length-prefixed. Fed page by page,
    so a batch of any size is hashed in the pass that stores it, with no copy of it."""

    def __init__(
        self, pipeline: str, failure_policy: FailurePolicy, max_failed_fraction: float | None, deadline_s: float | None
    ) -> None:
        self._sha256 = hashlib.sha256()
        options = {
            "pipeline": pipeline,
            "failure_policy": failure_policy.value,
            "max_failed_fraction": max_failed_fraction,
            "deadline_s": deadline_s,
        }
        self._field(json.dumps(options, sort_keys=True).encode())

    def _field(self, value: bytes | None) -> None:
        # Length-prefixed (-1 for NULL): no two different sequences of fields hash alike.
        self._sha256.update(struct.pack("<q", -1 if value is None else len(value)))
        if value is not None:
            self._sha256.update(value)

    def add_page(self, first: int, count: int, features: bytes | None, data: str | None) -> None:
        """Add the next stored page: inputs `first` .. `first + count - 1`."""
        self._sha256.update(struct.pack("<qq", first, count))
        self._field(features)
        self._field(None if data is None else data.encode())

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()


def request_fingerprint(
    idempotency_key: str | None,
    pipeline: str,
    failure_policy: FailurePolicy,
    max_failed_fraction: float | None,
    deadline_s: float | None,
) -> RequestFingerprint | None:
    """The fingerprint a keyed submission stores, its pages still to feed; None without a key."""
    if idempotency_key is None:
        return None
    return RequestFingerprint(pipeline, failure_policy, max_failed_fraction, deadline_s)


def _stored_page(page: InputPage) -> tuple[bytes | None, str | None]:
    """A `packed` page's columns as stored: its features as bytes, its data as JSON text."""
    features = None if page.X is None else page.X.tobytes()
    if page.data is None or isinstance(page.data, JsonArray):
        data = None if page.data is None else page.data.as_str()
    else:
        data = json.dumps(page.data, separators=(",", ":"))
    return features, data


def batch_row(
    batch_id: uuid.UUID,
    pipeline: str,
    items: int,
    fingerprint: RequestFingerprint | None,
    idempotency_key: str | None,
    failure_policy: FailurePolicy,
    max_failed_fraction: float | None,
    deadline_s: float | None,
    priority: Priority,
) -> dict[str, Any]:
    """The parameters of a new batch's row (`INSERT_BATCH`, `store_split_batch`): with the
    `fingerprint` of its request once every page was fed to it."""
    return {
        "id": batch_id,
        "pipeline": pipeline,
        "items": items,
        "request_sha256": None if fingerprint is None else fingerprint.hexdigest(),
        "idempotency_key": idempotency_key,
        "failure_policy": failure_policy.value,
        "priority": priority.value,
        "max_failed_fraction": max_failed_fraction,
        "deadline": None if deadline_s is None else timedelta(seconds=deadline_s),
    }


def stored_pages(
    pages: Iterable[InputPage], fingerprint: RequestFingerprint | None
) -> Iterator[tuple[InputPage, bytes | None, str | None]]:
    """Each page packed, with its columns as stored (`_stored_page`), fed to `fingerprint`."""
    for page in pages:
        page = page.packed()
        features, data = _stored_page(page)
        if fingerprint is not None:
            fingerprint.add_page(page.first, page.count, features, data)
        yield page, features, data


def insert_batch(
    conn: Connection,
    pipeline: str,
    pages: Iterable[InputPage],
    idempotency_key: str | None,
    failure_policy: FailurePolicy = FailurePolicy.best_effort,
    max_failed_fraction: float | None = None,
    deadline_s: float | None = None,
    priority: Priority = Priority.bulk,
    stored: PageStored | None = None,
    batch_id: uuid.UUID | None = None,
) -> tuple[uuid.UUID, bool]:
    """Insert a `pending` batch and its input pages on `conn`'s transaction; with an
    `idempotency_key`, store the request's fingerprint (`RequestFingerprint`) with it.
    `pages` are read once, as they are stored (a generator validating them as they come
    may raise: the caller's transaction then stores nothing); pages given as a list (a
    small batch's, all in hand) are counted and fingerprinted first, so the batch's row is
    inserted whole rather than updated after its pages. `stored(conn, batch id, page)`
    is called after each page of a new batch is written, with its features packed as stored
    (the client splits the page there, on the same transaction). A new batch gets id
    `batch_id` (default: a new one).

    Returns (batch id, created). With an `idempotency_key` already used by the same
    request (same fingerprint), returns the existing batch and writes nothing. A batch
    stored before fingerprints existed (NULL `request_sha256`) is returned for its key as
    long as the pipeline matches.

    Raises:
        IdempotencyKeyError: the key names a batch of another pipeline, or one submitted
            with other inputs or options.
    """
    fingerprint = request_fingerprint(idempotency_key, pipeline, failure_policy, max_failed_fraction, deadline_s)
    in_hand = list(stored_pages(pages, fingerprint)) if isinstance(pages, list) else None
    batch_id = batch_id or uuid.uuid4()
    inserted = conn.execute(
        INSERT_BATCH,
        batch_row(
            batch_id,
            pipeline,
            # Pages not in hand are counted as they are stored, then set with the fingerprint.
            0 if in_hand is None else sum(page.count for page, _, _ in in_hand),
            None if in_hand is None else fingerprint,
            idempotency_key,
            failure_policy,
            max_failed_fraction,
            deadline_s,
            priority,
        ),
    ).scalar_one_or_none()
    if inserted is None:
        assert idempotency_key is not None and fingerprint is not None, "only a key conflicts with a new uuid"
        # Pages in hand are fingerprinted already.
        return same_request(conn, idempotency_key, pipeline, pages if in_hand is None else [], fingerprint), False

    items = 0
    for page, features, data in stored_pages(pages, fingerprint) if in_hand is None else in_hand:
        items += page.count
        # One COPY per page: `stored` may write between two pages. `data` goes as JSON text:
        # json's binary COPY form is its text.
        copy_rows(
            conn,
            queries.COPY_INPUT_PAGES,
            [(batch_id, page.first, page.count, features, data)],
            binary_types=("uuid", "int4", "int4", "bytea", "text"),
        )
        if stored is not None:
            stored(conn, batch_id, page)
    if in_hand is None:
        sha256 = None if fingerprint is None else fingerprint.hexdigest()
        conn.execute(update(Batch).where(Batch.id == batch_id).values(items=items, request_sha256=sha256))
    return batch_id, True


def same_request(
    conn: Connection, idempotency_key: str, pipeline: str, pages: Iterable[InputPage], fingerprint: RequestFingerprint
) -> uuid.UUID:
    """The batch `idempotency_key` names, when it was submitted by the same request.

    Raises:
        IdempotencyKeyError: it is a batch of another pipeline, or of another request.
    """
    existing = conn.execute(
        select(Batch.id, Batch.pipeline, Batch.request_sha256).where(Batch.idempotency_key == idempotency_key)
    ).one()
    batch_id: uuid.UUID = existing.id
    if existing.pipeline != pipeline:
        raise IdempotencyKeyError(
            f"idempotency_key {idempotency_key!r} already names batch {batch_id}"
            f" of pipeline {existing.pipeline!r}, not {pipeline!r}"
        )
    if existing.request_sha256 is None:
        return batch_id  # stored before fingerprints (revision 0006): accepted as before
    for _ in stored_pages(pages, fingerprint):
        pass  # each page is fed to the fingerprint
    if fingerprint.hexdigest() != existing.request_sha256:
        raise IdempotencyKeyError(
            f"idempotency_key {idempotency_key!r} already names batch {batch_id}, submitted with other"
            " inputs or options; a new request needs a new key"
        )
    return batch_id


def batch_status_row(engine: Engine, batch_id: uuid.UUID) -> dict[str, Any] | None:
    """The `batch_status` view's row of one batch, plus its result and metrics."""
    with autocommit(engine) as conn:
        row = conn.execute(queries.BATCH_STATUS, {"id": batch_id}).mappings().first()
    return dict(row) if row is not None else None


def batch_status_read_ahead(
    engine: Engine, batch_id: uuid.UUID, read_ahead_items: int
) -> tuple[dict[str, Any] | None, ResultsPage | None]:
    """As `batch_status_row`, with the batch's first result page once its results are ready,
    when it has at most `read_ahead_items` inputs (else None): one round trip for both."""
    with autocommit(engine) as conn, collection_paused():
        row = (
            conn.execute(queries.BATCH_STATUS_READ_AHEAD, {"id": batch_id, "read_ahead_items": read_ahead_items})
            .mappings()
            .first()
        )
    if row is None:
        return None, None
    status = {key: value for key, value in row.items() if not key.startswith("page_")}
    if row["page_first_item"] is None:
        return status, None
    page = results_page(
        row["page_first_item"],
        row["page_outputs"],
        row["page_errors"],
        row["page_versions"],
        row["page_pinned"],
        row["page_last"],
    )
    return status, page


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
    is True when no sub-task is left running, so results can be assembled now. Run again
    when it was a deadlock's victim (`retrying_deadlocks`): it locks the batch's row, then
    its sub-tasks', the other way round from the sweep.
    """

    def cancel() -> Outcome:
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

    return retrying_deadlocks(cancel)

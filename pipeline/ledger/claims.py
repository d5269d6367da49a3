"""A worker's claims: `dispatched` (or a retry's `pending`, or a lost worker's expired
`running`) → `running`, each one guarded statement that also returns the rows to score. Their
outcomes (completion, failure) are `pipeline.ledger.outcomes`.

Each takes an Engine (it checks out a connection for itself) or a Connection: a worker's turn
holds one autocommit connection for its claims and completions (`workers.inference.TurnConnection`)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    Integer,
    Interval,
    LargeBinary,
    Select,
    Text,
    and_,
    bindparam,
    cast,
    func,
    literal,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.orm import aliased
from sqlalchemy.sql.selectable import CTE, CompoundSelect

from pipeline.ledger.connection import BINARY_RESULTS, Bind, connected, inline, now
from pipeline.schema import Batch, StoredInputPage, Subtask, SubtaskRole, SubtaskState
from pipeline.states import Priority


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
    # `Priority.rank` of the sub-task.
    priority: int
    # The version the split pinned (None only for a sub-task split before revision 0008).
    model_version: str | None
    # `serve`, or `shadow`: a roll-out's copy, never counted in its batch's counters.
    role: str = SubtaskRole.serve.value
    # Published on another sub-task's message (`ledger.riders`), not on its own.
    rides: bool = False


def _claimed(name: str, *claimable: Any) -> CTE:
    """The claim of the sub-tasks matching `claimable` (conditions on `Subtask`), as a CTE
    named `name` returning what `Claim` holds of them (and the first input they name)."""
    stamp = now()
    return (
        update(Subtask)
        .where(*claimable)
        .values(
            state=SubtaskState.running,
            attempts=Subtask.attempts + 1,
            worker=bindparam("worker"),
            started_at=stamp,
            lease_until=stamp + bindparam("lease", type_=Interval),
        )
        .returning(
            Subtask.id,
            Subtask.batch_id,
            Subtask.model,
            Subtask.attempts,
            Subtask.max_attempts,
            Subtask.rows,
            Subtask.payload,
            Subtask.priority,
            Subtask.model_version,
            Subtask.role,
            Subtask.rides,
            Subtask.items[1].label("first_item"),
        )
        .cte(name)
    )


def _claim_rows(claimed: CTE, turn_order: int = 0) -> Select[Any]:
    """What `Claim` holds of the sub-tasks `claimed` (`_claimed`): the rows to score are the
    payload, or the slice of the batch's stored input features the sub-task names; with
    `turn_order`, which claim of a turn they are (`claim_turn`)."""
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
        claimed.c.priority,
        claimed.c.model_version,
        claimed.c.role,
        claimed.c.rides,
        literal(turn_order).label("turn_order"),
    )


# The workers' hot path: statements built once, executed with bound parameters (building
# one costs more than running it). Pitfall: in an UPDATE, a bindparam named like a column
# of the target table becomes a SET of that column (hence `of_batch`, not `batch_id`).
#
# A predict message is a turn to claim, not an order to run its own sub-task: it claims the
# best `dispatched` sub-task of its model (lowest priority rank, then lowest seq, which
# interleaves the batches of one rank), its own included. Each dispatched sub-task was
# published once, and a message claims something whenever anything is dispatched, so every
# sub-task is claimed by some message; an interactive sub-task queued behind a thousand
# bulk messages is taken by the next one a worker reads. A rider (`rides`) was not
# published: a message that claims one is published again (`workers.inference.run_subtask`),
# as the sub-task it was published for has none left (a small batch's riders are mostly
# claimed without a message, by the turn that claims its first: `claim_turn`). A sub-task
# waiting out a retry's backoff (`pending`) or a lost worker's expired lease (`running`) is
# claimed only by its own message, so the backoff holds.
_named = aliased(Subtask)
_best = aliased(Subtask)
_model = aliased(Subtask)
OWN_RETRY = (
    select(_named.id)
    .where(
        _named.id == bindparam("subtask_id"),
        _named.attempts < _named.max_attempts,
        or_(
            _named.state == SubtaskState.pending,
            and_(_named.state == SubtaskState.running, _named.lease_until < now()),
        ),
    )
    .with_for_update(skip_locked=True)
    .scalar_subquery()
)
# A shadow sub-task waits for its batch to finish: shadow work never delays the batch it
# copies (a bulk batch split in steps leaves gaps its own shadows would fill). Its message,
# taken earlier, finds nothing and is dropped; the aggregate publishes the batch's shadow
# sub-tasks again once it has committed (`dispatched_shadows`).
_batch_finished = select(Batch.id).where(Batch.id == _best.batch_id, Batch.finished_at.is_not(None)).exists()
BEST_DISPATCHED = (
    select(_best.id)
    .where(
        _best.model == select(_model.model).where(_model.id == bindparam("subtask_id")).scalar_subquery(),
        # Inlined: the partial index `subtasks_dispatched_by_priority` serves the generic plan.
        _best.state == inline(SubtaskState.dispatched),
        _best.attempts < _best.max_attempts,
        or_(_best.role == SubtaskRole.serve, _batch_finished),
    )
    .order_by(_best.priority, _best.seq, _best.id)
    .limit(1)
    .with_for_update(skip_locked=True)
    .scalar_subquery()
)
_MESSAGE_CLAIMABLE = (
    Subtask.id == func.coalesce(OWN_RETRY, BEST_DISPATCHED),
    # Checked again on the row the UPDATE locks: it may have been claimed meanwhile.
    Subtask.attempts < Subtask.max_attempts,
    or_(
        Subtask.state.in_((SubtaskState.pending, SubtaskState.dispatched)),
        and_(Subtask.state == SubtaskState.running, Subtask.lease_until < now()),
    ),
)


def _picked_of_batch(batch_id: Any, *conditions: Any) -> CTE:
    """The first `dispatched` serve sub-tasks of batch `batch_id` for the `models`, in `seq`
    order, at most `most`, locked (skipping those another claim holds), where `conditions`
    (on the returned alias) also hold. A MATERIALIZED CTE: as an `IN (subquery)`, PostgreSQL
    may run the subquery again per row and its LIMIT then no longer bounds the claims (seen:
    3 claimed for 2)."""
    waiting = aliased(Subtask)
    return (
        select(waiting.id)
        .where(
            waiting.batch_id == batch_id,
            waiting.model == func.any(bindparam("models", type_=ARRAY(Text))),
            waiting.state == SubtaskState.dispatched,
            # Shadow work waits for its rank; it never keeps a small batch's worker.
            waiting.role == SubtaskRole.serve,
            waiting.attempts < waiting.max_attempts,
            *(condition(waiting) for condition in conditions),
        )
        .order_by(waiting.seq, waiting.id)
        .limit(bindparam("most"))
        .with_for_update(of=waiting, skip_locked=True)
        .cte("picked")
        .prefix_with("MATERIALIZED")
    )


def _claimed_picked(name: str, picked: CTE) -> CTE:
    """The claim of the sub-tasks `picked` (`_picked_of_batch`), as `_claimed` named `name`."""
    return _claimed(
        name,
        Subtask.id.in_(select(picked.c.id)),
        # Checked again on the rows the UPDATE locks: they may have been claimed meanwhile.
        Subtask.state == SubtaskState.dispatched,
    )


# More of a small batch, claimed at once by the worker process that took one of its
# sub-tasks (in `seq` order: the models' chunks of the same inputs together).
CLAIM_MORE_OF_BATCH = _claim_rows(
    _claimed_picked("claimed", _picked_of_batch(bindparam("of_batch")))
).execution_options(**BINARY_RESULTS)


def _turn(first: CTE) -> CompoundSelect[Any]:
    """A turn's claims: `first` (a `_claimed` named "claimed") and, when that is a serve
    sub-task of a small batch (at most `small_items` inputs), more of the batch as
    `CLAIM_MORE_OF_BATCH` picks them, the sub-task just claimed left out (this statement's
    snapshot still sees it `dispatched`): one statement for the first round of a one-input
    batch, not two."""
    batch_items = select(Batch.items).where(Batch.id == first.c.batch_id).scalar_subquery()
    return union_all(
        _claim_rows(first),
        _claim_rows(
            _claimed_picked(
                "more",
                _picked_of_batch(
                    first.c.batch_id,
                    lambda _: first.c.role == SubtaskRole.serve,
                    lambda _: batch_items <= bindparam("small_items"),
                    lambda waiting: waiting.id != first.c.id,
                ),
            ),
            turn_order=1,
        ),
    ).execution_options(**BINARY_RESULTS)


# A message's turn: its claim (`_MESSAGE_CLAIMABLE`) with the first round of its small batch.
CLAIM_TURN = _turn(_claimed("claimed", *_MESSAGE_CLAIMABLE))

# Interactive work a worker's lane takes as it is announced, or a worker process between two
# slices of a bulk sub-task's predict (`workers.lane`, `workers.interactive`): the first
# dispatched interactive serve sub-task of its models, with the first round of its batch.
_interactive = aliased(Subtask)
CLAIM_INTERACTIVE_TURN = _turn(
    _claimed(
        "claimed",
        Subtask.id
        == select(_interactive.id)
        .where(
            _interactive.model == func.any(bindparam("models", type_=ARRAY(Text))),
            _interactive.state == inline(SubtaskState.dispatched),
            _interactive.priority == Priority.interactive.rank,
            _interactive.role == SubtaskRole.serve,
            _interactive.attempts < _interactive.max_attempts,
        )
        .order_by(_interactive.seq, _interactive.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery(),
        # Checked again on the row the UPDATE locks: it may have been claimed meanwhile.
        Subtask.state == SubtaskState.dispatched,
    )
)


def claim_subtask(bind: Bind, subtask_id: int, worker: str, lease_s: float) -> Claim | None:
    """Claim the sub-task a predict message for `subtask_id` should run (`claim_turn`'s first
    claim alone): its own when it waits for a retry (`pending`) or its worker was lost
    (`running` past its lease), else the best `dispatched` sub-task of its model, maybe its
    own. `running`, attempts + 1, in one statement that also returns the rows to score: the
    sub-task's payload, or the slice of its batch's stored input features that it names
    (`ModelRows.of_inputs`).

    Returns None when there is nothing to claim (its own is finished, cancelled or leased,
    and no other sub-task of its model is dispatched).
    """
    claims = claim_turn(bind, subtask_id, worker, lease_s, served=(), small_items=0)
    return claims[0] if claims else None


def claim_turn(
    bind: Bind, subtask_id: int, worker: str, lease_s: float, served: Sequence[str], small_items: int
) -> list[Claim]:
    """The claim a predict message of `subtask_id` makes (`claim_subtask`) and, when it is a
    serve sub-task of a batch of at most `small_items` inputs, up to `len(served) - 1` more of
    that batch as `claim_more_of_batch` claims them for the `served` models, in one statement.
    Returns the message's claim first, then the others in id order; empty when there is
    nothing to claim."""
    parameters = {
        "subtask_id": subtask_id,
        "models": list(served),
        "most": max(len(served) - 1, 0),
        "small_items": small_items,
        "worker": worker,
        "lease": timedelta(seconds=lease_s),
    }
    with connected(bind) as conn:
        return _turn_claims(conn.execute(CLAIM_TURN, parameters).all())


def _turn_claims(rows: Sequence[Any]) -> list[Claim]:
    """A turn's claims (`_turn`): its first claim, then the others in id order."""
    return [_claim_of(row) for row in sorted(rows, key=lambda row: (row.turn_order, row.id))]


def claim_more_of_batch(
    bind: Bind, batch_id: uuid.UUID, models: Sequence[str], most: int, worker: str, lease_s: float
) -> list[Claim]:
    """Claim the batch's first `dispatched` serve sub-tasks for `models` (by `seq`), at most
    `most`, like `claim_subtask`, in one statement (their messages, when they come, claim
    something else or nothing); in id order, empty when there is none."""
    parameters = {
        "of_batch": batch_id,
        "models": list(models),
        "most": most,
        "worker": worker,
        "lease": timedelta(seconds=lease_s),
    }
    with connected(bind) as conn:
        rows = conn.execute(CLAIM_MORE_OF_BATCH, parameters).all()
    return sorted((_claim_of(row) for row in rows), key=lambda claim: claim.subtask_id)


def claim_interactive(bind: Bind, models: Sequence[str], worker: str, lease_s: float, small_items: int) -> list[Claim]:
    """Claim the first `dispatched` interactive serve sub-task of one of `models`, like
    `claim_subtask` (its message, when it comes, claims something else or nothing), with
    the first round of its batch when that has at most `small_items` inputs, as `claim_turn`
    does: that claim first, then the others in id order; empty when there is none."""
    parameters = {
        "models": list(models),
        "most": max(len(models) - 1, 0),
        "small_items": small_items,
        "worker": worker,
        "lease": timedelta(seconds=lease_s),
    }
    with connected(bind) as conn:
        return _turn_claims(conn.execute(CLAIM_INTERACTIVE_TURN, parameters).all())


def _claim_of(row: Any) -> Claim:
    return Claim(
        row.id,
        row.batch_id,
        row.model,
        row.attempts,
        row.max_attempts,
        row.rows,
        row.payload,
        row.batch_items,
        row.priority,
        row.model_version,
        row.role,
        row.rides,
    )

"""Roll-outs' reads and writes: start, the batches that pin a roll-out's version, the gate's
evidence (their sub-tasks), the latest gate and the end (promoted or aborted).

Every change of a roll-out is one statement that also writes its `model_events` row
(`queries.sql`: `start_rollout`, `end_rollout`, `record_gate`), so both or neither happen.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Connection, bindparam, func, literal, select
from sqlalchemy.dialects.postgresql import TIMESTAMP

from pipeline.ledger import queries
from pipeline.ledger.counters import UNFINISHED_SUBTASK_STATES
from pipeline.ledger.split import Dispatch, RideQuery, Riding
from pipeline.schema import ModelEvent, Rollout, RolloutBatch, RolloutState, Subtask, SubtaskRole, SubtaskState


@dataclass(frozen=True)
class ActiveRollout:
    """What the split needs of an active roll-out."""

    id: int
    model: str
    version: str
    mode: str
    # A canary's share of inputs in percent; None in shadow.
    percent: float | None


@dataclass(frozen=True)
class Serving:
    """What a batch's first split pins: per model, its champion version and its active
    roll-out; and, when asked (a small batch's split), who consumes its queue (`Riding`)."""

    champions: dict[str, str]
    rollouts: dict[str, ActiveRollout]
    riding: Riding | None = None

    def pins(self, models: Sequence[str]) -> dict[str, tuple[str | None, int | None]]:
        """Per model of `models`, its champion and its active roll-out's id as read (None:
        none), for a store to check they are still current (`split.WholeSplit.pins`)."""
        return {
            model: (self.champions.get(model), self.rollouts[model].id if model in self.rollouts else None)
            for model in models
        }


@dataclass(frozen=True)
class RolloutRecord:
    """A roll-out as `rollout status` shows it."""

    id: int
    model: str
    version: str
    mode: str
    percent: float | None
    state: str
    started_at: datetime
    started_by: str
    ended_at: datetime | None
    ended_by: str | None
    reason: str | None
    gate: dict[str, Any] | None
    batches: int


@dataclass(frozen=True)
class EvidenceSubtask:
    """A finished sub-task of a roll-out's batch, for the gate: its output (None unless it
    succeeded) and its compute seconds. Read with labels, a succeeded serve sub-task also has
    `items` (each row's input index), `lead` (rows of its first input in the sub-tasks before
    it) and `labels` (input index → current label, of the inputs in its item range that have
    one); the others have None, 0 and none."""

    batch_id: uuid.UUID
    seq: int
    role: str
    model_version: str | None
    state: str
    rows: int
    output: bytes | None
    predict_cpu_s: float | None
    # A shadow sub-task's paired timing: the champion's CPU seconds on its rows, same turn.
    champion_cpu_s: float | None
    items: list[int] | None = None
    lead: int = 0
    labels: dict[int, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionCounts:
    """Finished sub-tasks of one version (and role) in a roll-out's batches."""

    model_version: str | None
    role: str
    finished: int
    failed: int
    guardrail_violations: int


ACTIVE_OF_BATCH = (
    select(Rollout.id, Rollout.model, Rollout.version, Rollout.mode, Rollout.percent)
    .join(RolloutBatch, RolloutBatch.rollout_id == Rollout.id)
    .where(Rollout.state == RolloutState.active, RolloutBatch.batch_id == bindparam("batch_id"))
    .order_by(Rollout.id)
)
# When the stored gate was computed; -infinity before any (or with only an error stored).
_gate_at = func.coalesce(
    Rollout.gate["computed_at"].astext.cast(TIMESTAMP(timezone=True)),
    literal("-infinity").cast(TIMESTAMP(timezone=True)),
)
_gate_due = _gate_at <= func.clock_timestamp() - func.make_interval(0, 0, 0, 0, 0, 0, bindparam("min_age_s"))
DUE_OF_BATCH = ACTIVE_OF_BATCH.where(_gate_due)
STALE = select(
    Rollout.id,
    Rollout.model,
    Rollout.version,
    Rollout.mode,
    Rollout.percent,
    Rollout.gate["finished_subtasks"].astext.cast(BigInteger).label("seen"),
).where(Rollout.state == RolloutState.active, _gate_due)
_batches_of = select(func.count()).where(RolloutBatch.rollout_id == Rollout.id).scalar_subquery().label("batches")


def _active(rows: Any) -> list[ActiveRollout]:
    return [ActiveRollout(r.id, r.model, r.version, r.mode, r.percent) for r in rows]


def active_rollouts(conn: Connection, models: Sequence[str]) -> dict[str, ActiveRollout]:
    """Per model of `models` with an active roll-out, that roll-out (`serving_of`'s query)."""
    return serving_of(conn, models).rollouts


def serving_of(conn: Connection, models: Sequence[str], ride: RideQuery | None = None) -> Serving:
    """Per model of `models`, its champion (when it has one) and its active roll-out (when it
    has one); with `ride`, who consumes its queue, and a rider's lease from now by the
    server's clock: one query."""
    parameters = {
        "models": list(models),
        "queues": [] if ride is None else [ride.queues[model] for model in models],
        "max_age_s": 0.0 if ride is None else ride.max_age_s,
    }
    rows = conn.execute(queries.SERVING_OF, parameters).all()
    riding = None
    if ride is not None and rows:
        lease_until = rows[0].read_at + timedelta(seconds=ride.max_age_s)
        riding = Riding({row.model: tuple(row.consumers) for row in rows if row.consumers}, lease_until)
    return Serving(
        {row.model: row.champion for row in rows if row.champion is not None},
        {rollout.model: rollout for rollout in _active(row for row in rows if row.id is not None)},
        riding,
    )


def start_rollout(
    conn: Connection, *, model: str, version: str, mode: str, percent: float | None, actor: str
) -> int | None:
    """Start a roll-out with its `rollout_started` event (one statement); its id, or None
    when the model has an active roll-out already."""
    return conn.execute(
        queries.START_ROLLOUT,
        {"model": model, "version": version, "mode": mode, "percent": percent, "actor": actor},
    ).scalar_one_or_none()


def end_rollout(
    conn: Connection, rollout_id: int, *, state: RolloutState, event: ModelEvent, actor: str, reason: str | None
) -> bool:
    """`active` → `state` with its `event` (one statement); False when it was not active."""
    ended = conn.execute(
        queries.END_ROLLOUT,
        {"id": rollout_id, "state": state.value, "event": event.value, "actor": actor, "reason": reason},
    ).first()
    return ended is not None


def record_gate(conn: Connection, rollout_id: int, gate: dict[str, Any], summary: str, finished: int) -> bool:
    """Store an active roll-out's latest gate, when it was computed and the `finished`
    sub-tasks it saw; when its overall verdict changed, also a `rollout_verdict` event with
    `summary` (one statement). True when it wrote an event."""
    parameters = {
        "id": rollout_id,
        "gate": json.dumps(gate),
        "verdict": gate["verdict"],
        "summary": summary,
        "finished": finished,
    }
    event = conn.execute(queries.RECORD_GATE, parameters).first()
    return event is not None


def record_gate_error(conn: Connection, rollout_id: int, error: dict[str, Any]) -> None:
    """Keep an active roll-out's latest gate and add why it could not be recomputed (under
    `error`; the next `record_gate` replaces the whole gate, error included)."""
    conn.execute(queries.RECORD_GATE_ERROR, {"id": rollout_id, "error": json.dumps(error)})


def add_rollout_batch(conn: Connection, rollout_ids: Sequence[int], batch_id: uuid.UUID) -> None:
    """Record that `batch_id`'s split pinned the versions of `rollout_ids` (a re-split adds nothing)."""
    conn.execute(queries.ADD_ROLLOUT_BATCH, {"rollout_ids": list(rollout_ids), "batch_id": batch_id})


def active_rollouts_of_batch(conn: Connection, batch_id: uuid.UUID) -> list[ActiveRollout]:
    """The active roll-outs whose versions `batch_id`'s split pinned."""
    return _active(conn.execute(ACTIVE_OF_BATCH, {"batch_id": batch_id}))


def due_rollouts_of_batch(conn: Connection, batch_id: uuid.UUID, min_age_s: float) -> list[ActiveRollout]:
    """The active roll-outs whose versions `batch_id`'s split pinned and whose stored gate
    was computed at least `min_age_s` ago (or never)."""
    return _active(conn.execute(DUE_OF_BATCH, {"batch_id": batch_id, "min_age_s": min_age_s}))


def stale_rollouts(conn: Connection, min_age_s: float) -> list[tuple[ActiveRollout, int | None]]:
    """Every active roll-out whose stored gate was computed at least `min_age_s` ago (or
    never), with the finished sub-tasks that gate saw (None before any gate)."""
    rows = conn.execute(STALE, {"min_age_s": min_age_s}).all()
    return [(rollout, row.seen) for rollout, row in zip(_active(rows), rows)]


def latest_rollout(conn: Connection, model: str) -> RolloutRecord | None:
    """`model`'s active roll-out, else its last one; None when it never had one."""
    return _record(
        conn.execute(
            select(Rollout.__table__, _batches_of)
            .where(Rollout.model == model)
            .order_by((Rollout.state == RolloutState.active).desc(), Rollout.id.desc())
            .limit(1)
        ).first()
    )


def rollout_by_id(conn: Connection, model: str, rollout_id: int) -> RolloutRecord | None:
    """`model`'s roll-out `rollout_id` (active or ended); None when it has none of that id."""
    return _record(
        conn.execute(
            select(Rollout.__table__, _batches_of).where(Rollout.model == model, Rollout.id == rollout_id)
        ).first()
    )


def _record(row: Any) -> RolloutRecord | None:
    if row is None:
        return None
    return RolloutRecord(
        row.id,
        row.model,
        row.version,
        row.mode,
        row.percent,
        row.state,
        row.started_at,
        row.started_by,
        row.ended_at,
        row.ended_by,
        row.reason,
        row.gate,
        row.batches,
    )


def evidence_subtasks(
    conn: Connection, rollout_id: int, model: str, limit: int, labels: bool = False
) -> list[EvidenceSubtask]:
    """The first `limit` finished sub-tasks of `model` in the roll-out's batches, in the order
    the batches joined the roll-out, then by seq (append-only: a later batch comes after);
    with `labels`, also the items, lead and current labels of the succeeded serve ones (one
    query either way)."""
    parameters = {"rollout_id": rollout_id, "model": model, "limit": limit, "labels": labels}
    return [
        EvidenceSubtask(
            r.batch_id,
            r.seq,
            r.role,
            r.model_version,
            r.state,
            r.rows,
            r.output,
            r.predict_cpu_s,
            r.champion_cpu_s,
            r.items,
            int(r.lead or 0),
            dict(zip(r.labelled_items or [], r.labels or [], strict=True)),
        )
        for r in conn.execute(queries.ROLLOUT_EVIDENCE, parameters)
    ]


def version_counts(conn: Connection, rollout_id: int, model: str) -> list[VersionCounts]:
    """Per version and role, the finished, failed and guardrail-failed sub-tasks of `model`
    in the roll-out's batches (one query)."""
    rows = conn.execute(queries.ROLLOUT_COUNTS, {"rollout_id": rollout_id, "model": model})
    return [VersionCounts(r.model_version, r.role, r.finished, r.failed, r.guardrail_violations) for r in rows]


def dispatched_shadows(conn: Connection, batch_id: uuid.UUID) -> list[Dispatch]:
    """A batch's shadow sub-tasks still waiting to be claimed: published at the split, their
    messages found them not claimable before the batch finished (see `claims.BEST_DISPATCHED`)."""
    rows = conn.execute(
        select(Subtask.id, Subtask.model, Subtask.priority).where(
            Subtask.batch_id == batch_id,
            Subtask.role == SubtaskRole.shadow,
            Subtask.state == SubtaskState.dispatched,
        )
    )
    return [Dispatch(r.id, r.model, r.priority) for r in rows]


def unfinished_shadow_subtasks(conn: Connection, batch_id: uuid.UUID) -> int:
    """How many of a batch's shadow sub-tasks are not finished yet (taken after all regular
    work, they finish after the batch)."""
    return int(
        conn.execute(
            select(func.count())
            .select_from(Subtask)
            .where(
                Subtask.batch_id == batch_id,
                Subtask.role == SubtaskRole.shadow,
                Subtask.state.in_(UNFINISHED_SUBTASK_STATES),
            )
        ).scalar_one()
    )

"""Roll-outs: try a challenger version of a model on live batches, judge it with the
statistical gate (`pipeline.gate`), then promote it (a passing gate and a named approver)
or abort it.

- `start`: a shadow roll-out (the challenger scores a copy of every batch's rows for the
  model, kept only for the gate) or a canary (it serves `percent` % of the inputs, chosen
  by a stable hash of (batch id, input index): `pipeline.chunker.canary_inputs`);
- `evaluate_batch`: after a batch of a roll-out is aggregated or labelled, the evidence is
  read from its batches' sub-tasks (`pipeline.rollout_evidence`), the gate recomputed and stored on the roll-out
  (an event when its verdict changes), and the challenger aborted automatically when its sub-tasks
  violate the output guardrails or fail more than the champion's (`gate.AbortRule`);
- `promote` / `abort`: end the roll-out; a promotion makes the version champion through
  the registry's guarded alias change.

Every change writes its `model_events` row in the same transaction.
"""

from __future__ import annotations

import logging
import math
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel
from sqlalchemy import Connection, Engine

from pipeline import ledger, registry
from pipeline.errors import InvalidArgumentError, NoChampionError, RolloutError
from pipeline.gate import (
    INSUFFICIENT,
    PASS,
    AbortRule,
    GateResult,
    SubtaskCounts,
    abort_reason,
    judge_canary,
    judge_shadow,
)
from pipeline.ledger import rollouts as rollout_rows
from pipeline.ledger.connection import Bind, connected
from pipeline.model_registry import resolve_version
from pipeline.rollout_evidence import GATE_CONFIG, Evidence, read_evidence
from pipeline.schema import Alias, ModelEvent, RolloutMode, RolloutState, SubtaskRole

if TYPE_CHECKING:
    from pipeline.client import Client

log = logging.getLogger(__name__)

ABORT_RULE = AbortRule()
# Who records what the gate decides (`model_events.actor`).
GATE_ACTOR = "gate"


# The gate's own errors, recorded on the roll-out rather than raised after a batch: evidence it
# refuses (a NaN score, an output that is not whole rows, a decision that is not a class
# number: ValueError, pydantic's ValidationError among them) and numpy's or scipy's refusal of
# a degenerate sample (ValueError, ArithmeticError). Anything else is a bug and propagates; so
# does a database error (nothing could record it, and `rollout status` recomputes the gate).
GATE_ERRORS = (ValueError, ArithmeticError)


class GateError(BaseModel):
    """Why the gate of a roll-out could not be computed last time: when, after what (a batch,
    or `rollout status`) and the exception (type: message). Cleared by the next gate computed."""

    at: datetime
    after: str
    error: str


class RolloutStatus(BaseModel):
    """A roll-out as `rollout status` shows it; `gate` is the latest `GateResult` (None before
    any batch of it was judged), `gate_at` when it was computed, and `gate_error` why it could
    not be recomputed since."""

    id: int
    model: str
    version: str
    mode: RolloutMode
    percent: float | None
    state: RolloutState
    started_at: datetime
    started_by: str
    ended_at: datetime | None
    ended_by: str | None
    reason: str | None
    batches: int
    gate: GateResult | None
    gate_at: datetime | None = None
    gate_error: GateError | None = None

    @property
    def verdict(self) -> str:
        return INSUFFICIENT if self.gate is None else self.gate.verdict


def _status(record: rollout_rows.RolloutRecord) -> RolloutStatus:
    return RolloutStatus(
        id=record.id,
        model=record.model,
        version=record.version,
        mode=RolloutMode(record.mode),
        percent=record.percent,
        state=RolloutState(record.state),
        started_at=record.started_at,
        started_by=record.started_by,
        ended_at=record.ended_at,
        ended_by=record.ended_by,
        reason=record.reason,
        batches=record.batches,
        gate=None if record.gate is None or "verdict" not in record.gate else GateResult.model_validate(record.gate),
        gate_at=None if record.gate is None else record.gate.get("computed_at"),
        gate_error=None if record.gate is None or "error" not in record.gate else record.gate["error"],
    )


def _checked_percent(mode: RolloutMode, percent: float | None) -> float | None:
    if mode == RolloutMode.shadow:
        if percent is not None:
            raise InvalidArgumentError("--percent is for a canary; a shadow roll-out scores every row")
        return None
    if percent is None or not 0 < percent < 100 or not math.isfinite(percent):
        raise InvalidArgumentError(f"a canary needs --percent between 0 and 100 (exclusive), got {percent}")
    return percent


def _active(conn: Connection, model: str) -> rollout_rows.ActiveRollout:
    active = rollout_rows.active_rollouts(conn, [model]).get(model)
    if active is None:
        raise RolloutError(f"model {model!r} has no active roll-out (start one with `pipeline rollout start`)")
    return active


def _latest(conn: Connection, model: str) -> RolloutStatus:
    record = rollout_rows.latest_rollout(conn, model)
    if record is None:
        raise RolloutError(f"model {model!r} has no roll-out (start one with `pipeline rollout start`)")
    return _status(record)


def start(
    engine: Engine, model: str, *, version: str, mode: RolloutMode, started_by: str, percent: float | None = None
) -> RolloutStatus:
    """Start a roll-out of `version` (whole, or a unique prefix) of `model`; it becomes the
    model's challenger. New batches follow it from their split on.

    Raises:
        UnknownPipelineError: no pipeline has `model`.
        UnknownVersionError: `version` is not one of its versions.
        InvalidArgumentError: a bad percent, or `version` is the champion.
        RolloutError: the model has an active roll-out already.
        RegistryConflictError: its challenger alias changed meanwhile.
    Nothing is written when any of these is raised.
    """
    registry.get_model(model)
    percent = _checked_percent(mode, percent)
    with engine.begin() as conn:
        target = resolve_version(conn, model, version)
        champion = ledger.aliases_of(conn, [model]).get(model)
        if champion is None:
            raise NoChampionError(model)
        if target == champion:
            raise InvalidArgumentError(f"model {model!r}: {target[:12]} is the champion; roll out another version")
        challenger = ledger.aliases_of(conn, [model], Alias.challenger).get(model)
        rollout_id = rollout_rows.start_rollout(
            conn, model=model, version=target, mode=mode.value, percent=percent, actor=started_by
        )
        if rollout_id is None:
            active = _active(conn, model)
            raise RolloutError(
                f"model {model!r} already has an active {active.mode} roll-out of {active.version[:12]}"
                " (one per model: promote or abort it first)"
            )
        if challenger != target and not ledger.set_alias(
            conn,
            model=model,
            alias=Alias.challenger,
            version=target,
            expected=challenger,
            actor=started_by,
            reason=f"roll-out {rollout_id}",
        ):
            raise RolloutError(f"model {model!r}: its challenger changed meanwhile; nothing was started")
        return _latest(conn, model)


def status(engine: Engine, model: str, refresh: bool = True, rollout_id: int | None = None) -> RolloutStatus:
    """`model`'s active roll-out (else its last one; its roll-out `rollout_id` when given,
    ended ones included), its gate first recomputed from the evidence so far when `refresh`
    and it is active.

    Raises:
        UnknownPipelineError: no pipeline has `model`.
        RolloutError: it never had a roll-out, or none of id `rollout_id`.
    """
    registry.get_model(model)
    if refresh:
        with engine.connect() as conn:
            active = rollout_rows.active_rollouts(conn, [model]).get(model)
        if active is not None and rollout_id in (None, active.id):
            _evaluate_recording_errors(engine, active, "on `rollout status`")
    with engine.connect() as conn:
        if rollout_id is None:
            return _latest(conn, model)
        record = rollout_rows.rollout_by_id(conn, model, rollout_id)
    if record is None:
        raise RolloutError(f"model {model!r} has no roll-out {rollout_id} (`pipeline rollout status {model}`)")
    return _status(record)


def promote(
    engine: Engine, model: str, *, approved_by: str, reason: str | None = None, force: bool = False
) -> RolloutStatus:
    """Make the active roll-out's version `model`'s champion for new batches (the registry's
    guarded alias change, by `approved_by`) and end the roll-out as `promoted`. Refused
    unless its gate is `pass`, or `force` with a `reason` (recorded as forced).

    Raises:
        UnknownPipelineError: no pipeline has `model`.
        InvalidArgumentError: no approver, or `force` without a reason.
        RolloutError: no active roll-out, or its gate is not `pass` (without `force`).
        RegistryConflictError: the champion changed meanwhile.
    """
    registry.get_model(model)
    if not approved_by.strip():
        raise InvalidArgumentError("a promotion needs a named approver (--approved-by NAME)")
    if force and not (reason or "").strip():
        raise InvalidArgumentError("--force needs --reason TEXT: why promote without a passing gate")
    with engine.begin() as conn:
        active = _active(conn, model)
        current = _latest(conn, model)
        if current.verdict != PASS and not force:
            why = "; ".join(current.gate.reasons) if current.gate is not None else "no batch judged yet"
            raise RolloutError(
                f"model {model!r}: promotion refused, the gate is {current.verdict!r} ({why});"
                " --force --reason TEXT overrides"
            )
        recorded = f"gate {current.verdict}" + (f"; forced: {reason}" if force else f"; {reason}" if reason else "")
        champion = ledger.aliases_of(conn, [model]).get(model)
        if not ledger.set_alias(
            conn,
            model=model,
            alias=Alias.champion,
            version=active.version,
            expected=champion,
            actor=approved_by,
            reason=recorded,
        ):
            raise RolloutError(f"model {model!r}: its champion changed meanwhile; nothing was promoted")
        rollout_rows.end_rollout(
            conn,
            active.id,
            state=RolloutState.promoted,
            event=ModelEvent.rollout_promoted,
            actor=approved_by,
            reason=recorded,
        )
        return _latest(conn, model)


def abort(engine: Engine, model: str, *, actor: str, reason: str | None = None) -> RolloutStatus:
    """End `model`'s active roll-out as `aborted`: new batches no longer follow it (the
    champion is unchanged; batches already split keep their sub-tasks).

    Raises:
        UnknownPipelineError: no pipeline has `model`.
        RolloutError: it has no active roll-out.
    """
    registry.get_model(model)
    with engine.begin() as conn:
        active = _active(conn, model)
        rollout_rows.end_rollout(
            conn, active.id, state=RolloutState.aborted, event=ModelEvent.rollout_aborted, actor=actor, reason=reason
        )
        return _latest(conn, model)


def _counts(counts: list[rollout_rows.VersionCounts], challenger: bool) -> SubtaskCounts:
    finished = failed = violations = 0
    for c in counts:
        finished, failed, violations = finished + c.finished, failed + c.failed, violations + c.guardrail_violations
    return SubtaskCounts(finished=finished, failed=failed, guardrail_violations=violations if challenger else 0)


def _split_counts(
    rollout: rollout_rows.ActiveRollout, counts: list[rollout_rows.VersionCounts]
) -> tuple[SubtaskCounts, SubtaskCounts]:
    """(champion, challenger) sub-task counts: by role in shadow, by version in a canary."""
    if rollout.mode == RolloutMode.shadow:
        tried = [c.role == SubtaskRole.shadow for c in counts]
    else:
        tried = [c.model_version == rollout.version for c in counts]
    return (
        _counts([c for c, t in zip(counts, tried) if not t], challenger=False),
        _counts([c for c, t in zip(counts, tried) if t], challenger=True),
    )


def judge(found: Evidence) -> GateResult:
    """The gate's verdict on `found` (see `evidence`)."""
    if found.paired is not None:
        return judge_shadow(found.paired, found.timings, GATE_CONFIG)
    assert found.champion is not None and found.challenger is not None  # a canary's evidence
    return judge_canary(found.champion, found.challenger, found.timings, GATE_CONFIG)


def evaluate_rollout(engine: Engine, rollout: rollout_rows.ActiveRollout, seen: int | None = None) -> GateResult | None:
    """Abort `rollout` automatically when its challenger must stop (recorded with the
    reason), else recompute its gate and store it. `seen`: the finished sub-tasks its stored
    gate saw; when that is still their number, nothing new can change the gate and it is
    kept. Returns the gate; None when aborted or kept."""
    with engine.connect() as conn:
        counts = rollout_rows.version_counts(conn, rollout.id, rollout.model)
    finished = sum(count.finished for count in counts)
    if seen is not None and finished == seen:
        return None
    champion, challenger = _split_counts(rollout, counts)
    why = abort_reason(champion, challenger, ABORT_RULE)
    if why is not None:
        with engine.begin() as conn:
            ended = rollout_rows.end_rollout(
                conn,
                rollout.id,
                state=RolloutState.aborted,
                event=ModelEvent.rollout_aborted,
                actor=GATE_ACTOR,
                reason=f"automatic: {why}",
            )
        if ended:
            log.warning("roll-out %d of %s aborted: %s", rollout.id, rollout.model, why)
        return None
    with engine.connect() as conn:
        _, found = read_evidence(conn, rollout)
    gate = judge(found)
    summary = f"{gate.verdict}: " + "; ".join(gate.reasons) if gate.reasons else gate.verdict
    with engine.begin() as conn:
        if rollout_rows.record_gate(conn, rollout.id, gate.model_dump(mode="json"), summary, finished):
            log.info("roll-out %d of %s: gate %s", rollout.id, rollout.model, gate.verdict)
    return gate


def _evaluate_recording_errors(
    engine: Engine, rollout: rollout_rows.ActiveRollout, after: str, seen: int | None = None
) -> None:
    """`evaluate_rollout`, where an error of the gate (`GATE_ERRORS`) is logged with its
    traceback and recorded on the roll-out (`gate.error`, until a later gate succeeds)
    instead of raised: a bad evidence row must not fail the caller's work."""
    try:
        evaluate_rollout(engine, rollout, seen)
    except GATE_ERRORS as error:
        log.exception("roll-out %d of %s: the gate could not be computed %s", rollout.id, rollout.model, after)
        recorded = GateError(at=datetime.now(UTC), after=after, error=f"{type(error).__name__}: {error}")
        with engine.begin() as conn:
            rollout_rows.record_gate_error(conn, rollout.id, recorded.model_dump(mode="json"))


def evaluate_batch(bind: Bind, batch_id: uuid.UUID, after: str = "after batch", min_age_s: float = 0.0) -> None:
    """After `batch_id` is aggregated, or labels for it are stored (committed): judge each
    active roll-out its split followed whose stored gate is at least `min_age_s` old (one
    query when none is). The aggregate passes `PIPELINE_ROLLOUT_GATE_INTERVAL_S`: a stream
    of small batches, aggregated in the workers, then recomputes a gate at most once per
    interval, and `refresh_gates` catches up on what it skipped. An error of the gate is
    logged and recorded on the roll-out (`after` names the moment), never raised: the batch
    and its labels are done whatever the gate makes of them. `bind`: an Engine, or an
    autocommit Connection (a worker's turn) for that query."""
    # One statement on its own (no BEGIN and ROLLBACK around it): every aggregate runs it.
    with connected(bind) as conn:
        due = rollout_rows.due_rollouts_of_batch(conn, batch_id, min_age_s)
    for rollout in due:
        # Each gate on a connection of its own (an Engine's `engine` is itself).
        _evaluate_recording_errors(bind.engine, rollout, f"{after} {batch_id}")


def refresh_gates(engine: Engine, min_age_s: float) -> None:
    """Recompute the gate of every active roll-out whose stored gate is at least `min_age_s`
    old and whose sub-tasks finished since (the shadow sub-tasks of its last batches, which
    finish after them, or batches whose gate `evaluate_batch` skipped). The aggregator's
    sweeper runs it at each sweep. Errors of the gate are recorded, as `evaluate_batch` does."""
    with engine.connect() as conn:
        stale = rollout_rows.stale_rollouts(conn, min_age_s)
    for rollout, seen in stale:
        _evaluate_recording_errors(engine, rollout, "on the sweeper's refresh", seen)


def as_json(status: RolloutStatus) -> dict[str, Any]:
    """`status` as JSON-able data (`rollout status --json`)."""
    return status.model_dump(mode="json")


class Rollouts:
    """`client.rollouts`: the functions above on a client's ledger. Raises as they do."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def start(
        self,
        model: str,
        *,
        version: str,
        mode: Literal["shadow", "canary"] = "shadow",
        percent: float | None = None,
        started_by: str,
    ) -> RolloutStatus:
        """Start a shadow roll-out of `version` of `model`, or a canary serving `percent` % of inputs."""
        return start(
            self._client.engine, model, version=version, mode=RolloutMode(mode), percent=percent, started_by=started_by
        )

    def status(self, model: str) -> RolloutStatus:
        """`model`'s active roll-out (else its last one) with its gate recomputed."""
        return status(self._client.engine, model)

    def promote(self, model: str, *, approved_by: str, reason: str | None = None, force: bool = False) -> RolloutStatus:
        """Make the roll-out's version the champion: needs a passing gate, or `force` with a `reason`."""
        return promote(self._client.engine, model, approved_by=approved_by, reason=reason, force=force)

    def abort(self, model: str, *, actor: str, reason: str | None = None) -> RolloutStatus:
        """End the roll-out; the champion is unchanged."""
        return abort(self._client.engine, model, actor=actor, reason=reason)

"""Roll-outs: try a challenger version of a model on live batches, judge it with the
statistical gate (`pipeline.gate`), then promote it (a passing gate and a named approver)
or abort it.

- `start`: a shadow roll-out (the challenger scores a copy of every batch's rows for the
  model, kept only for the gate) or a canary (it serves `percent` % of the inputs, chosen
  by a stable hash of (batch id, input index): `pipeline.splitter.canary_inputs`);
- `evaluate_batch`: after a batch of a roll-out is aggregated or labelled, the evidence is
  read from its batches' sub-tasks (with the labels stored for their inputs, mapped to rows
  by the pipeline's `Pipeline.row_labels`), the gate recomputed and stored on the roll-out
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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel
from sqlalchemy import Connection, Engine

from pipeline import ledger, registry
from pipeline.definition import ModelSpec, RowLabels
from pipeline.errors import InvalidArgumentError, NoChampionError, RolloutError
from pipeline.gate import (
    INSUFFICIENT,
    PASS,
    AbortRule,
    GateConfig,
    GateResult,
    PairedRows,
    SubtaskCounts,
    Timings,
    VersionRows,
    abort_reason,
    judge_canary,
    judge_shadow,
)
from pipeline.ledger import rollouts as rollout_rows
from pipeline.model_registry import resolve_version
from pipeline.schema import Alias, ModelEvent, RolloutMode, RolloutState, SubtaskRole, SubtaskState

if TYPE_CHECKING:
    from pipeline.client import Client

log = logging.getLogger(__name__)

GATE_CONFIG = GateConfig()
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


def decisions_of(spec: ModelSpec, output: np.ndarray) -> tuple[np.ndarray, int]:
    """The decision (a class number) of each output row of `spec`'s model, and how many
    classes there are: the label column's label, the most probable class of a probability
    output, else whether the watched score is at least 0.5."""
    if spec.label_columns:
        labels = np.asarray(spec.labels, dtype=np.float64)
        column = output[:, spec.label_columns[0]].astype(np.float64)
        return np.abs(column[:, None] - labels[None, :]).argmin(axis=1), len(labels)
    if spec.probabilities and spec.n_outputs > 1:
        return output.argmax(axis=1), spec.n_outputs
    return (spec.output_score(output) >= 0.5).astype(np.int64), 2


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


def row_offsets(items: np.ndarray, lead: int) -> np.ndarray:
    """Each row's position among its input's rows, for a sub-task whose rows' inputs are
    `items` (non-decreasing) and whose first input has `lead` rows in the sub-tasks before it."""
    offsets = np.arange(len(items)) - np.searchsorted(items, items)
    offsets[items == items[0]] += lead
    return offsets


class _Side:
    """One version's evidence: scores, decisions and labels per row, seconds per row per sub-task."""

    def __init__(self, row_labels: RowLabels | None) -> None:
        self.scores: list[np.ndarray] = []
        self.decisions: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.seconds: list[float] = []
        self.classes = 2
        self.row_labels = row_labels

    def add(
        self,
        spec: ModelSpec,
        subtask: rollout_rows.EvidenceSubtask,
        rows: bool = True,
        labelled: rollout_rows.EvidenceSubtask | None = None,
    ) -> None:
        """Add `subtask`'s timing and, with `rows`, its rows, labelled by the items and labels
        of `labelled` (default: its own; a shadow sub-task's are its serve twin's)."""
        if subtask.predict_cpu_s is not None:
            self.seconds.append(max(subtask.predict_cpu_s, 0.0) / subtask.rows)
        if rows and subtask.output is not None:
            output = np.frombuffer(subtask.output, "<f4").reshape(-1, spec.n_outputs)
            decisions, self.classes = decisions_of(spec, output)
            self.scores.append(spec.output_score(output).astype(np.float64))
            self.decisions.append(decisions)
            source = labelled or subtask
            if self.row_labels is not None and source.items is not None:
                items = np.asarray(source.items, dtype=np.int64)
                self.labels.append(self.row_labels(items, row_offsets(items, source.lead), source.labels))

    def rows(self, key: str) -> np.ndarray:
        values = self.scores if key == "scores" else self.decisions
        return np.concatenate(values) if values else np.empty(0)

    def row_labels_or_none(self) -> np.ndarray | None:
        """The rows' labels (NO_LABEL where unknown); None when the model maps no labels."""
        if self.row_labels is None:
            return None
        return np.concatenate(self.labels).astype(np.int64) if self.labels else np.empty(0, dtype=np.int64)


def _evidence_limit(spec: ModelSpec) -> int:
    """Sub-tasks read per look: enough for the gate's largest sample of paired rows and timings."""
    paired = GATE_CONFIG.milestones(GATE_CONFIG.min_paired_rows)[-1]
    timings = GATE_CONFIG.milestones(GATE_CONFIG.min_timings)[-1]
    return 2 * max(math.ceil(paired / spec.chunk_size), timings)


@dataclass(frozen=True)
class Evidence:
    """What the gate of a roll-out judges: the paired rows (shadow) or each version's rows
    (canary), and each version's timings."""

    timings: Timings
    paired: PairedRows | None = None
    champion: VersionRows | None = None
    challenger: VersionRows | None = None


def evidence(
    spec: ModelSpec,
    rollout: rollout_rows.ActiveRollout,
    subtasks: list[rollout_rows.EvidenceSubtask],
    row_labels: RowLabels | None = None,
) -> Evidence:
    """The gate's evidence of `rollout` from its batches' finished sub-tasks (in recorded
    order), their rows labelled by `row_labels` (the pipeline's `Pipeline.row_labels` of the
    model) from the items and labels read with them; None: no labels.

    Raises:
        ValueError: an output that is not whole rows, a NaN score (see `PairedRows`).
    """
    champion, challenger = _Side(row_labels), _Side(row_labels)
    succeeded = [s for s in subtasks if s.state == SubtaskState.succeeded]
    if rollout.mode == RolloutMode.shadow:
        shadows = {(s.batch_id, -1 - s.seq): s for s in succeeded if s.role == SubtaskRole.shadow}
        serves = {(s.batch_id, s.seq): s for s in succeeded if s.role == SubtaskRole.serve}
        # Rows only where both versions scored them, in the serve sub-tasks' order; timings of all.
        for key, serve in serves.items():
            champion.add(spec, serve, rows=key in shadows)
            if key in shadows:
                challenger.add(spec, shadows[key], labelled=serve)
        for key, shadow in shadows.items():
            if key not in serves:
                challenger.add(spec, shadow, rows=False)
        paired = PairedRows(
            champion.rows("scores"),
            challenger.rows("scores"),
            champion.rows("decisions").astype(np.int64),
            challenger.rows("decisions").astype(np.int64),
            classes=max(champion.classes, challenger.classes),
            labels=champion.row_labels_or_none(),
        )
        timings = Timings(np.asarray(champion.seconds), np.asarray(challenger.seconds))
        return Evidence(timings, paired=paired)
    for subtask in succeeded:
        (challenger if subtask.model_version == rollout.version else champion).add(spec, subtask)
    classes = max(champion.classes, challenger.classes)
    return Evidence(
        Timings(np.asarray(champion.seconds), np.asarray(challenger.seconds)),
        champion=VersionRows(
            champion.rows("decisions").astype(np.int64), classes=classes, labels=champion.row_labels_or_none()
        ),
        challenger=VersionRows(
            challenger.rows("decisions").astype(np.int64), classes=classes, labels=challenger.row_labels_or_none()
        ),
    )


def judge(found: Evidence) -> GateResult:
    """The gate's verdict on `found` (see `evidence`)."""
    if found.paired is not None:
        return judge_shadow(found.paired, found.timings, GATE_CONFIG)
    assert found.champion is not None and found.challenger is not None  # a canary's evidence
    return judge_canary(found.champion, found.challenger, found.timings, GATE_CONFIG)


def read_evidence(
    conn: Connection, rollout: rollout_rows.ActiveRollout
) -> tuple[list[rollout_rows.EvidenceSubtask], Evidence]:
    """The finished sub-tasks the gate of `rollout` reads (with their labels where its model
    maps them) and the evidence built from them.

    Raises:
        ValueError: evidence the gate refuses (see `evidence`).
    """
    spec = registry.get_model(rollout.model)
    row_labels = registry.pipeline_of(rollout.model).row_labels(rollout.model)
    limit = _evidence_limit(spec)
    subtasks = rollout_rows.evidence_subtasks(conn, rollout.id, rollout.model, limit, labels=row_labels is not None)
    return subtasks, evidence(spec, rollout, subtasks, row_labels)


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


def evaluate_batch(engine: Engine, batch_id: uuid.UUID, after: str = "after batch", min_age_s: float = 0.0) -> None:
    """After `batch_id` is aggregated, or labels for it are stored (committed): judge each
    active roll-out its split followed whose stored gate is at least `min_age_s` old (one
    query when none is). The aggregate passes `PIPELINE_ROLLOUT_GATE_INTERVAL_S`: a stream
    of small batches, aggregated in the workers, then recomputes a gate at most once per
    interval, and `refresh_gates` catches up on what it skipped. An error of the gate is
    logged and recorded on the roll-out (`after` names the moment), never raised: the batch
    and its labels are done whatever the gate makes of them."""
    with engine.connect() as conn:
        due = rollout_rows.due_rollouts_of_batch(conn, batch_id, min_age_s)
    for rollout in due:
        _evaluate_recording_errors(engine, rollout, f"{after} {batch_id}")


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

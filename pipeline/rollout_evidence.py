"""A roll-out's evidence: what the gate (`pipeline.gate`) judges, read from the sub-tasks
of the roll-out's batches. Shadow rows are paired with their serve twins by (batch, seq);
canary rows are taken per version; each side's decisions and scores come from the model's
outputs (`decisions_of`), its labels from the stored labels of the rows' inputs mapped by
the pipeline's `Pipeline.row_labels`, its timings from each sub-task's `predict_cpu_s`.
`rollouts` judges it, `rollout_report` shows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Connection

from pipeline import registry
from pipeline.definition import ModelSpec, RowLabels
from pipeline.gate import GateConfig, PairedRows, Timings, VersionRows
from pipeline.ledger import rollouts as rollout_rows
from pipeline.schema import RolloutMode, SubtaskRole, SubtaskState

GATE_CONFIG = GateConfig()


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
        labelled: rollout_rows.EvidenceSubtask | None = None,
    ) -> None:
        """Add `subtask`'s rows, labelled by the items and labels of `labelled` (default: its
        own; a shadow sub-task's are its serve twin's). Timings are added apart (`add_seconds`)."""
        if subtask.output is not None:
            output = np.frombuffer(subtask.output, "<f4").reshape(-1, spec.n_outputs)
            decisions, self.classes = decisions_of(spec, output)
            self.scores.append(spec.output_score(output).astype(np.float64))
            self.decisions.append(decisions)
            source = labelled or subtask
            if self.row_labels is not None and source.items is not None:
                items = np.asarray(source.items, dtype=np.int64)
                self.labels.append(self.row_labels(items, row_offsets(items, source.lead), source.labels))

    def add_seconds(self, cpu_s: float | None, rows: int) -> None:
        """Add a timing of `cpu_s` CPU seconds over `rows` rows (none when None)."""
        if cpu_s is not None:
            self.seconds.append(max(cpu_s, 0.0) / rows)

    def rows(self, key: str) -> np.ndarray:
        values = self.scores if key == "scores" else self.decisions
        return np.concatenate(values) if values else np.empty(0)

    def row_labels_or_none(self) -> np.ndarray | None:
        """The rows' labels (NO_LABEL where unknown); None when the model maps no labels."""
        if self.row_labels is None:
            return None
        return np.concatenate(self.labels).astype(np.int64) if self.labels else np.empty(0, dtype=np.int64)


def evidence_limit(spec: ModelSpec) -> int:
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
        # Rows only where both versions scored them, in the serve sub-tasks' order.
        for key, serve in serves.items():
            if key in shadows:
                champion.add(spec, serve)
                challenger.add(spec, shadows[key], labelled=serve)
        # Timings only in pairs, from the shadow sub-tasks: each times both versions on the
        # same rows in the same turn. A serve sub-task's own timing is not comparable: it ran
        # at another moment, in other company (a small batch's back to back in one turn, the
        # model in cache; an identical forest's shadows measured 1.4-1.7x slower that way).
        for shadow in shadows.values():
            if shadow.predict_cpu_s is not None and shadow.champion_cpu_s is not None:
                champion.add_seconds(shadow.champion_cpu_s, shadow.rows)
                challenger.add_seconds(shadow.predict_cpu_s, shadow.rows)
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
        side = challenger if subtask.model_version == rollout.version else champion
        side.add(spec, subtask)
        side.add_seconds(subtask.predict_cpu_s, subtask.rows)
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
    limit = evidence_limit(spec)
    subtasks = rollout_rows.evidence_subtasks(conn, rollout.id, rollout.model, limit, labels=row_labels is not None)
    return subtasks, evidence(spec, rollout, subtasks, row_labels)

"""A batch's drift: the PSI (effect) and chi-square p-value (evidence) of every model's
input features and output score against the reference profile in its manifest, and
the verdict over all of them, from the bin counts each worker stored with its
sub-task's output (the aggregator only sums them)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, bindparam, select

from pipeline.artifacts import drift_reference
from pipeline.definition import Pipeline
from pipeline.profile import DriftConfig, ModelCounts, judge_counts
from pipeline.schema import Subtask, SubtaskState

# Built once: every aggregate runs it.
STORED_COUNTS = select(Subtask.model, Subtask.model_version, Subtask.rows, Subtask.bin_counts).where(
    Subtask.batch_id == bindparam("batch_id"),
    Subtask.state == SubtaskState.succeeded,
    Subtask.bin_counts.is_not(None),
)


def stored_counts(conn: Connection, batch_id: uuid.UUID) -> dict[tuple[str, str], tuple[int, np.ndarray]]:
    """Per (model, model version): rows scored and the sum of the drift bin counts the
    workers stored, over a batch's succeeded sub-tasks (one query)."""
    totals: dict[tuple[str, str], tuple[int, np.ndarray]] = {}
    stored = conn.execute(STORED_COUNTS, {"batch_id": batch_id})
    for row in stored:
        key = (row.model, row.model_version)
        counts = np.frombuffer(row.bin_counts, dtype="<i8")
        rows, total = totals.get(key, (0, np.zeros_like(counts)))
        totals[key] = (rows + row.rows, total + counts)
    return totals


def batch_drift(
    conn: Connection, batch_id: uuid.UUID, pipeline: Pipeline, models_dir: Path
) -> tuple[dict[str, Any], list[tuple[ModelCounts, str]]]:
    """Return the drift section of a batch's metrics, and the counts of each judged model with
    its version's SHA-256 (what the batch adds to its windows) (docs/monitoring.md, "Drift, calibrated
    to sample size").

    Per model: rows scored, its reference's rows and version, and its output score's PSI,
    band, p-value, whether that is significant and whether it is drifted; or why it was
    skipped. Per feature (by name): the same figures. Then the drifted features and
    scores, the share of drifted features (None when no model could be judged) and the
    batch's `drifted` flag, with the false-alarm rate, minimum PSI and bands used.
    """
    config: DriftConfig = pipeline.drift
    skipped: dict[str, dict[str, Any]] = {}
    judged: list[tuple[ModelCounts, str]] = []
    totals = stored_counts(conn, batch_id)
    for spec in pipeline.models:
        reference = drift_reference(models_dir, spec)
        if isinstance(reference, str):
            skipped[spec.name] = {"skipped": reference}
            continue
        manifest, profile = reference
        rows, counts = totals.get((spec.name, manifest.version), (0, None))
        if counts is None:
            skipped[spec.name] = {"skipped": f"no succeeded sub-task scored by version {manifest.version}"}
            continue
        judged.append((ModelCounts(spec.name, rows, manifest.version, profile, counts), manifest.sha256))
    figures = judge_counts(config, [model for model, _ in judged])
    features = figures["features"]
    drift = {
        "false_alarm_rate": config.false_alarm_rate,
        "min_psi": config.min_psi,
        "bands": {"moderate": config.moderate, "major": config.major},
        "tests": figures["tests"],
        "models": {spec.name: figures["models"].get(spec.name) or skipped[spec.name] for spec in pipeline.models},
        "features": features,
        "drifted_features": figures["drifted_features"],
        "drifted_scores": figures["drifted_scores"],
        "drifted_share": round(len(figures["drifted_features"]) / len(features), 6) if features else None,
        "drifted": bool(figures["drifted_features"] or figures["drifted_scores"]),
    }
    return drift, judged

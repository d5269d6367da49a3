"""A batch's drift: PSI of every model's input features and output score against the
reference profile in its manifest, from the bin counts each worker stored with its
sub-task's output (the aggregator only sums them)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, bindparam, select

from pipeline.artifacts import read_manifest
from pipeline.definition import ModelSpec, Pipeline
from pipeline.errors import ArtifactError
from pipeline.profile import Band, DriftConfig, ReferenceProfile
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


def _profile(models_dir: Path, spec: ModelSpec) -> tuple[ReferenceProfile | None, str]:
    """(reference profile, its model version) or (None, why there is none)."""
    try:
        manifest = read_manifest(models_dir, spec.name)
    except ArtifactError as error:
        return None, str(error)
    profile = manifest.reference
    if profile is None:
        return None, f"model {spec.name!r} was trained without a reference profile (retrain it)"
    if len(profile.features) != spec.n_features:
        return None, f"model {spec.name!r}: reference has {len(profile.features)} features, model {spec.n_features}"
    return profile, manifest.version


def batch_drift(conn: Connection, batch_id: uuid.UUID, pipeline: Pipeline, models_dir: Path) -> dict[str, Any]:
    """Return the drift section of a batch's metrics.

    Per model: rows scored, PSI and band of its output score, or why it was skipped.
    Per feature (by name, the largest PSI over the models that take it): PSI and band.
    Then the features and scores in the significant band, the share of drifted
    features and the batch's drift flag. A model that scored fewer than the
    pipeline's `drift.min_rows` rows flags nothing.
    """
    config: DriftConfig = pipeline.drift
    models: dict[str, dict[str, Any]] = {}
    features: dict[str, dict[str, Any]] = {}
    totals = stored_counts(conn, batch_id)
    for spec in pipeline.models:
        profile, version = _profile(models_dir, spec)
        if profile is None:
            models[spec.name] = {"skipped": version}
            continue
        rows, counts = totals.get((spec.name, version), (0, None))
        if counts is None:
            models[spec.name] = {"skipped": f"no succeeded sub-task scored by version {version}"}
            continue
        *feature_psis, score_psi = profile.psis(counts).tolist()
        models[spec.name] = {
            "rows": rows,
            "reference_version": version,
            "score_psi": round(score_psi, 6),
            "score_band": config.band(score_psi, rows).value,
        }
        for histogram, value in zip(profile.features, feature_psis):
            known = features.get(histogram.name)
            if known is None or value > known["psi"]:
                features[histogram.name] = {"psi": round(value, 6), "band": config.band(value, rows).value}
    drifted_features = [name for name, entry in features.items() if entry["band"] == Band.significant]
    drifted_scores = [name for name, entry in models.items() if entry.get("score_band") == Band.significant]
    judged = any(entry.get("rows", 0) >= config.min_rows for entry in models.values())
    return {
        "min_rows": config.min_rows,
        "bands": {"moderate": config.moderate, "significant": config.significant},
        "models": models,
        "features": features,
        "drifted_features": drifted_features,
        "drifted_scores": drifted_scores,
        "drifted_share": round(len(drifted_features) / len(features), 6) if judged and features else None,
        "drifted": bool(drifted_features or drifted_scores),
    }

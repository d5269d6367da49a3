"""A batch's drift: PSI of every model's input features and output score against the
reference profile in its manifest, from bin counts accumulated page by page over
the batch's succeeded sub-tasks (never all rows in memory)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, select

from pipeline.artifacts import ArtifactError, read_manifest
from pipeline.definition import ModelSpec, Pipeline
from pipeline.profile import Band, DriftConfig, ReferenceProfile, psi
from pipeline.schema import Subtask, SubtaskState

PAGE = 64


class ModelCounts:
    """Bin counts of one model's input features and output score, one page of sub-tasks at a time."""

    def __init__(self, spec: ModelSpec, profile: ReferenceProfile) -> None:
        self.spec = spec
        self.profile = profile
        self.rows = 0
        self.features = [np.zeros(len(h.edges) + 1, dtype=np.int64) for h in profile.features]
        self.score = np.zeros(len(profile.score.edges) + 1, dtype=np.int64)

    def add(self, X: np.ndarray, output: np.ndarray) -> None:
        self.rows += len(X)
        for column, histogram in enumerate(self.profile.features):
            self.features[column] += histogram.counts(X[:, column])
        self.score += self.profile.score.counts(self.spec.output_score(output))


def count_model(conn: Connection, batch_id: uuid.UUID, counts: ModelCounts) -> None:
    """Add a batch's succeeded sub-tasks of `counts.spec`'s model to `counts`, one page of sub-tasks per query."""
    spec = counts.spec
    after = -1
    while True:
        page = conn.execute(
            select(Subtask.seq, Subtask.rows, Subtask.payload, Subtask.output)
            .where(
                Subtask.batch_id == batch_id,
                Subtask.model == spec.name,
                Subtask.state == SubtaskState.succeeded,
                Subtask.seq > after,
            )
            .order_by(Subtask.seq)
            .limit(PAGE)
        ).all()
        if page:
            counts.add(
                np.concatenate([np.frombuffer(r.payload, "<f4").reshape(r.rows, spec.n_features) for r in page]),
                np.concatenate([np.frombuffer(r.output, "<f4").reshape(r.rows, spec.n_outputs) for r in page]),
            )
        if len(page) < PAGE:
            return
        after = page[-1].seq


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
    for spec in pipeline.models:
        profile, version = _profile(models_dir, spec)
        if profile is None:
            models[spec.name] = {"skipped": version}
            continue
        counts = ModelCounts(spec, profile)
        count_model(conn, batch_id, counts)
        if counts.rows == 0:
            models[spec.name] = {"skipped": "no succeeded sub-task"}
            continue
        score_psi = psi(profile.score.expected, counts.score)
        models[spec.name] = {
            "rows": counts.rows,
            "reference_version": version,
            "score_psi": round(score_psi, 6),
            "score_band": config.band(score_psi, counts.rows).value,
        }
        for histogram, feature_counts in zip(profile.features, counts.features):
            value = psi(histogram.expected, feature_counts)
            known = features.get(histogram.name)
            if known is None or value > known["psi"]:
                features[histogram.name] = {"psi": round(value, 6), "band": config.band(value, counts.rows).value}
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

"""A batch's drift: the PSI (effect) and chi-square p-value (evidence) of every model's
input features and output score against the reference profile of the model version that
scored the rows (its manifest in the registry), and
the verdict over all of them, from the bin counts each worker stored with its
sub-task's output (the aggregator only sums them)."""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import Connection, bindparam, select

from pipeline import ledger
from pipeline.artifacts import Manifest
from pipeline.definition import ModelSpec, Pipeline
from pipeline.profile import DriftConfig, ReferenceProfile
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


def _scoring_versions(totals: dict[tuple[str, str], tuple[int, np.ndarray]]) -> dict[str, str]:
    """Per model, the version that scored most of the batch's rows (normally the only one)."""
    rows: dict[str, tuple[int, str]] = {}
    for (model, version), (scored, _) in totals.items():
        if scored > rows.get(model, (-1, ""))[0]:
            rows[model] = (scored, version)
    return {model: version for model, (_, version) in rows.items()}


def _profile(spec: ModelSpec, manifest: dict[str, Any] | None, version: str) -> tuple[ReferenceProfile | None, str]:
    """(reference profile of `version`, the version) or (None, why there is none)."""
    if manifest is None:
        return None, f"model {spec.name!r}: version {version[:12]} is not in the registry"
    profile = Manifest.model_validate(manifest).reference
    if profile is None:
        return None, f"model {spec.name!r} was trained without a reference profile (retrain it)"
    if len(profile.features) != spec.n_features:
        return None, f"model {spec.name!r}: reference has {len(profile.features)} features, model {spec.n_features}"
    return profile, version


class ModelCounts(NamedTuple):
    """A model's summed drift bin counts over a batch, with the reference they are judged against."""

    name: str
    rows: int
    version: str
    profile: ReferenceProfile
    counts: np.ndarray


def _figures(config: DriftConfig, test: tuple[float, float], significant: bool, drifted: bool) -> dict[str, Any]:
    """One test's JSON figures: PSI, band, p-value, significant, drifted."""
    psi, p_value = test
    return {
        "psi": round(psi, 6),
        "band": config.band(psi).value,
        "p_value": None if np.isnan(p_value) else float(f"{p_value:.4g}"),
        "significant": significant,
        "drifted": drifted,
    }


def judge_counts(config: DriftConfig, models: list[ModelCounts]) -> dict[str, Any]:
    """The drift figures of a batch from its models' counts: per model its score's test,
    per feature (by name) one test, on the model that scored the most rows (the first in
    `models` on a tie), then the verdict over all of them together (`DriftConfig.judge`)."""
    judged = [(model, model.profile.psis(model.counts), model.profile.p_values(model.counts)) for model in models]
    features: dict[str, tuple[float, float]] = {}
    for model, psis, p_values in sorted(judged, key=lambda entry: -entry[0].rows):
        for histogram, psi, p_value in zip(model.profile.features, psis[:-1], p_values[:-1]):
            features.setdefault(histogram.name, (float(psi), float(p_value)))
    scores = {model.name: (float(psis[-1]), float(p_values[-1])) for model, psis, p_values in judged}
    tests = [*features.values(), *scores.values()]
    verdict = config.judge(np.array([psi for psi, _ in tests]), np.array([p for _, p in tests]))
    entries = [
        _figures(config, test, significant, drifted)
        for test, significant, drifted in zip(tests, verdict.significant.tolist(), verdict.drifted.tolist())
    ]
    feature_entries = dict(zip(features, entries))
    model_entries = {
        model.name: {
            "rows": model.rows,
            "reference_rows": model.profile.rows,
            "reference_version": model.version,
            **{f"score_{key}": value for key, value in entry.items()},
        }
        for model, entry in zip(models, entries[len(features) :])
    }
    return {
        "features": feature_entries,
        "models": model_entries,
        "tests": int(np.count_nonzero(~np.isnan([p for _, p in tests]))),
        "drifted_features": [name for name, entry in feature_entries.items() if entry["drifted"]],
        "drifted_scores": [name for name, entry in model_entries.items() if entry["score_drifted"]],
    }


def batch_drift(conn: Connection, batch_id: uuid.UUID, pipeline: Pipeline) -> dict[str, Any]:
    """Return the drift section of a batch's metrics (docs/monitoring.md, "Drift, calibrated
    to sample size").

    Per model: rows scored, its reference's rows and version, and its output score's PSI,
    band, p-value, whether that is significant and whether it is drifted; or why it was
    skipped. Per feature (by name): the same figures. Then the drifted features and
    scores, the share of drifted features (None when no model could be judged) and the
    batch's `drifted` flag, with the false-alarm rate, minimum PSI and bands used.
    """
    config: DriftConfig = pipeline.drift
    skipped: dict[str, dict[str, Any]] = {}
    judged: list[ModelCounts] = []
    totals = stored_counts(conn, batch_id)
    versions = _scoring_versions(totals)
    manifests = ledger.manifests_of(conn, list(versions.items()))
    for spec in pipeline.models:
        if spec.name not in versions:
            skipped[spec.name] = {"skipped": "no succeeded sub-task stored drift counts"}
            continue
        version = versions[spec.name]
        profile, why = _profile(spec, manifests.get((spec.name, version)), version)
        if profile is None:
            skipped[spec.name] = {"skipped": why}
            continue
        rows, counts = totals[(spec.name, version)]
        judged.append(ModelCounts(spec.name, rows, version, profile, counts))
    figures = judge_counts(config, judged)
    features = figures["features"]
    return {
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

"""A batch's drift: the PSI (effect) and chi-square p-value (evidence) of every model's
input features and output score against the reference profile of the model version that
scored the rows (its manifest in the registry), and
the verdict over all of them, from the bin counts each worker stored with its
sub-task's output (the aggregator only sums them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection

from pipeline import model_registry
from pipeline.artifacts import Manifest, reference_of
from pipeline.definition import ModelSpec, Pipeline
from pipeline.profile import DriftConfig, ModelCounts, ReferenceProfile, judge_counts


@dataclass(frozen=True)
class Scored:
    """What a batch's succeeded serve sub-tasks say of who scored it."""

    # Per model (sorted), the versions whose outputs the results hold (sorted; None, a
    # sub-task split before revision 0010, last).
    versions: dict[str, list[str | None]]
    # Per (model, version): rows scored and the sum of the drift bin counts the workers
    # stored (sub-tasks without counts left out).
    counts: dict[tuple[str, str], tuple[int, np.ndarray]]


class ScoredCounts:
    """`Scored`, summed as the aggregate reads each serve sub-task's output (once each): no
    second read of the sub-tasks for the metrics."""

    def __init__(self) -> None:
        self._versions: set[tuple[str, str | None]] = set()
        self._totals: dict[tuple[str, str], tuple[int, np.ndarray]] = {}

    def add(self, model: str, version: str | None, rows: int, bin_counts: bytes | None) -> None:
        """Count a succeeded sub-task of `model` scored by `version`: `rows` rows, its drift
        `bin_counts` (`<i8`; None: it stored none, or predates recorded versions)."""
        self._versions.add((model, version))
        if bin_counts is None or version is None:
            return
        counts = np.frombuffer(bin_counts, dtype="<i8")
        rows_so_far, total = self._totals.get((model, version), (0, np.zeros_like(counts)))
        self._totals[(model, version)] = (rows_so_far + rows, total + counts)

    def scored(self) -> Scored:
        """What the sub-tasks counted so far say."""
        by_model: dict[str, list[str | None]] = {}
        for model, version in sorted(self._versions, key=lambda key: (key[0], key[1] is None, key[1] or "")):
            by_model.setdefault(model, []).append(version)
        return Scored(by_model, dict(self._totals))


def _scoring_versions(totals: dict[tuple[str, str], tuple[int, np.ndarray]]) -> dict[str, str]:
    """Per model, the version that scored most of the batch's rows (normally the only one)."""
    rows: dict[str, tuple[int, str]] = {}
    for (model, version), (scored, _) in totals.items():
        if scored > rows.get(model, (-1, ""))[0]:
            rows[model] = (scored, version)
    return {model: version for model, (_, version) in rows.items()}


def _profile(spec: ModelSpec, manifest: Manifest | None, version: str) -> ReferenceProfile | str:
    """The reference profile of registered `version`, or why there is none."""
    if manifest is None:
        return f"model {spec.name!r}: version {version[:12]} is not in the registry"
    return reference_of(spec, manifest)


def batch_drift(
    conn: Connection, totals: dict[tuple[str, str], tuple[int, np.ndarray]], pipeline: Pipeline
) -> tuple[dict[str, Any], list[ModelCounts]]:
    """Return the drift section of a batch's metrics (docs/monitoring.md, "Drift, calibrated
    to sample size") from its summed drift counts `totals` (`Scored.counts`), and the counts
    of each judged model version (what the batch adds to its windows).

    Per model: rows scored, its reference's rows and version, and its output score's PSI,
    band, p-value, whether that is significant and whether it is drifted; or why it was
    skipped. Per feature (by name): the same figures. Then the drifted features and
    scores, the share of drifted features (None when no model could be judged) and the
    batch's `drifted` flag, with the false-alarm rate, minimum PSI and bands used.
    """
    config: DriftConfig = pipeline.drift
    skipped: dict[str, dict[str, Any]] = {}
    judged: list[ModelCounts] = []
    versions = _scoring_versions(totals)
    manifests = model_registry.registered_manifests(conn, versions.items())
    for spec in pipeline.models:
        if spec.name not in versions:
            skipped[spec.name] = {"skipped": "no succeeded sub-task stored drift counts"}
            continue
        version = versions[spec.name]
        profile = _profile(spec, manifests.get((spec.name, version)), version)
        if isinstance(profile, str):
            skipped[spec.name] = {"skipped": profile}
            continue
        rows, counts = totals[(spec.name, version)]
        judged.append(ModelCounts(spec.name, rows, version, profile, counts))
    figures = judge_counts(config, judged)
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

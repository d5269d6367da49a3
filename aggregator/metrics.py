"""A finished batch's metrics: the pipeline's KPIs, where the time went, the model versions
that scored it, and drift; and what the batch adds to its model versions' monitoring windows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row

from aggregator.drift import Scored, batch_drift
from aggregator.latency import SubtaskTimes, batch_latency
from pipeline import ledger, model_registry, registry
from pipeline.definition import Pipeline
from pipeline.errors import EstimationError
from pipeline.estimation import ScoreCounts, calibration_of, estimated_as
from pipeline.profile import ModelCounts


def batch_estimate(
    conn: Connection, pipeline: Pipeline, judged: list[ModelCounts], scores: ScoreCounts
) -> tuple[tuple[str, str], dict[str, float], dict[str, dict[str, float]]]:
    """A batch's CBPE: the (model, version) of the pipeline's estimated model that scored most of its
    rows, the CBPE sums of `scores` by that version's calibration (its manifest in the
    registry), and the estimated KPIs with their bands (`estimated_as`).

    Raises:
        EstimationError: the model was not judged (no drift counts, not registered) or its
            version stores no calibration.
    """
    assert pipeline.estimation is not None
    model = pipeline.estimation.model
    version = next((counts.version for counts in judged if counts.name == model), None)
    if version is None:
        raise EstimationError(f"model {model!r}: no registered version scored the batch with drift counts")
    calibration = calibration_of(model_registry.registered_manifests(conn, [(model, version)]).get((model, version)))
    if calibration is None:
        raise EstimationError(
            f"model {model!r} version {version[:12]} stores no CBPE calibration: its performance cannot be estimated"
        )
    sums = scores.sums(calibration)
    return (model, version), sums, estimated_as(pipeline.estimation.kpis, sums, calibration["rows"])


def batch_metrics(
    conn: Connection,
    batch: Row[Any],
    kpis: dict[str, Any],
    now: datetime,
    scored: Scored,
    times: SubtaskTimes,
    scores: ScoreCounts | None = None,
) -> tuple[dict[str, Any], list[ledger.Contribution]]:
    """Return the JSON-able metrics of `batch`, aggregated at `now`: `kpis`, `latency`
    (the whole batch) and `models` (per-model latency), from the sub-tasks' `times`,
    `model_versions` (per model, the
    versions that scored it) and `drift` (against the reference profile of the version
    that scored the rows), both from the succeeded sub-tasks the assembly read
    (`scored`), and, from the CBPE `scores` of a pipeline with an estimation, `estimated`
    (KPI: value, low, high; or `estimation_skipped`: why not); and its window
    contribution per judged model version (rows, summed bin counts, KPIs, end-to-end
    latency, CBPE sums), from the figures already computed (no second read of the sub-tasks)."""
    latency, models = batch_latency(batch, now, times)
    pipeline = registry.get_pipeline(batch.pipeline)
    drift, judged = batch_drift(conn, scored.counts, pipeline)
    estimate: dict[str, Any] = {}
    # The (model, version) whose contribution carries the CBPE sums.
    estimated: tuple[str, str] | None = None
    estimate_sums = None
    if scores is not None and scores.binary is not None:
        try:
            estimated, estimate_sums, estimate["estimated"] = batch_estimate(conn, pipeline, judged, scores)
        except EstimationError as error:
            estimate["estimation_skipped"] = str(error)
    contributions = [
        ledger.Contribution(
            batch_id=batch.id,
            pipeline=batch.pipeline,
            model=counts.name,
            model_version=counts.version,
            finished_at=now,
            items=batch.items,
            rows=counts.rows,
            bin_counts=counts.counts,
            kpis=kpis,
            latency_s=latency["end_to_end_s"],
            estimate_sums=estimate_sums if (counts.name, counts.version) == estimated else None,
        )
        for counts in judged
    ]
    metrics = {
        "kpis": kpis,
        "latency": latency,
        "models": models,
        "model_versions": scored.versions,
        "drift": drift,
        **estimate,
    }
    return metrics, contributions

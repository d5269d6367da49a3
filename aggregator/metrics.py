"""A finished batch's metrics: the pipeline's KPIs, where the time went, the model versions
that scored it, and drift; and what the batch adds to its model versions' monitoring windows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, bindparam, select

from aggregator.drift import batch_drift
from aggregator.latency import batch_latency
from pipeline import ledger, registry
from pipeline.schema import Subtask, SubtaskRole, SubtaskState

SCORING_VERSIONS = (
    select(Subtask.model, Subtask.model_version)
    .where(
        Subtask.batch_id == bindparam("batch_id"),
        Subtask.role == SubtaskRole.serve,
        Subtask.state == SubtaskState.succeeded,
    )
    .distinct()
    .order_by(Subtask.model, Subtask.model_version)
)


def scoring_versions(conn: Connection, batch: Row[Any]) -> dict[str, list[str]]:
    """Per model, the versions (artifact SHA-256) whose outputs the batch's results hold."""
    versions: dict[str, list[str]] = {}
    for row in conn.execute(SCORING_VERSIONS, {"batch_id": batch.id}):
        versions.setdefault(row.model, []).append(row.model_version)
    return versions


def batch_metrics(
    conn: Connection, batch: Row[Any], kpis: dict[str, Any], now: datetime
) -> tuple[dict[str, Any], list[ledger.Contribution]]:
    """Return the JSON-able metrics of `batch`, aggregated at `now`: `kpis`, `latency`
    (the whole batch), `models` (per-model latency), `model_versions` (per model, the
    versions that scored it) and `drift` (against the reference profile of the version
    that scored the rows); and its window contribution per judged model version (rows,
    summed bin counts, KPIs, end-to-end latency), from the figures already computed (no
    second read of the sub-tasks)."""
    latency, models = batch_latency(conn, batch, now)
    pipeline = registry.get_pipeline(batch.pipeline)
    drift, judged = batch_drift(conn, batch.id, pipeline)
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
        )
        for counts in judged
    ]
    metrics = {
        "kpis": kpis,
        "latency": latency,
        "models": models,
        "model_versions": scoring_versions(conn, batch),
        "drift": drift,
    }
    return metrics, contributions

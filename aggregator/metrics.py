"""A finished batch's metrics: the pipeline's KPIs, where the time went, and drift; and
what the batch adds to its model versions' monitoring windows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row

from aggregator.drift import batch_drift
from aggregator.latency import batch_latency
from pipeline import ledger, registry
from pipeline.settings import get_settings


def batch_metrics(
    conn: Connection, batch: Row[Any], kpis: dict[str, Any], now: datetime
) -> tuple[dict[str, Any], list[ledger.Contribution]]:
    """Return the JSON-able metrics of `batch`, aggregated at `now`: `kpis`, `latency`
    (the whole batch), `models` (per-model latency) and `drift` (against the reference
    profiles in the manifests under PIPELINE_MODELS_DIR); and its window contribution per
    judged model version (rows, summed bin counts, KPIs, end-to-end latency), from the
    figures already computed (no second read of the sub-tasks)."""
    latency, models = batch_latency(conn, batch, now)
    pipeline = registry.get_pipeline(batch.pipeline)
    drift, judged = batch_drift(conn, batch.id, pipeline, get_settings().resolved_models_dir)
    contributions = [
        ledger.Contribution(
            batch_id=batch.id,
            pipeline=batch.pipeline,
            model=counts.name,
            model_version=sha256,
            finished_at=now,
            items=batch.items,
            rows=counts.rows,
            bin_counts=counts.counts,
            kpis=kpis,
            latency_s=latency["end_to_end_s"],
        )
        for counts, sha256 in judged
    ]
    return {"kpis": kpis, "latency": latency, "models": models, "drift": drift}, contributions

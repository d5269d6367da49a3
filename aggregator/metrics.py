"""A finished batch's metrics: the pipeline's KPIs, where the time went, and drift."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row

from aggregator.drift import batch_drift
from aggregator.latency import batch_latency
from pipeline import registry
from pipeline.settings import get_settings


def batch_metrics(conn: Connection, batch: Row[Any], kpis: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Return the JSON-able metrics of `batch`, aggregated at `now`: `kpis`, `latency`
    (the whole batch), `models` (per-model latency) and `drift` (against the reference
    profiles in the manifests under PIPELINE_MODELS_DIR)."""
    latency, models = batch_latency(conn, batch, now)
    pipeline = registry.get_pipeline(batch.pipeline)
    return {
        "kpis": kpis,
        "latency": latency,
        "models": models,
        "drift": batch_drift(conn, batch.id, pipeline, get_settings().resolved_models_dir),
    }

"""A finished batch's metrics: the pipeline's KPIs and where the time went."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row

from pipeline import ledger


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start is not None and end is not None else None


def batch_metrics(conn: Connection, batch: Row[Any], kpis: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Return the JSON-able metrics of `batch`, aggregated at `now`."""
    models = {}
    for row in ledger.subtask_timings(conn, batch.id):
        compute_s = float(row["compute_s"] or 0.0)
        models[row["model"]] = {
            "subtasks": row["subtasks"],
            "rows": int(row["rows"] or 0),
            "compute_s": round(compute_s, 6),
            "rows_per_compute_s": round(row["rows"] / compute_s, 1) if compute_s else None,
            "span_s": _seconds(row["first_queued"], row["last_finished"]),
        }
    return {
        "kpis": kpis,
        "latency": {
            "wait_s": _seconds(batch.created_at, batch.started_at),
            "aggregation_s": _seconds(batch.aggregating_at, now),
            "end_to_end_s": _seconds(batch.created_at, now),
        },
        "models": models,
    }

"""Where a batch's time went, from its sub-tasks' ledger timestamps, computed in
PostgreSQL (percentile_cont over the sub-task rows, never loaded into Python).

Queue wait is queued → started (a retried sub-task's wait includes its earlier
attempts), compute is started → finished of the attempt that finished it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Float, Row, Select, bindparam, cast, func, literal, select
from sqlalchemy.dialects.postgresql import ARRAY

from pipeline.schema import Subtask, SubtaskRole, SubtaskState

QUANTILES = (0.5, 0.95, 0.99)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 6) if start is not None and end is not None else None


def _spread(quantiles: list[float] | None, maximum: float | None) -> dict[str, float | None]:
    """{p50, p95, p99, max} in seconds, None where there was nothing to measure."""
    values: list[float | None] = list(quantiles) if quantiles else [None] * len(QUANTILES)
    spread: dict[str, float | None] = {
        f"p{round(q * 100)}": None if v is None else round(v, 6) for q, v in zip(QUANTILES, values)
    }
    spread["max"] = None if maximum is None else round(maximum, 6)
    return spread


def _rate(rows: int, seconds: float | None) -> float | None:
    return round(rows / seconds, 1) if seconds else None


def _latency_statement() -> Select[Any]:
    wait = cast(func.extract("epoch", Subtask.started_at - Subtask.queued_at), Float)
    compute = cast(func.extract("epoch", Subtask.finished_at - Subtask.started_at), Float)
    quantiles = cast(literal(list(QUANTILES), ARRAY(Float)), ARRAY(Float))
    return (
        select(
            Subtask.model,
            func.grouping(Subtask.model).label("is_total"),
            func.count().label("subtasks"),
            func.coalesce(func.sum(Subtask.rows), 0).label("rows"),
            func.percentile_cont(quantiles).within_group(wait).label("wait_q"),
            func.max(wait).label("wait_max"),
            func.percentile_cont(quantiles).within_group(compute).label("compute_q"),
            func.max(compute).label("compute_max"),
            func.sum(compute).label("compute_total"),
            func.min(Subtask.queued_at).label("first_queued"),
            func.max(Subtask.finished_at).label("last_finished"),
        )
        .where(
            Subtask.batch_id == bindparam("batch_id"),
            Subtask.role == SubtaskRole.serve,
            Subtask.state.in_((SubtaskState.succeeded, SubtaskState.failed)),
            Subtask.started_at.is_not(None),
            Subtask.finished_at.is_not(None),
        )
        .group_by(func.rollup(Subtask.model))
        .order_by(Subtask.model)
    )


# Built once: every aggregate runs it, a one-input batch's included.
SUBTASK_LATENCY = _latency_statement()


def subtask_latency(conn: Connection, batch_id: uuid.UUID) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Return (per model, whole batch) latency of a batch's finished sub-tasks: count,
    rows, queue wait and compute {p50, p95, p99, max}, total compute, rows per
    compute second (one worker process's rate) and rows per second of the span from
    first queued to last finished (the rate across all workers)."""
    rows = conn.execute(SUBTASK_LATENCY, {"batch_id": batch_id}).all()
    models: dict[str, dict[str, Any]] = {}
    total: dict[str, Any] = {}
    for row in rows:
        span_s = _seconds(row.first_queued, row.last_finished)
        entry = {
            "subtasks": row.subtasks,
            "rows": int(row.rows),
            "queue_wait_s": _spread(row.wait_q, row.wait_max),
            "compute_s": _spread(row.compute_q, row.compute_max),
            "compute_total_s": None if row.compute_total is None else round(row.compute_total, 6),
            "rows_per_compute_s": _rate(int(row.rows), row.compute_total),
            "span_s": span_s,
            "rows_per_s": _rate(int(row.rows), span_s),
        }
        if row.is_total:
            total = entry
        else:
            models[row.model] = entry
    return models, total


def batch_latency(conn: Connection, batch: Row[Any], now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (batch latency, per-model latency) of `batch`, aggregated at `now`.

    The batch's figures: split wait (submitted → split), aggregation (last sub-task
    counted → now), end-to-end (submitted → now), inputs per end-to-end second, and
    its sub-tasks' latency taken together.
    """
    models, subtasks = subtask_latency(conn, batch.id)
    end_to_end_s = _seconds(batch.created_at, now)
    return {
        "split_wait_s": _seconds(batch.created_at, batch.started_at),
        "aggregation_s": _seconds(batch.aggregating_at, now),
        "end_to_end_s": end_to_end_s,
        "items_per_s": _rate(batch.items, end_to_end_s),
        "subtasks": subtasks,
    }, models

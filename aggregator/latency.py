"""Where a batch's time went, from its sub-tasks' ledger timestamps, collected as the
aggregate reads their outputs (`SubtaskTimes`: no second read of the sub-tasks).

Queue wait is queued → started (a retried sub-task's wait includes its earlier
attempts), compute is started → finished of the attempt that finished it. Percentiles
interpolate linearly between the closest ranks, as PostgreSQL's `percentile_cont`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row

from pipeline.ledger import SubtaskTiming

QUANTILES = (0.5, 0.95, 0.99)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 6) if start is not None and end is not None else None


def _quantile(ordered: list[float], q: float) -> float:
    """Quantile `q` of the ascending `ordered`, interpolated linearly between the closest
    ranks (numpy's default, PostgreSQL's `percentile_cont`)."""
    position = q * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def _spread(seconds: list[float]) -> dict[str, float | None]:
    """{p50, p95, p99, max} in seconds, None where there was nothing to measure. Plain Python,
    not `np.percentile`: a small batch has a few sub-tasks per model, and numpy's call
    overhead (8 calls per batch) was a third of a one-input batch's metrics."""
    if not seconds:
        return {**{f"p{round(q * 100)}": None for q in QUANTILES}, "max": None}
    ordered = sorted(seconds)
    return {
        **{f"p{round(q * 100)}": round(_quantile(ordered, q), 6) for q in QUANTILES},
        "max": round(ordered[-1], 6),
    }


def _rate(rows: int, seconds: float | None) -> float | None:
    return round(rows / seconds, 1) if seconds else None


def _entry(timings: list[SubtaskTiming]) -> dict[str, Any]:
    """The latency figures of `timings`: count, rows, queue wait and compute {p50, p95, p99,
    max}, total compute, rows per compute second (one worker process's rate) and rows per
    second of the span from first queued to last finished (the rate across all workers)."""
    rows = sum(t.rows for t in timings)
    compute = [(t.finished_at - t.started_at).total_seconds() for t in timings]
    compute_total = sum(compute) if compute else None
    span_s = _seconds(min(t.queued_at for t in timings), max(t.finished_at for t in timings)) if timings else None
    return {
        "subtasks": len(timings),
        "rows": rows,
        "queue_wait_s": _spread([(t.started_at - t.queued_at).total_seconds() for t in timings]),
        "compute_s": _spread(compute),
        "compute_total_s": None if compute_total is None else round(compute_total, 6),
        "rows_per_compute_s": _rate(rows, compute_total),
        "span_s": span_s,
        "rows_per_s": _rate(rows, span_s),
    }


class SubtaskTimes:
    """The timings of a batch's serve sub-tasks that ran to an outcome, per model, as the
    aggregate reads their outputs (each once)."""

    def __init__(self) -> None:
        self._by_model: dict[str, list[SubtaskTiming]] = {}

    def add(self, model: str, timing: SubtaskTiming | None) -> None:
        """Count a sub-task of `model` read by the aggregate (None: it did not run to an outcome)."""
        if timing is not None:
            self._by_model.setdefault(model, []).append(timing)

    def latency(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """(per model, whole batch) latency of the sub-tasks counted (`_entry`)."""
        models = {model: _entry(timings) for model, timings in sorted(self._by_model.items())}
        return models, _entry([timing for timings in self._by_model.values() for timing in timings])


def batch_latency(batch: Row[Any], now: datetime, times: SubtaskTimes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (batch latency, per-model latency) of `batch`, aggregated at `now`.

    The batch's figures: split wait (submitted → split), aggregation (last sub-task
    counted → now), end-to-end (submitted → now), inputs per end-to-end second, and
    its sub-tasks' latency taken together (`times`).
    """
    models, subtasks = times.latency()
    end_to_end_s = _seconds(batch.created_at, now)
    return {
        "split_wait_s": _seconds(batch.created_at, batch.started_at),
        "aggregation_s": _seconds(batch.aggregating_at, now),
        "end_to_end_s": end_to_end_s,
        "items_per_s": _rate(batch.items, end_to_end_s),
        "subtasks": subtasks,
    }, models

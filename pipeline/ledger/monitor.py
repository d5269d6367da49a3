"""Monitoring windows and alerts: each finished batch's contributions (written with its
metrics), their pooled sums over a window, and alert episodes opened and cleared."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import accumulate
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, Row

from pipeline.ledger import queries


@dataclass(frozen=True)
class Contribution:
    """What one finished batch adds to one model version's windows (a `monitor_contributions` row)."""

    batch_id: uuid.UUID
    pipeline: str
    model: str
    # The SHA-256 of the model's artifact.
    model_version: str
    finished_at: datetime
    items: int
    rows: int
    # Drift bin counts (`ReferenceProfile.bin_counts`).
    bin_counts: npt.NDArray[np.int64]
    kpis: dict[str, Any]
    latency_s: float | None
    # The CBPE sums of its rows (`pipeline.estimation.estimate_sums`); None without them.
    estimate_sums: dict[str, float] | None = None


def contribution_parameters(contributions: Sequence[Contribution]) -> dict[str, Any]:
    """The bound parameters of `queries.RECORD_CONTRIBUTIONS` for `contributions`: one JSON
    array of records (`contributions`) and every bin count in one int64 little-endian string
    (`bins`), which each record slices at its offset. Two parameters, not one array per
    column: dumping each array costs the aggregate more than the insert costs PostgreSQL."""
    ordered = sorted(contributions, key=lambda c: (c.pipeline, c.model, c.model_version))
    sizes = [8 * c.bin_counts.size for c in ordered]
    records = [
        {
            "batch_id": str(c.batch_id),
            "pipeline": c.pipeline,
            "model": c.model,
            "model_version": c.model_version,
            "finished_at": c.finished_at.isoformat(),
            "items": c.items,
            "rows": c.rows,
            "bins_from": start,
            "bins_bytes": size,
            "kpis": c.kpis,
            "latency_s": c.latency_s,
            "estimate_sums": c.estimate_sums,
        }
        for c, start, size in zip(ordered, accumulate(sizes, initial=0), sizes)
    ]
    return {
        "contributions": json.dumps(records),
        "bins": b"".join(c.bin_counts.astype("<i8").tobytes() for c in ordered),
    }


def record_contributions(conn: Connection, contributions: Sequence[Contribution]) -> None:
    """Store contributions, of any batches, in one insert on the caller's transaction; a batch
    aggregated again adds nothing. (A batch's aggregate stores its own with the statement
    that finishes it, `finish_batch`.) They reach their hours' rollups when folded
    (`fold_contributions`); windows read them until then."""
    if contributions:
        conn.execute(queries.RECORD_CONTRIBUTIONS, contribution_parameters(contributions))


# Contributions one fold statement takes at most: bounds its transaction and its locks.
FOLD_LIMIT = 5000


def fold_contributions(conn: Connection, pipeline: str, most: int | None = None) -> int:
    """Add the pipeline's unfolded contributions (the oldest `most`, or all) to their hours'
    rollups and mark them folded, `FOLD_LIMIT` per statement, on the caller's transaction;
    return how many. Their bin counts are summed here, per rollup (numpy over the stored
    int64 bytes), the rest in the statement. Idempotent: a contribution is folded once,
    whoever folds and however often."""
    folded = 0
    while most is None or folded < most:
        limit = FOLD_LIMIT if most is None else min(FOLD_LIMIT, most - folded)
        taken = conn.execute(queries.UNFOLDED_CONTRIBUTIONS, {"pipeline": pipeline, "limit": limit}).all()
        if not taken:
            break
        bins: dict[tuple[str, str, datetime], npt.NDArray[np.int64]] = {}
        for row in taken:
            if row.bin_counts is not None:
                key = (row.model, row.model_version, row.bucket_start)
                counts = np.frombuffer(row.bin_counts, dtype="<i8")
                bins[key] = counts if key not in bins else bins[key] + counts
        folded += conn.execute(
            queries.FOLD_CONTRIBUTIONS,
            {
                "ids": [row.id for row in taken],
                "models": [model for model, _, _ in bins],
                "versions": [version for _, version, _ in bins],
                "buckets": [bucket for _, _, bucket in bins],
                "bins": ["{" + ",".join(map(str, counts.tolist())) + "}" for counts in bins.values()],
            },
        ).scalar_one()
        if len(taken) < limit:
            break
    return folded


def store_label_counts(conn: Connection, batch_id: uuid.UUID, counts: dict[str, int]) -> None:
    """Set a batch's label counts on its contributions and move their hours' rollups by the
    difference, on the caller's transaction."""
    conn.execute(queries.STORE_LABEL_COUNTS, {"batch_id": batch_id, "counts": json.dumps(counts)})


@dataclass(frozen=True)
class PooledVersion:
    """One model version's window pooled: its contributions' totals, the drift bin counts of
    its rollups (summed) and of its other contributions (int64 bytes end to end), and the
    JSON sums key by key (`sums`: `kpi_sums`, `kpi_items`, `label_counts`,
    `latency_histogram`, `estimate_sums`)."""

    pipeline: str
    model: str
    model_version: str
    batches: int
    items: int
    rows: int
    first_finished: datetime
    last_finished: datetime
    bin_array: list[int] | None
    bin_bytes: bytes | None
    sums: dict[str, dict[str, float]]

    def bin_counts(self, bins: int) -> npt.NDArray[np.int64] | None:
        """The window's bin counts, summed over `bins` bins per contribution; None without any."""
        parts = [] if self.bin_array is None else [np.asarray(self.bin_array, dtype=np.int64)]
        if self.bin_bytes:
            parts.append(np.frombuffer(self.bin_bytes, dtype="<i8").reshape(-1, bins).sum(axis=0))
        return np.sum(parts, axis=0, dtype=np.int64) if parts else None


def window_versions(
    conn: Connection, pipelines: Sequence[str], since: datetime, until: datetime, last_rows: int | None
) -> list[PooledVersion]:
    """Per pipeline (of `pipelines`), model and model version: its contributions finished in
    (`since`, `until`] pooled (hourly rollups for the hours inside, the contributions of the
    edge hours and those not folded yet), or its newest ones up to `last_rows` rows."""
    if last_rows is None:
        return window_series(conn, pipelines, [(since, until)])[0]
    parameters = {"pipelines": list(pipelines), "until": until, "last_rows": last_rows}
    return _pooled(conn.execute(queries.WINDOW_BY_ROWS, parameters), 1)[0]


def window_series(
    conn: Connection, pipelines: Sequence[str], bounds: Sequence[tuple[datetime, datetime]]
) -> list[list[PooledVersion]]:
    """Per time window (`since`, `until`] of `bounds`, in order: each model version of
    `pipelines` pooled as `window_versions` pools it; one statement for them all."""
    parameters = {
        "pipelines": list(pipelines),
        "sinces": [since for since, _ in bounds],
        "untils": [until for _, until in bounds],
    }
    return _pooled(conn.execute(queries.WINDOW_BY_TIME, parameters), len(bounds))


def _pooled(rows: Iterable[Row[Any]], windows: int) -> list[list[PooledVersion]]:
    """The pooled rows of `windows` windows (column `point`, from 1), one list per window."""
    pooled: list[list[PooledVersion]] = [[] for _ in range(windows)]
    for row in rows:
        pooled[row.point - 1].append(
            PooledVersion(
                row.pipeline,
                row.model,
                row.model_version,
                int(row.batches),
                int(row.items),
                int(row.rows),
                row.first_finished,
                row.last_finished,
                row.bin_array,
                row.bin_bytes,
                row.sums or {},
            )
        )
    return pooled


@dataclass(frozen=True)
class Condition:
    """A monitored condition that holds on a window: `kind` of alert, its scope and evidence."""

    kind: str
    model: str
    model_version: str
    window: str
    evidence: dict[str, Any]


def claim_evaluation(conn: Connection, pipeline: str, interval_s: float) -> bool:
    """True when this caller is to judge the pipeline's windows now: none did in the last
    `interval_s` seconds (one statement decides between concurrent aggregates)."""
    return conn.execute(queries.CLAIM_EVALUATION, {"pipeline": pipeline, "interval_s": interval_s}).first() is not None


def record_alerts(
    conn: Connection, pipeline: str, judged_windows: Sequence[str], holding: Sequence[Condition], figures: Any
) -> tuple[int, int]:
    """Open an alert for each condition in `holding` without an open episode, clear the
    pipeline's open alerts on `judged_windows` whose condition no longer holds, and store the
    windows' headline `figures`; return (opened, cleared)."""
    scope = {
        "pipeline": pipeline,
        "kinds": [c.kind for c in holding],
        "models": [c.model for c in holding],
        "versions": [c.model_version for c in holding],
        "windows": [c.window for c in holding],
    }
    evidence = [json.dumps(c.evidence) for c in holding]
    opened = len(conn.execute(queries.OPEN_ALERTS_HOLDING, {**scope, "evidence": evidence}).all())
    cleared = len(conn.execute(queries.CLEAR_ALERTS_NOT_HOLDING, {**scope, "judged": list(judged_windows)}).all())
    conn.execute(queries.STORE_EVALUATION, {"pipeline": pipeline, "figures": json.dumps(figures)})
    return opened, cleared


def open_alerts(conn: Connection, pipeline: str | None) -> Sequence[Row[Any]]:
    """The open alerts of `pipeline` (or of all), oldest first."""
    return conn.execute(queries.OPEN_ALERTS, {"pipeline": pipeline}).all()


def evaluation_figures(conn: Connection) -> Sequence[Row[Any]]:
    """Each pipeline's last judged windows' figures (pipeline, evaluated_at, figures)."""
    return conn.execute(queries.EVALUATION_FIGURES).all()

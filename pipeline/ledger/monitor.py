"""Monitoring windows and alerts: each finished batch's contributions (written with its
metrics), their pooled sums over a window, and alert episodes opened and cleared."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
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


def record_contributions(conn: Connection, contributions: Sequence[Contribution]) -> None:
    """Store a batch's contributions, in one insert on the caller's transaction (the
    aggregate's, with the batch's metrics); a batch aggregated again adds nothing. They reach
    their hours' rollups when folded (`fold_contributions`); windows read them until then."""
    if not contributions:
        return
    ordered = sorted(contributions, key=lambda c: (c.pipeline, c.model, c.model_version))
    conn.execute(
        queries.RECORD_CONTRIBUTIONS,
        {
            "batch_ids": [c.batch_id for c in ordered],
            "pipelines": [c.pipeline for c in ordered],
            "models": [c.model for c in ordered],
            "versions": [c.model_version for c in ordered],
            "finished": [c.finished_at for c in ordered],
            "items": [c.items for c in ordered],
            "rows": [c.rows for c in ordered],
            "bin_counts": [c.bin_counts.astype("<i8").tobytes() for c in ordered],
            "bin_arrays": ["{" + ",".join(map(str, c.bin_counts.tolist())) + "}" for c in ordered],
            "kpis": [json.dumps(c.kpis) for c in ordered],
            "latencies": [c.latency_s for c in ordered],
            "estimate_sums": [None if c.estimate_sums is None else json.dumps(c.estimate_sums) for c in ordered],
        },
    )


# Contributions one fold statement takes at most: bounds its transaction and its locks.
FOLD_LIMIT = 5000


def fold_contributions(conn: Connection, pipeline: str) -> int:
    """Add the pipeline's unfolded contributions to their hours' rollups and mark them
    folded, `FOLD_LIMIT` per statement, on the caller's transaction; return how many.
    Idempotent: a contribution is folded once, whoever folds and however often."""
    folded = 0
    while taken := conn.execute(queries.FOLD_CONTRIBUTIONS, {"pipeline": pipeline, "limit": FOLD_LIMIT}).scalar_one():
        folded += taken
        if taken < FOLD_LIMIT:
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

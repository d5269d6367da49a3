"""Monitoring windows and alerts: each finished batch's contributions (written with its
metrics), their pooled sums over a window, and alert episodes opened and cleared."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row
from sqlalchemy.dialects.postgresql import insert as pg_insert

from pipeline.ledger import queries
from pipeline.schema import MonitorContribution


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
    # Drift bin counts, int64 little-endian (`ReferenceProfile.bin_counts`).
    bin_counts: bytes
    kpis: dict[str, Any]
    latency_s: float | None


def record_contributions(conn: Connection, contributions: Sequence[Contribution]) -> None:
    """Store a batch's contributions in one multi-row statement on the caller's transaction
    (the aggregate's, with the batch's metrics); a batch aggregated again adds nothing."""
    if contributions:
        conn.execute(pg_insert(MonitorContribution).values([asdict(c) for c in contributions]).on_conflict_do_nothing())


def window_versions(
    conn: Connection, pipeline: str | None, since: datetime, until: datetime, last_rows: int | None
) -> Sequence[Row[Any]]:
    """Per pipeline, model and model version (of `pipeline`, or all): the pooled sums of its
    contributions finished in (`since`, `until`], or of its newest ones up to `last_rows`
    rows (rows of the `window_versions` query)."""
    return conn.execute(
        queries.WINDOW_VERSIONS,
        {"pipeline": pipeline, "since": since, "until": until, "last_rows": last_rows},
    ).all()


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

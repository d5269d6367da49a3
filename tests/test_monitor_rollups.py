"""Windows read from hourly rollups pool exactly as the contributions themselves do: before
the contributions are folded into the rollups, partly folded, folded; with labels stored (and
changed) after the batches, a batch aggregated again, and batches deleted; a series of
windows read in one statement pools each window as a window alone does."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Connection, Engine, text

from pipeline import ledger
from pipeline.ledger.queries import RAW
from pipeline.schema import BatchState

BINS = 12
START = datetime(2032, 1, 1, 0, 17, tzinfo=UTC)
VERSIONS = [("screen-logreg", "a" * 64), ("screen-forest", "b" * 64)]
# Every contribution alone, pooled by the same statement as a window's parts.
ALL_RAW = text(
    """
WITH parts AS (
  SELECT 1 AS point, c.pipeline, c.model, c.model_version, c.batches, c.items, c.rows, c.finished_at AS first_finished,
    c.finished_at AS last_finished, NULL::bigint[] AS bin_array, c.bin_counts AS bin_bytes, c.kpi_sums, c.kpi_items,
    c.label_counts, c.latency_histogram, c.estimate_sums
  FROM monitor_contribution_parts c
  WHERE c.pipeline = 'screening' AND c.finished_at > :since AND c.finished_at <= :until
)
"""
    + RAW["window_pooled"]
)


def _contribute_unfolded(
    engine: Engine, count: int, seed: int, offset: timedelta = timedelta(0)
) -> list[ledger.Contribution]:
    """`count` screening batches, one every 97 s from START + `offset`, each contributing to
    both versions with random bin counts, KPIs (numbers, and text a window ignores), latency
    and CBPE sums; not folded into the rollups."""
    rng = np.random.default_rng(seed)
    ids = [uuid.uuid4() for _ in range(count)]
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO batches (id, pipeline, items) SELECT unnest(CAST(:ids AS uuid[])), 'screening', 30"),
            {"ids": ids},
        )
    made = []
    for index, batch_id in enumerate(ids):
        items = int(rng.integers(1, 200))
        kpis: dict[str, Any] = {"review_rate": round(float(rng.random()), 4), "note": "text", "flagged": index % 7}
        latency = None if index % 11 == 0 else float(rng.lognormal(-1.5, 0.8))
        for model, version in VERSIONS:
            made.append(
                ledger.Contribution(
                    batch_id,
                    "screening",
                    model,
                    version,
                    START + offset + timedelta(seconds=97 * index),
                    items,
                    items,
                    rng.poisson(5, BINS).astype(np.int64),
                    kpis,
                    latency,
                    {"accuracy.expected": round(float(rng.random()) * items, 6), "accuracy.n": items},
                )  # fmt: skip
            )
    with engine.begin() as conn:
        ledger.record_contributions(conn, made)
    return made


def _contribute(engine: Engine, count: int, seed: int) -> list[ledger.Contribution]:
    """`_contribute_unfolded`'s batches, pooled alike unfolded, a third folded, and all folded."""
    made = _contribute_unfolded(engine, count, seed)
    _assert_pooled_alike(engine)
    with engine.begin() as conn:
        third = ledger.fold_contributions(conn, "screening", most=len(made) // 3)
    assert third == len(made) // 3
    _assert_pooled_alike(engine)
    with engine.begin() as conn:
        assert ledger.fold_contributions(conn, "screening") == len(made) - third
        assert ledger.fold_contributions(conn, "screening") == 0
    return made


def _comparable(pooled: ledger.PooledVersion) -> tuple[Any, ...]:
    counts = pooled.bin_counts(BINS)
    return (
        pooled.model,
        pooled.model_version,
        pooled.batches,
        pooled.items,
        pooled.rows,
        pooled.first_finished,
        pooled.last_finished,
        None if counts is None else counts.tolist(),
        pooled.sums,
    )


def _raw(conn: Connection, since: datetime, until: datetime) -> list[tuple[Any, ...]]:
    rows = conn.execute(ALL_RAW, {"since": since, "until": until}).all()
    return [
        _comparable(ledger.PooledVersion(*row[1:9], row.bin_array, row.bin_bytes, row.sums or {}))  # fmt: skip
        for row in rows
    ]


WINDOWS = [
    # (since, until) as offsets from START: edges inside hours, on hour boundaries, past the last.
    (timedelta(minutes=-20), timedelta(hours=5)),
    (timedelta(minutes=5), timedelta(hours=3, minutes=2)),
    (timedelta(minutes=43), timedelta(hours=1, minutes=43)),
    (timedelta(minutes=-17), timedelta(hours=2, minutes=43)),
    (timedelta(hours=1, minutes=1), timedelta(hours=1, minutes=30)),
]


def _assert_pooled_alike(engine: Engine) -> None:
    with engine.connect() as conn:
        bounds = [(START + since_offset, START + until_offset) for since_offset, until_offset in WINDOWS]
        series = ledger.window_series(conn, ["screening"], bounds)
        for (since, until), pooled in zip(bounds, series, strict=True):
            rolled = [_comparable(v) for v in ledger.window_versions(conn, ["screening"], since, until, None)]
            assert rolled == _raw(conn, since, until), (since, until)
            assert [_comparable(v) for v in pooled] == rolled, (since, until)


@pytest.fixture
def contributions(quiet_engine: Engine) -> list[ledger.Contribution]:
    # 160 batches over 4.3 hours: 5 hourly rollups per version.
    return _contribute(quiet_engine, 160, seed=3)


def test_rollups_pool_as_their_contributions_do(quiet_engine: Engine, contributions: list[ledger.Contribution]) -> None:
    with quiet_engine.connect() as conn:
        hours = conn.execute(text("SELECT count(*), sum(batches) FROM monitor_rollups")).one()
    assert tuple(hours) == (2 * 5, 2 * 160)
    _assert_pooled_alike(quiet_engine)
    with quiet_engine.connect() as conn:
        (whole,) = [
            v for v in ledger.window_versions(conn, ["screening"], START - timedelta(1), START + timedelta(1), None)
            if v.model == "screen-logreg"
        ]  # fmt: skip
    logreg = [c for c in contributions if c.model == "screen-logreg"]
    assert whole.batches == 160 and whole.rows == sum(c.rows for c in logreg)
    counts = whole.bin_counts(BINS)
    assert counts is not None and counts.tolist() == np.sum([c.bin_counts for c in logreg], axis=0).tolist()
    assert whole.sums["kpi_items"]["review_rate"] == whole.items and "note" not in whole.sums["kpi_sums"]


def test_labels_and_reaggregation_and_deletion_keep_rollups_exact(
    quiet_engine: Engine, contributions: list[ledger.Contribution]
) -> None:
    batch_ids = list(dict.fromkeys(c.batch_id for c in contributions))
    with quiet_engine.begin() as conn:
        for number, batch_id in enumerate(batch_ids[::3]):
            ledger.store_label_counts(conn, batch_id, {"labelled": 10, "true_pos": number % 4})
        # Labels that change replace their counts on the rollups (the difference is added).
        for batch_id in batch_ids[::6]:
            ledger.store_label_counts(conn, batch_id, {"labelled": 12, "true_pos": 1})
        # A batch aggregated again adds nothing.
        ledger.record_contributions(conn, contributions[:6])
    _assert_pooled_alike(quiet_engine)
    with quiet_engine.connect() as conn:
        labelled = conn.execute(text("SELECT sum((label_counts ->> 'labelled')::int) FROM monitor_rollups")).scalar()
    assert labelled == 2 * (10 * len(batch_ids[::3]) + 2 * len(batch_ids[::6]))

    with quiet_engine.begin() as conn:
        conn.execute(text("DELETE FROM batches WHERE id = ANY(CAST(:ids AS uuid[]))"), {"ids": batch_ids[5:60]})
    _assert_pooled_alike(quiet_engine)
    with quiet_engine.connect() as conn:
        left = conn.execute(text("SELECT sum(batches) FROM monitor_rollups")).scalar()
    assert left == 2 * (160 - 55)

    # Batches after the fold, labelled before theirs: the fold adds their labels once.
    later = _contribute_unfolded(quiet_engine, 20, seed=4, offset=timedelta(hours=2, minutes=10))
    with quiet_engine.begin() as conn:
        for batch_id in dict.fromkeys(c.batch_id for c in later[::4]):
            ledger.store_label_counts(conn, batch_id, {"labelled": 3, "true_pos": 1})
    _assert_pooled_alike(quiet_engine)
    with quiet_engine.begin() as conn:
        assert ledger.fold_contributions(conn, "screening") == len(later)
    _assert_pooled_alike(quiet_engine)
    with quiet_engine.connect() as conn:
        total = conn.execute(text("SELECT sum(batches) FROM monitor_rollups")).scalar()
    assert total == 2 * (160 - 55 + 20)


def test_the_finishing_statement_stores_each_contribution_s_own_bin_counts(quiet_engine: Engine) -> None:
    """A batch's contributions ride on the statement that finishes it, their bin counts sent
    as one string that each slices at its offset (lengths differ by model); the fold sums
    them per rollup. A batch finished again changes nothing."""
    batch_id = uuid.uuid4()
    with quiet_engine.begin() as conn:
        conn.execute(
            text("INSERT INTO batches (id, pipeline, items, state) VALUES (:id, 'screening', 30, 'aggregating')"),
            {"id": batch_id},
        )
    lengths = {"screen-logreg": 5, "screen-forest": 3, "screen-boosting": 8}
    made = [
        ledger.Contribution(
            batch_id, "screening", model, "c" * 64, START, 30, 30, np.arange(1, bins + 1) * 2**40 + bins, {"r": 1}, 0.2
        )  # fmt: skip
        for model, bins in lengths.items()
    ]
    finished = {"state": BatchState.succeeded, "error": None, "result": {"items": 30}, "metrics": {}}
    with quiet_engine.begin() as conn:
        due = ledger.lock_aggregating_batch(conn, batch_id)
        assert due is not None
        assert ledger.finish_batch(conn, due, contributions=made, **finished) is False
        assert ledger.finish_batch(conn, due, contributions=made[:1], **finished) is None
    with quiet_engine.connect() as conn:
        state = conn.execute(text("SELECT state FROM batches WHERE id = :id"), {"id": batch_id}).scalar_one()
        stored = conn.execute(
            text("SELECT model, bin_counts FROM monitor_contributions WHERE batch_id = :id"), {"id": batch_id}
        ).all()
    assert state == "succeeded"
    expected = {c.model: c.bin_counts.tolist() for c in made}
    assert {row.model: np.frombuffer(row.bin_counts, "<i8").tolist() for row in stored} == expected
    with quiet_engine.begin() as conn:
        assert ledger.fold_contributions(conn, "screening") == len(made)
        rolled = conn.execute(
            text("SELECT model, bin_counts FROM monitor_rollups WHERE model_version = :v"), {"v": "c" * 64}
        ).all()
    assert {row.model: row.bin_counts for row in rolled} == expected

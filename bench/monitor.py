"""The cost of monitoring over time (docs/monitoring.md, "Windows across batches"): a
batch's window update (its contributions, carried by the statement that finishes the batch
in its aggregate, and its share of the fold that adds a minute's contributions to their
hourly rollups after commit; beside it, the same fold done inside the aggregate, per batch,
as before revision 0014) and `pipeline monitor`'s pooling of a day of 10,000 batches (one
contribution per model, inserted set-based), and of one alert evaluation over it. `make
bench` runs it as `--scenario monitor` (bench/run.py), next to a small batch's aggregation
time.

    python -m bench.monitor [--pipeline screening] [--batches 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, text

from pipeline import ledger
from pipeline.artifacts import read_manifest
from pipeline.definition import Pipeline
from pipeline.monitor import evaluate_alerts, judge_window
from pipeline.registry import get_pipeline
from pipeline.schema import BatchState
from pipeline.scratch import scratch_services
from pipeline.training import train_models
from pipeline.windows import parse_window

DAY_S = 86_000
UPDATES = 400
# What the finish statement stores besides the contributions (a small batch's, in size).
RESULT = {"items": 100, "answered": 100, "unanswered": 0}
METRICS = {"kpis": {"review_rate": 0.1, "items": 100}, "latency": {"aggregation_s": 0.01, "end_to_end_s": 0.2}}
WINDOWS = ("1h", "24h", "10000rows")


def _contributions(
    pipeline: Pipeline, models_dir: Path, batch_ids: list[uuid.UUID], now: datetime
) -> list[ledger.Contribution]:
    """One contribution per batch and model of `pipeline`, 100 rows each, spread over the last day."""
    rng = np.random.default_rng(0)
    made = []
    for spec in pipeline.models:
        manifest = read_manifest(models_dir, spec.name)
        assert manifest.reference is not None
        shares = np.asarray(manifest.reference.layout.shares)
        for index, batch_id in enumerate(batch_ids):
            finished = now - timedelta(seconds=DAY_S * (1 - index / len(batch_ids)))
            counts = rng.poisson(shares * 100).astype(np.int64)
            kpis = {"review_rate": 0.1, "items": 100}
            made.append(
                ledger.Contribution(
                    batch_id, pipeline.name, spec.name, manifest.sha256, finished, 100, 100, counts, kpis, 0.2
                )
            )
    return made


def _median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


def measure_monitor(engine: Engine, pipeline: Pipeline, models_dir: Path, batches: int, repeat: int) -> dict[str, Any]:
    """Store a day of `batches` batches' contributions (folded), then time (medians, ms) a
    finished batch's window update (what its contributions add to the statement that
    finishes it, and its share of a fold after commit; and the fold inside the aggregate, as
    before) and `pipeline monitor`'s pooling of each of `WINDOWS`, and one alert evaluation
    of the 1h and 24h windows."""
    now = datetime.now(UTC)
    ids = [uuid.uuid4() for _ in range(batches + UPDATES)]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, pipeline, items, state)"
                " SELECT i, :pipeline, 100, CASE WHEN n > :batches THEN 'aggregating' ELSE 'succeeded' END"
                " FROM unnest(CAST(:ids AS uuid[])) WITH ORDINALITY AS b (i, n)"
            ),
            {"ids": ids, "pipeline": pipeline.name, "batches": batches},
        )
    day = _contributions(pipeline, models_dir, ids[:batches], now)
    with engine.begin() as conn:
        for first in range(0, len(day), 3000):
            ledger.record_contributions(conn, day[first : first + 3000])
        ledger.fold_contributions(conn, pipeline.name)

    # Every other batch is finished without contributions: the finish statement alone, which
    # the others' times are compared with. Of the rest, the first half fold in their
    # aggregate's transaction (before revision 0014); the second half only finish with their
    # contributions, and one fold after commit adds them all, as the evaluation does once a
    # minute.
    bare: list[float] = []
    inline: list[float] = []
    carried: list[float] = []
    for number, batch_id in enumerate(ids[batches:]):
        contributing = number % 2 == 1
        rows = _contributions(pipeline, models_dir, [batch_id], now) if contributing else []
        with engine.begin() as conn:
            # The aggregate's transaction is open, its row read: its begin, commit and reads are
            # not the update's.
            due = ledger.lock_aggregating_batch(conn, batch_id)
            assert due is not None, batch_id
            started = time.perf_counter()
            ledger.finish_batch(conn, due, BatchState.succeeded, None, RESULT, METRICS, rows)
            if not contributing:
                bare.append(time.perf_counter() - started)
            elif number < UPDATES // 2:
                ledger.fold_contributions(conn, pipeline.name)
                inline.append(time.perf_counter() - started)
            else:
                carried.append(time.perf_counter() - started)
    started = time.perf_counter()
    with engine.begin() as conn:
        folded = ledger.fold_contributions(conn, pipeline.name)
    fold_s = time.perf_counter() - started
    assert folded == len(carried) * len(pipeline.models), folded
    finish_ms = _median_ms(bare)
    figures: dict[str, Any] = {
        "monitor_batches": batches,
        "monitor_contributions": len(day),
        "monitor_finish_ms": finish_ms,
        "monitor_insert_ms": _median_ms(carried) - finish_ms,
        "monitor_fold_per_batch_ms": fold_s * 1000 / len(carried),
        "monitor_update_ms": _median_ms(carried) - finish_ms + fold_s * 1000 / len(carried),
        "monitor_update_inline_ms": _median_ms(inline) - finish_ms,
    }
    for spec in WINDOWS:
        timings = []
        for _ in range(repeat):
            started = time.perf_counter()
            with engine.connect() as conn:
                judge_window(conn, pipeline.name, parse_window(spec), datetime.now(UTC))
            timings.append(time.perf_counter() - started)
        figures[f"monitor_{spec}_ms"] = _median_ms(timings)
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        with engine.begin() as conn:
            evaluate_alerts(conn, pipeline, [parse_window("1h"), parse_window("24h")], datetime.now(UTC))
        timings.append(time.perf_counter() - started)
    figures["monitor_alert_evaluation_ms"] = _median_ms(timings)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="screening")
    parser.add_argument("--batches", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    pipeline = get_pipeline(args.pipeline)
    with tempfile.TemporaryDirectory() as folder, scratch_services("bench", Path(folder) / "embedded") as services:
        models_dir = Path(folder) / "models"
        train_models(models_dir, [spec.name for spec in pipeline.models])
        engine = ledger.make_engine(services.database_url)
        figures = measure_monitor(engine, pipeline, models_dir, args.batches, args.repeat)
        engine.dispose()
    for key, value in figures.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()

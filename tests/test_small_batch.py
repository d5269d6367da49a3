"""The small-batch path (PIPELINE_SMALL_BATCH_ITEMS): the client splits in the transaction
that stores the batch, a worker that finishes a sub-task goes on with the batch's other
dispatched sub-tasks from the ledger, and the worker finishing the last one aggregates."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, event, text

from pipeline import broker, client_split, heartbeat, ledger
from pipeline.client import Client
from pipeline.ledger import rollouts as rollout_rows
from pipeline.pipelines.digits import held_out_strips
from pipeline.pipelines.screening import BOOSTING, FOREST, LOGREG, MODELS, held_out_records
from pipeline.schema import ModelEvent, RolloutState
from pipeline.scratch import delete_keys
from pipeline.states import Priority
from tests.helpers import RunServices, run_client_settings, split_batch, store_batch, wait_for
from tests.pipelines import UNSPLITTABLE
from workers import inference
from workers.inference import run_subtask

DIGIT_MODELS = ("digit-classifier", "digit-ood")
OOD = "digit-ood"


def test_one_message_runs_a_whole_small_batch_and_its_aggregate(
    quiet_client: tuple[Client, str],
    quiet_services: RunServices,
    models_dir: Path,
    quiet_engine: Engine,
    tmp_path: Path,
) -> None:
    # On the quiet database, emptied of batches first: the worker's message claims its
    # model's best dispatched sub-task, which another test's batch left waiting would be.
    with quiet_engine.begin() as conn:
        conn.execute(text("TRUNCATE batches CASCADE"))
    services, engine = quiet_services, quiet_engine
    client, prefix = quiet_client
    batch = client.submit("screening", held_out_records(1))
    queues = redis.Redis.from_url(services.broker_url)
    # Split at once, as one transaction: a message per model waits, no split message.
    assert queues.llen(prefix + broker.SPLIT_QUEUE) == 0
    assert all(queues.llen(prefix + broker.model_queue(model)) == 1 for model in MODELS)
    # Lose every message but the logistic regression's: only the ledger knows the other two.
    for model in MODELS:
        if model != LOGREG:
            queues.delete(prefix + broker.model_queue(model))

    # No lane: what is tested is the message's turn.
    env = services.env(models_dir, PIPELINE_BROKER_PREFIX=prefix, PIPELINE_INTERACTIVE_LANE="false")
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers", "--models", ",".join(MODELS), "--concurrency", "1"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # No aggregator runs under this prefix: the worker itself must finish the batch.
        wait_for(lambda: batch.status().finished, 120, "the small batch to finish")
    finally:
        worker.terminate()
        worker.wait(30)

    status = batch.status()
    assert status.state == "succeeded", status.error
    assert status.total == status.succeeded == len(MODELS)
    (result,) = list(batch.results())
    assert result.error is None and set(result.output["votes"]) == set(MODELS)  # type: ignore[index]
    with engine.connect() as conn:
        ran = conn.execute(
            text("SELECT model, worker, attempts FROM subtasks WHERE batch_id = :b ORDER BY model"), {"b": batch.id}
        ).all()
        runs = conn.execute(text("SELECT aggregate_runs FROM batches WHERE id = :b"), {"b": batch.id}).scalar_one()
    assert sorted(model for model, _, _ in ran) == sorted(MODELS)
    assert len({worker for _, worker, _ in ran}) == 1 and all(attempts == 1 for _, _, attempts in ran)
    assert runs == 1
    # Aggregated in the worker: nothing was queued for an aggregator.
    assert queues.llen(prefix + broker.AGGREGATE_QUEUE) == 0
    assert FOREST in status.metrics["models"]  # type: ignore[index]


def test_a_client_stores_and_splits_a_one_input_batch_in_two_statements(
    isolated: tuple[Client, str], quiet_engine: Engine
) -> None:
    client, _ = isolated
    statements: list[str] = []
    event.listen(client.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))
    key = f"two-{uuid.uuid4()}"
    batch = client.submit("screening", held_out_records(1), idempotency_key=key)
    # The champions, roll-outs and their queues' consumers in one read; then the batch's row
    # (counted, fingerprinted, split), its input page and sub-tasks, and their NOTIFY in one
    # statement that commits alone: no BEGIN, COPY or COMMIT.
    assert [sql.split()[0] for sql in statements] == ["SELECT", "WITH"], statements
    # The same request again: the same batch, nothing written (and the read reused, if this
    # runs within `SERVING_REUSE_S`; else read again).
    assert client.submit("screening", held_out_records(1), idempotency_key=key).id == batch.id
    assert [sql.split()[0] for sql in statements[2:]] in (["WITH", "SELECT"], ["SELECT", "WITH", "SELECT"])
    with quiet_engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT state, items, split_items, total, request_sha256, model_versions,"
                " started_at = created_at AND aggregating_at IS NULL AS started,"
                " (SELECT bool_and(queued_at = b.created_at) FROM subtasks WHERE batch_id = :b) AS queued,"
                " (SELECT count(*) FROM input_pages WHERE batch_id = :b) AS pages FROM batches b WHERE id = :b"
            ),
            {"b": batch.id},
        ).one()
        subtasks = conn.execute(
            text("SELECT count(*) FROM subtasks WHERE batch_id = :b AND state = 'dispatched' AND priority = :rank"),
            {"b": batch.id, "rank": Priority.interactive.rank},
        ).scalar_one()
    assert (row.state, row.items, row.split_items, row.total, subtasks) == ("running", 1, 1, len(MODELS), len(MODELS))
    assert row.request_sha256 is not None and set(row.model_versions) == set(MODELS)
    # Stored and split at once: one clock reading for its row and its sub-tasks.
    assert row.started and row.queued and row.pages == 1


def test_a_client_reuses_its_read_of_what_a_small_batch_pins_while_it_is_current(
    quiet_client: tuple[Client, str], quiet_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client reads the champions, roll-outs and consumers a small batch's split pins once
    for the batches of the next moment (`SERVING_REUSE_S`); the statement storing a batch
    refuses a split whose champion or roll-out changed since, and the client splits it again
    from a fresh read."""
    monkeypatch.setattr(client_split, "SERVING_REUSE_S", 3600.0)
    client, _ = quiet_client
    statements: list[str] = []
    event.listen(client.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))

    def submitted() -> tuple[uuid.UUID, list[str]]:
        statements.clear()
        batch = client.submit("screening", held_out_records(1))
        return batch.id, [sql.split()[0] for sql in statements]

    assert submitted()[1] == ["SELECT", "WITH"]
    assert submitted()[1] == ["WITH"]
    with quiet_engine.begin() as conn:
        champion = conn.execute(
            text("SELECT version FROM model_aliases WHERE model = :m AND alias = 'champion'"), {"m": FOREST}
        ).scalar_one()
        # A roll-out of the champion's own version: nothing of the split changes but its pin.
        rollout = rollout_rows.start_rollout(
            conn, model=FOREST, version=champion, mode="shadow", percent=None, actor="test"
        )
    assert rollout is not None
    try:
        batch_id, sent = submitted()
        # Refused (nothing written), read again, stored.
        assert sent == ["WITH", "SELECT", "WITH"]
        assert submitted()[1] == ["WITH"]
    finally:
        with quiet_engine.begin() as conn:
            rollout_rows.end_rollout(
                conn, rollout, state=RolloutState.aborted, event=ModelEvent.rollout_aborted, actor="test", reason=None
            )
    with quiet_engine.connect() as conn:
        stored = conn.execute(
            text("SELECT count(*) FROM batches WHERE id = :b AND state = 'running'"), {"b": batch_id}
        ).scalar_one()
        followed = (
            conn.execute(text("SELECT rollout_id FROM rollout_batches WHERE batch_id = :b"), {"b": batch_id})
            .scalars()
            .all()
        )
    assert stored == 1
    # It pins the champion: a roll-out of the champion's version is not followed.
    assert followed == []


def test_a_listening_client_s_first_wait_for_a_batch_it_submitted_reads_once_woken(
    quiet_client: tuple[Client, str], quiet_engine: Engine, quiet_services: RunServices, models_dir: Path
) -> None:
    """A client that listens already (it waited before) watches each batch it submits from
    before storing it: the batch cannot finish unseen, so the first wait reads its status only
    once the batch's finish wakes it, not once before as well."""
    client, _ = quiet_client
    # Nothing consumes this run's messages: a batch waits until this test runs its turn.
    earlier = client.submit("digits", held_out_strips(1, max_digits=6, seed=5))
    with pytest.raises(TimeoutError):
        earlier.wait(timeout=0.1)
    earlier.cancel()  # its sub-tasks are not claimed instead of the next batch's
    batch = client.submit("digits", held_out_strips(1, max_digits=6, seed=6))
    statements: list[str] = []
    event.listen(client.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(batch.wait, 60)
        # The wait has begun (its thread started) and read nothing: no read before the wake-up.
        time.sleep(0.5)
        assert statements == [] and not waiting.done()
        with quiet_engine.connect() as conn:
            first = conn.execute(text("SELECT min(id) FROM subtasks WHERE batch_id = :b"), {"b": batch.id}).scalar_one()
        run_subtask(quiet_engine, quiet_services.settings(models_dir), first, "test-worker", DIGIT_MODELS)
        status = waiting.result(timeout=60)
    assert status.state == "succeeded"
    assert len(statements) == 1
    assert len(list(batch.results())) == 1 and len(statements) == 1


@pytest.fixture
def quiet_client(quiet_services: RunServices, models_dir: Path) -> Iterator[tuple[Client, str]]:
    """A client on the quiet database (no worker or sweeper of the run reads it), publishing
    under a broker prefix no process consumes; heartbeats it records are removed after."""
    prefix = f"riding-{uuid.uuid4().hex[:8]}:"
    client = Client(run_client_settings(quiet_services, models_dir, broker_prefix=prefix, heartbeat_s=1.0))
    yield client, prefix
    with client.engine.begin() as conn:
        conn.execute(text("DELETE FROM worker_heartbeats WHERE worker LIKE :w"), {"w": f"{prefix}%"})
    client.close()
    delete_keys(quiet_services.broker_url, prefix)


# Who consumes which models' queues (by the workers' heartbeats) → the models a one-input
# `screening` batch publishes a message for; the others' sub-tasks ride on them.
TOPOLOGIES = {
    "one worker of every model": ({"a": MODELS}, [BOOSTING]),
    "two alike": ({"a": MODELS, "b": MODELS}, [BOOSTING]),
    "a worker of two models, one of the third": ({"a": (LOGREG, FOREST), "b": (BOOSTING,)}, [BOOSTING, FOREST]),
    "two of the same model set, one of another": (
        {"a": (LOGREG, FOREST), "b": (LOGREG, FOREST, BOOSTING)},
        [BOOSTING, FOREST],
    ),
    "a worker per model": ({"a": (LOGREG,), "b": (FOREST,), "c": (BOOSTING,)}, sorted(MODELS)),
    "no worker": ({}, sorted(MODELS)),
}


@pytest.mark.parametrize(("consumers", "messaged"), TOPOLOGIES.values(), ids=TOPOLOGIES.keys())
def test_a_small_batch_publishes_one_message_per_set_of_models_the_same_workers_serve(
    quiet_client: tuple[Client, str],
    services: RunServices,
    quiet_engine: Engine,
    consumers: dict[str, tuple[str, ...]],
    messaged: list[str],
) -> None:
    """A worker whose turn claims one of a small batch's sub-tasks claims its sub-tasks of
    every model it serves (`claim_turn`): of the models the same live workers consume, one
    message is enough. The others' sub-tasks ride on it, leased only as long as the
    heartbeats they were chosen by count (the sweeper publishes them after that)."""
    client, prefix = quiet_client
    for worker, models in consumers.items():
        queues = [prefix + broker.model_queue(model) for model in models]
        ledger.record_heartbeat(quiet_engine, f"{prefix}{worker}@host", queues)
    batch = client.submit("screening", held_out_records(1))
    queues = redis.Redis.from_url(services.broker_url)
    published = sorted(model for model in MODELS if queues.llen(prefix + broker.model_queue(model)))
    assert published == messaged
    assert all(queues.llen(prefix + broker.model_queue(model)) <= 1 for model in MODELS)
    with quiet_engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT model, state, extract(epoch FROM lease_until - queued_at) AS lease_s"
                " FROM subtasks WHERE batch_id = :b"
            ),
            {"b": batch.id},
        ).all()
    assert all(row.state == "dispatched" for row in rows)
    riders = {row.model: row.lease_s for row in rows if row.lease_s is not None}
    assert sorted(riders) == sorted(set(MODELS) - set(messaged))
    max_age_s = heartbeat.max_beat_age_s(client.settings)
    assert all(0 < lease_s <= max_age_s + 1 for lease_s in riders.values())


def test_a_rider_no_turn_took_is_published_by_the_sweeper_once_its_lease_is_over(
    quiet_client: tuple[Client, str], quiet_engine: Engine
) -> None:
    """The heartbeats said one worker serves every model, but the worker the message reached
    did not claim the riders (it serves fewer models now): they are not lost, the sweeper
    publishes them as soon as their short lease is over."""
    client, prefix = quiet_client
    ledger.record_heartbeat(quiet_engine, f"{prefix}a@host", [prefix + broker.model_queue(m) for m in MODELS])
    batch = client.submit("screening", held_out_records(1))
    with quiet_engine.connect() as conn:
        riders = set(
            conn.execute(
                text("SELECT id FROM subtasks WHERE batch_id = :b AND lease_until IS NOT NULL"), {"b": batch.id}
            ).scalars()
        )
    assert len(riders) == len(MODELS) - 1

    def swept() -> bool:
        sweep = ledger.sweep(quiet_engine, lease_s=3600)
        return sweep is not None and riders <= {dispatch.subtask_id for dispatch in sweep.predict}

    wait_for(swept, heartbeat.max_beat_age_s(client.settings) + 30, "the sweeper to publish the riders")


def test_a_message_that_claims_another_batch_s_rider_is_published_again(
    quiet_client: tuple[Client, str],
    quiet_engine: Engine,
    quiet_services: RunServices,
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message claims its model's best dispatched sub-task, whichever batch's: a bulk
    batch's message takes an interactive batch's rider first (and the rest of that batch with
    it). The rider had no message of its own, so the bulk sub-task the message was published
    for would be left without one: the turn publishes that message again."""
    client, prefix = quiet_client
    queues = [prefix + broker.model_queue(m) for m in DIGIT_MODELS]
    ledger.record_heartbeat(quiet_engine, f"{prefix}a@host", queues)
    interactive = client.submit("digits", held_out_strips(1, max_digits=6, seed=3))
    bulk_id, _ = store_batch(quiet_engine, held_out_strips(2, max_digits=6, seed=4))
    split_batch(quiet_engine, bulk_id, {})
    with quiet_engine.connect() as conn:
        rows = conn.execute(text("SELECT id, batch_id, model, state FROM subtasks WHERE batch_id = :b"), {"b": bulk_id})
        bulk = {row.model: row.id for row in rows}
    published: list[tuple[int, str, int]] = []
    monkeypatch.setattr(
        broker, "publish_predictions", lambda _app, dispatches, countdown=None: published.extend(dispatches)
    )

    # digit-ood rides on digit-classifier's message; the bulk batch's digit-ood message takes it.
    run_subtask(quiet_engine, quiet_services.settings(models_dir), bulk[OOD], "w", DIGIT_MODELS, Priority.bulk)

    assert interactive.status().state == "succeeded"
    assert published == [(bulk[OOD], OOD, Priority.bulk.rank)]
    with quiet_engine.connect() as conn:
        states = set(conn.execute(text("SELECT state FROM subtasks WHERE batch_id = :b"), {"b": bulk_id}).scalars())
    assert states == {"dispatched"}


def test_the_first_predict_message_goes_out_before_the_rest_are_built(
    isolated: tuple[Client, str], services: RunServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker starts on a batch's first message while its client builds the others (a
    one-input batch waits for one message only): it is on the queue even when building a
    later one fails, whose batch of messages is then discarded unsent."""
    client, prefix = isolated
    send = broker._send_prediction
    sent: list[int] = []

    def failing_after_the_first(*args: Any) -> None:
        if sent:
            raise RuntimeError("building the second message failed")
        sent.append(1)
        send(*args)

    monkeypatch.setattr(broker, "_send_prediction", failing_after_the_first)
    with pytest.raises(RuntimeError, match="second message"):
        broker.publish_predictions(client.app, [(1, LOGREG, 0), (2, FOREST, 0), (3, LOGREG, 0)])
    queues = redis.Redis.from_url(services.broker_url)
    assert queues.llen(prefix + broker.model_queue(LOGREG)) == 1
    assert queues.llen(prefix + broker.model_queue(FOREST)) == 0


def test_a_client_with_small_batches_off_leaves_the_split_to_the_aggregator(
    services: RunServices, models_dir: Path, stack: object
) -> None:
    client = Client(run_client_settings(services, models_dir, small_batch_items=0))
    try:
        status = client.submit("screening", held_out_records(3)).wait(timeout=120)
    finally:
        client.close()
    assert status.state == "succeeded", status.error
    assert status.result == {"items": 3, "answered": 3, "unanswered": 0}


@pytest.mark.parametrize("small_batch_items", [1000, 0], ids=["split by the client", "split by the aggregator"])
def test_a_batch_its_pipeline_cannot_split_fails_with_the_reason(
    services: RunServices, models_dir: Path, engine: Engine, stack: object, small_batch_items: int
) -> None:
    client = Client(run_client_settings(services, models_dir, small_batch_items=small_batch_items))
    try:
        points = [{"values": [UNSPLITTABLE if i == 1 else 0.5, 0.0, 0.0, 0.0]} for i in range(3)]
        status = client.submit("poison", points).wait(timeout=120)
    finally:
        client.close()
    assert status.state == "failed"
    assert status.error == "split failed: an unsplittable point"
    with engine.connect() as conn:
        subtasks = conn.execute(text("SELECT count(*) FROM subtasks WHERE batch_id = :b"), {"b": status.id}).scalar()
    assert subtasks == 0


def _one_input_batch(engine: Engine, seed: int) -> tuple[uuid.UUID, int]:
    """A one-input digits batch split in-process (nothing published): its id and first sub-task."""
    batch_id, _ = store_batch(engine, held_out_strips(1, max_digits=6, seed=seed))
    split_batch(engine, batch_id, {})
    with engine.connect() as conn:
        first = conn.execute(text("SELECT min(id) FROM subtasks WHERE batch_id = :b"), {"b": batch_id}).scalar_one()
    return batch_id, first


def test_a_worker_turn_runs_a_one_input_batch_on_one_connection(
    quiet_engine: Engine, quiet_services: RunServices, models_dir: Path
) -> None:
    settings = quiet_services.settings(models_dir)
    # The first turn of this process loads the models and their manifests (their own reads).
    run_subtask(quiet_engine, settings, _one_input_batch(quiet_engine, seed=1)[1], "test-worker", DIGIT_MODELS)
    batch_id, first = _one_input_batch(quiet_engine, seed=2)
    seen: Counter[str] = Counter()
    counting = True
    event.listen(quiet_engine, "checkout", lambda *_: counting and seen.update(["checkout"]))
    event.listen(quiet_engine, "before_cursor_execute", lambda *_: counting and seen.update(["statement"]))

    run_subtask(quiet_engine, settings, first, "test-worker", DIGIT_MODELS)
    counting = False

    with quiet_engine.connect() as conn:
        state, runs, metrics = conn.execute(
            text("SELECT state, aggregate_runs, metrics FROM batches WHERE id = :b"), {"b": batch_id}
        ).one()
        pinned = dict(
            conn.execute(text("SELECT model, model_version FROM subtasks WHERE batch_id = :b"), {"b": batch_id}).all()
        )
    assert (state, runs) == ("succeeded", 1)
    # Both sub-tasks claimed and completed, the batch aggregated: one checkout for it all.
    assert seen["checkout"] == 1
    # The message's claim with the rest of the batch (`claim_turn`); one completion of
    # both that, having made the batch due, also reads what its aggregate needs (the batch
    # with its serving versions, its input page, the outputs with their drift counts and
    # timestamps: no second read of the sub-tasks for the metrics); the finish with its
    # result page (no roll-out: no shadow or gate read). No transaction: no BEGIN, no COMMIT.
    assert seen["statement"] == 2 + 1
    # Its scoring versions, drift and latency, from the outputs read.
    assert metrics["model_versions"] == {model: [pinned[model]] for model in DIGIT_MODELS}
    assert all(metrics["drift"]["models"][model]["rows"] > 0 for model in DIGIT_MODELS)
    subtasks = {model: figures["subtasks"] for model, figures in metrics["models"].items()}
    assert subtasks == dict.fromkeys(DIGIT_MODELS, 1)
    assert metrics["latency"]["subtasks"]["subtasks"] == len(DIGIT_MODELS)


def test_interactive_batches_submitted_during_bulk_predicts_run_before_the_bulk_sub_tasks_end(
    quiet_engine: Engine, quiet_services: RunServices, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process running a bulk sub-task takes an interactive batch announced meanwhile after
    its predict, and, once it has seen interactive work, between two slices of the next."""
    # Not a small batch: each bulk sub-task is a turn of its own.
    settings = quiet_services.settings(
        models_dir, interactive_slice_ms=0.05, small_batch_items=100, interactive_lane=False
    )
    bulk_id, _ = store_batch(quiet_engine, held_out_strips(300, max_digits=6, seed=3), priority=Priority.bulk)
    split_batch(quiet_engine, bulk_id, {model: 100_000 for model in DIGIT_MODELS}, step_items=100_000)
    with quiet_engine.connect() as conn:
        bulk = conn.execute(text("SELECT id FROM subtasks WHERE batch_id = :b ORDER BY id"), {"b": bulk_id}).scalars()
        first, second = bulk.all()
    interactive: list[uuid.UUID] = []

    def submit_interactive() -> None:
        batch_id, _ = store_batch(
            quiet_engine, held_out_strips(1, max_digits=6, seed=len(interactive)), priority=Priority.interactive
        )
        split_batch(quiet_engine, batch_id, {})
        interactive.append(batch_id)

    def state_of(batch_id: uuid.UUID) -> str:
        with quiet_engine.connect() as conn:
            return str(conn.execute(text("SELECT state FROM batches WHERE id = :b"), {"b": batch_id}).scalar_one())

    # No interactive work seen yet: the first bulk predict runs whole; one is committed meanwhile.
    whole = inference.timed_predict

    def predicted_while_one_is_submitted(*args: Any) -> Any:
        if not interactive:
            submit_interactive()
        return whole(*args)

    monkeypatch.setattr(inference, "timed_predict", predicted_while_one_is_submitted)
    run_subtask(quiet_engine, settings, first, "test-worker", DIGIT_MODELS)
    # Now seen: the second bulk predict is sliced, and one committed as it starts runs between slices.
    sliced = inference.sliced_predict
    after_slices: list[str] = []

    def sliced_while_one_is_submitted(*args: Any) -> Any:
        submit_interactive()
        predicted = sliced(*args)
        after_slices.append(state_of(interactive[-1]))
        return predicted

    monkeypatch.setattr(inference, "sliced_predict", sliced_while_one_is_submitted)
    # The bulk batch, not small, is handed to the aggregator's queue once its last sub-task is
    # done: caught here (the process-wide broker app has no prefix of this run).
    handed: list[str] = []
    monkeypatch.setattr(inference.broker, "publish_aggregate", lambda app, batch_id: handed.append(batch_id))
    run_subtask(quiet_engine, settings, second, "test-worker", DIGIT_MODELS)

    assert len(interactive) == 2 and after_slices == ["succeeded"]
    assert handed == [str(bulk_id)]
    with quiet_engine.connect() as conn:
        for batch_id, subtask in zip(interactive, (first, second)):
            state, finished_at, workers = conn.execute(
                text(
                    "SELECT b.state, b.finished_at, array_agg(DISTINCT s.worker) FROM batches b"
                    " JOIN subtasks s ON s.batch_id = b.id WHERE b.id = :b GROUP BY b.id"
                ),
                {"b": batch_id},
            ).one()
            bulk_done = conn.execute(
                text("SELECT finished_at FROM subtasks WHERE id = :s AND state = 'succeeded'"), {"s": subtask}
            ).scalar_one()
            # Nothing else runs on this database: the bulk sub-task's process ran and aggregated it.
            assert state == "succeeded" and workers == ["test-worker"]
            assert finished_at < bulk_done

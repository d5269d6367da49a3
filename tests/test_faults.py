"""Fault injection on real processes: each test owns its embedded PostgreSQL and
Redis, breaks something mid-batch, and ends on the same invariants: the batch
finished, every input has exactly one result or error, counters equal the
sub-task rows, aggregate ran once, no sub-task is left running."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu.exceptions
import numpy as np
import psycopg
import pytest
import redis
from sqlalchemy import Connection, Engine, text

from pipeline import broker, ledger, rollouts
from pipeline.embedded import start_redis, stop_services
from pipeline.pipelines.digits import held_out_strips
from pipeline.pipelines.screening import ScreeningPipeline, held_out_records
from pipeline.settings import Settings
from pipeline.states import RolloutMode
from tests.helpers import OwnStack, assert_finished_and_consistent, assert_shadow_twins, second_version, wait_for
from tests.malformed import Malformed, publish
from workers.inference import TurnConnection

ONE_TILE_CHUNKS = '{"digit-classifier": 1, "digit-ood": 1}'
SMALL_CHUNKS = '{"digit-classifier": 4, "digit-ood": 4}'
# Rows per sub-task of every screening model in the killed-aggregator test: 1,500 sub-tasks for 5,000 inputs.
SCREENING_CHUNK = 10


@pytest.fixture
def own(tmp_path: Path, models_dir: Path, request: pytest.FixtureRequest) -> Iterator[OwnStack]:
    stack = OwnStack(tmp_path, models_dir, chunk_sizes=getattr(request, "param", SMALL_CHUNKS))
    yield stack
    stack.close()


def _results(stack: OwnStack, batch_id: str) -> tuple[int, int]:
    answered = stack.count("SELECT count(*) FROM results WHERE batch_id = :b AND error IS NULL", b=batch_id)
    return answered, stack.count("SELECT count(*) FROM results WHERE batch_id = :b AND error IS NOT NULL", b=batch_id)


def test_worker_killed_mid_batch_a_second_worker_finishes(own: OwnStack) -> None:
    # The poison pipeline's model is cheap per call, so 5,000 one-row sub-tasks stay quick.
    first = own.start("workers", "--concurrency", "2")
    own.start("aggregator", "--concurrency", "1")
    batch = own.client.submit("poison", _points(5000, poison=set()))
    wait_for(lambda: own.succeeded_subtasks(batch.id) >= 300, 300, "the first worker to make progress")
    own.kill(first)
    # Not finished (its split may still be under way: steps ramp up from 2,000 inputs).
    assert not batch.status().finished
    own.start("workers", "--concurrency", "2")
    status = batch.wait(timeout=600)
    assert status.state == "succeeded"
    assert_finished_and_consistent(own.engine, batch.id)
    assert _results(own, batch.id) == (5000, 0)


def test_worker_killed_running_shadow_sub_tasks_a_second_worker_finishes_them(own: OwnStack, models_dir: Path) -> None:
    """With a shadow roll-out active, the worker is killed -9 while it runs shadow sub-tasks
    (frozen first with SIGSTOP until the ledger shows some running, so the kill surely hits
    them): past their lease the sweeper dispatches them again and a second worker finishes
    them; the batch's state, counters and results are those it had without them."""
    model = "poison-model"
    challenger = second_version(own.engine, own.client.settings, models_dir, model)
    rollouts.start(own.engine, model, version=challenger, mode=RolloutMode.shadow, started_by="faults")
    first = own.start("workers", "--concurrency", "2")
    own.start("aggregator", "--concurrency", "1")
    batch = own.client.submit("poison", _points(600, poison=set()))
    running_shadows = "SELECT id, worker FROM subtasks WHERE batch_id = :b AND role = 'shadow' AND state = 'running'"

    def held_shadows() -> set[tuple[int, str]]:
        with own.engine.connect() as conn:
            return {(row.id, row.worker) for row in conn.execute(text(running_shadows), {"b": batch.id})}

    def frozen_holding_shadows() -> set[tuple[int, str]]:
        """The shadow sub-tasks the frozen worker holds: still running a moment after it
        froze (a completion it sent before lands meanwhile). Thawed again when none."""
        os.killpg(first.pid, signal.SIGSTOP)
        if held := held_shadows():
            time.sleep(1.0)
            held &= held_shadows()
        if not held:
            os.killpg(first.pid, signal.SIGCONT)
        return held

    deadline = time.monotonic() + 300
    while not (hit := frozen_holding_shadows()):
        assert time.monotonic() < deadline, "the worker never ran a shadow sub-task"
        time.sleep(0.02)
    own.kill(first)
    own.start("workers", "--concurrency", "2")
    status = batch.wait(timeout=300)
    assert status.state == "succeeded" and status.total == status.succeeded == 600
    finished = assert_finished_and_consistent(own.engine, batch.id)
    unfinished = "SELECT count(*) FROM subtasks WHERE batch_id = :b AND state IN ('pending', 'dispatched', 'running')"
    wait_for(lambda: not own.count(unfinished, b=batch.id), 300, "the shadow sub-tasks")
    assert assert_shadow_twins(own.engine, batch.id, model, challenger) == 600
    assert assert_finished_and_consistent(own.engine, batch.id) == finished  # untouched by its shadows
    assert _results(own, batch.id) == (600, 0)
    with own.engine.connect() as conn:
        again = conn.execute(
            text("SELECT state, attempts, worker FROM subtasks WHERE id = ANY(:ids)"), {"ids": [i for i, _ in hit]}
        ).all()
    killed = {worker for _, worker in hit}
    assert all(r.state == "succeeded" and r.attempts >= 2 and r.worker not in killed for r in again), again


def test_aggregator_killed_while_splitting_or_following_a_batch(tmp_path: Path, models_dir: Path) -> None:
    """A big batch of packed features (the aggregator splits it; the client splits JSON items
    itself): the split commits in steps of 500 inputs, then the aggregator follows the batch;
    killed in either phase, a new aggregator resumes the split where it stopped (the sweeper
    re-publishes it) and assembles every result once."""
    chunks = json.dumps({spec.name: SCREENING_CHUNK for spec in ScreeningPipeline.models})
    own = OwnStack(tmp_path, models_dir, chunk_sizes=chunks, split_step_items=500)
    try:
        own.start("workers", "--concurrency", "2")
        first = own.start("aggregator", "--concurrency", "2")
        records = held_out_records(5000, seed=4)
        batch = own.client.submit("screening", np.asarray([list(r["features"].values()) for r in records]))
        wait_for(
            lambda: own.count("SELECT split_items FROM batches WHERE id = :b", b=batch.id) > 0, 120, "a split step"
        )
        own.kill(first)
        split_when_killed = own.count("SELECT split_items FROM batches WHERE id = :b", b=batch.id)
        own.start("aggregator", "--concurrency", "2")
        status = batch.wait(timeout=600)
        assert status.state == "succeeded", status.error
        assert_finished_and_consistent(own.engine, batch.id)
        assert _results(own, batch.id) == (5000, 0)
        # Each input is in exactly one sub-task per model (steps of whole chunks): nothing split twice.
        assert status.total == 5000 // SCREENING_CHUNK * len(ScreeningPipeline.models)
        assert 0 < split_when_killed <= 5000
    finally:
        own.close()


def _flush_redis(own: OwnStack) -> None:
    """Every queued message is lost."""
    redis.Redis.from_url(own.broker_url).flushall()


def _kill_and_restart_redis(own: OwnStack) -> None:
    own.kill_and_restart_redis()


def _restart_postgres(own: OwnStack) -> None:
    own.restart_postgres()


@pytest.mark.parametrize("disrupt", [_flush_redis, _kill_and_restart_redis, _restart_postgres])
def test_batch_survives_a_service_disruption_mid_batch(own: OwnStack, disrupt: Callable[[OwnStack], None]) -> None:
    own.start("workers", "--concurrency", "2")
    own.start("aggregator", "--concurrency", "1")
    batch = own.client.submit("digits", held_out_strips(400, max_digits=4, seed=12))
    wait_for(lambda: own.succeeded_subtasks(batch.id) >= 20, 120, "progress")
    disrupt(own)
    status = batch.wait(timeout=300)
    assert status.state == "succeeded"
    assert_finished_and_consistent(own.engine, batch.id)
    assert _results(own, batch.id) == (400, 0)


def test_a_pooled_connection_is_pinged_only_once_its_backend_has_gone(
    quiet_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A healthy pooled connection is handed out with no round trip; one whose backend
    PostgreSQL terminated meanwhile is pinged, found dead and replaced, so the caller's
    first statement runs."""
    pings: list[str] = []
    execute = psycopg.Cursor.execute

    def counted(cursor: psycopg.Cursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        if query == ";":  # SQLAlchemy's pre-ping and ours
            pings.append(query)
        return execute(cursor, query, *args, **kwargs)

    def backend() -> int:
        with quiet_engine.connect() as conn:
            return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())

    lost = backend()
    monkeypatch.setattr(psycopg.Cursor, "execute", counted)
    assert backend() == lost
    assert pings == []
    with ledger.make_engine(quiet_engine.url.render_as_string(hide_password=False)).connect() as admin:
        # Waits (up to 5 s) until the backend is gone.
        assert admin.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": lost}).scalar_one()
    assert backend() != lost
    assert pings == [";"]


def test_a_turn_retries_a_ledger_write_on_a_fresh_connection_after_its_connection_died(
    quiet_engine: Engine,
) -> None:
    """A worker turn keeps one connection; once PostgreSQL dropped it, the retried write must
    run on another (the dead one would refuse every statement)."""
    settings = Settings(db_retry_s=10)

    def backend(conn: Connection) -> int:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())

    with TurnConnection(quiet_engine) as turn:
        lost = turn.run(settings, backend)
        with quiet_engine.connect() as admin:
            # Waits (up to 5 s) until the backend is gone.
            assert admin.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": lost}).scalar_one()
        assert turn.run(settings, backend) != lost
        # The fresh connection is the turn's from then on.
        assert turn.run(settings, backend) == turn.run(settings, backend)


def test_predictions_published_to_a_stopped_redis_raise_the_transient_error(tmp_path: Path) -> None:
    """A pipelined publish batch that fails raised kombu's BatchPublishError, which no caller
    takes for an unreachable broker: it stopped the aggregator's sweeper thread for good and
    escaped a client's submit. It is the OperationalError every other publish raises."""
    url, _ = start_redis(tmp_path)
    app = broker.client_app(url, Settings(broker_url=url))
    try:
        assert broker.publish_predictions(app, [(1, "digit-ood", 0)]) == 1
        os.kill(int((tmp_path / "redis" / "redis.pid").read_text()), signal.SIGKILL)
        with pytest.raises(kombu.exceptions.OperationalError):
            broker.publish_predictions(app, [(2, "digit-ood", 0), (3, "digit-ood", 1)])
    finally:
        app.close()
        stop_services(tmp_path)


def test_every_message_published_twice(own: OwnStack) -> None:
    own.start("workers", "--concurrency", "2")
    own.start("aggregator", "--concurrency", "1")
    batch = own.client.submit("digits", held_out_strips(300, max_digits=4, seed=15))
    broker.publish_split(own.client.app, batch.id)
    wait_for(lambda: batch.status().total > 0, 60, "the split")
    subtasks = (
        own.client.engine.connect()
        .exec_driver_sql("SELECT id, model, priority FROM subtasks WHERE batch_id = %(b)s", {"b": batch.id})
        .all()
    )
    broker.publish_predictions(own.client.app, [tuple(row) for row in subtasks])
    status = batch.wait(timeout=300)
    broker.publish_aggregate(own.client.app, batch.id)
    broker.publish_aggregate(own.client.app, batch.id)
    queues = redis.Redis.from_url(own.broker_url)
    wait_for(
        lambda: (
            all(queues.llen(q) == 0 for q in ("aggregate", "split", "model.digit-classifier", "model.digit-ood"))
            and queues.hlen("unacked") == 0
        ),
        120,
        "every duplicate to be consumed",
    )
    assert status.state == "succeeded"
    assert_finished_and_consistent(own.engine, batch.id)
    assert own.count("SELECT max(attempts) FROM subtasks WHERE batch_id = :b", b=batch.id) == 1


def _points(count: int, poison: set[int], bad_output: frozenset[int] = frozenset()) -> list[dict[str, list[float]]]:
    first = {i: -1.0 for i in poison} | {i: -2.0 for i in bad_output}
    return [{"values": [first.get(i, 0.5), float(i % 3), 0.0, 1.0]} for i in range(count)]


def test_poison_input_is_retried_then_failed_and_the_rest_answered(own: OwnStack) -> None:
    own.start("workers", "--concurrency", "2")
    own.start("aggregator", "--concurrency", "1")
    batch = own.client.submit("poison", _points(30, poison={4, 17}))
    status = batch.wait(timeout=300)
    assert status.state == "partial"
    assert assert_finished_and_consistent(own.engine, batch.id)["failed"] == 2
    with own.engine.connect() as conn:
        failed = conn.exec_driver_sql(
            "SELECT items, attempts, error FROM subtasks WHERE batch_id = %(b)s AND state = 'failed' ORDER BY seq",
            {"b": batch.id},
        ).all()
    assert [row.items for row in failed] == [[4], [17]]
    assert all(row.attempts == 3 and "poison row" in row.error and "attempt 3 of 3" in row.error for row in failed)
    results = list(batch.results())
    assert [r.item for r in results if r.error] == [4, 17]
    assert all(r.output is not None for r in results if r.item not in (4, 17))


def test_fail_fast_fails_the_batch_and_cancels_the_rest(own: OwnStack) -> None:
    own.start("workers", "--concurrency", "1")
    own.start("aggregator", "--concurrency", "1")
    # A guardrail violation is not retried: the first sub-task fails at once.
    inputs = _points(1000, poison=set(), bad_output=frozenset({0}))
    batch = own.client.submit("poison", inputs, failure_policy="fail_fast")
    status = batch.wait(timeout=300)
    assert status.state == "failed" and status.error is not None
    # The reason, then what failed.
    assert status.error.startswith("fail_fast: a sub-task failed; 1 of ") and "GuardrailViolation" in status.error
    row = assert_finished_and_consistent(own.engine, batch.id)
    assert row["failed"] == 1 and row["cancelled"] > 0
    failed = own.count("SELECT attempts FROM subtasks WHERE batch_id = :b AND state = 'failed'", b=batch.id)
    assert failed == 1
    # what finished before the failure stays readable
    answered, unanswered = _results(own, batch.id)
    assert answered == row["succeeded"] and unanswered == 1000 - answered


def test_max_failed_fraction_aborts_a_best_effort_batch(own: OwnStack) -> None:
    own.start("workers", "--concurrency", "1")
    own.start("aggregator", "--concurrency", "1")
    batch = own.client.submit("poison", _points(100, poison=set(range(0, 100, 2))), max_failed_fraction=0.1)
    status = batch.wait(timeout=300)
    assert status.state == "failed" and "more than 10%" in status.error
    row = assert_finished_and_consistent(own.engine, batch.id)
    assert 10 < row["failed"] < 50 and row["cancelled"] > 0


@pytest.mark.parametrize("own", [ONE_TILE_CHUNKS], indirect=True)
def test_cancel_mid_batch_keeps_what_finished(own: OwnStack) -> None:
    own.start("workers", "--concurrency", "2")
    own.start("aggregator", "--concurrency", "1")
    batch = own.client.submit("digits", held_out_strips(400, max_digits=4, seed=16))
    wait_for(lambda: own.succeeded_subtasks(batch.id) >= 50, 120, "progress")
    assert batch.cancel().state == "cancelled"
    wait_for(lambda: own.count("SELECT aggregate_runs FROM batches WHERE id = :b", b=batch.id) == 1, 120, "results")
    row = assert_finished_and_consistent(own.engine, batch.id)
    assert row["state"] == "cancelled" and row["cancelled"] > 0 and row["succeeded"] >= 50
    answered, unanswered = _results(own, batch.id)
    assert unanswered > 0 and answered + unanswered == 400
    assert all(r.error is None or "cancelled" in r.error for r in batch.results())


@pytest.mark.parametrize("own", [ONE_TILE_CHUNKS], indirect=True)
def test_deadline_finishes_the_batch_with_what_it_has(own: OwnStack) -> None:
    own.start("workers", "--concurrency", "1")
    own.start("aggregator", "--concurrency", "1")
    warm_up = own.client.submit("digits", held_out_strips(2, seed=17))
    assert warm_up.wait(timeout=120).state == "succeeded"  # the worker is up and models are loaded
    batch = own.client.submit("digits", held_out_strips(1100, max_digits=4, seed=18), deadline_s=3)
    status = batch.wait(timeout=300)
    assert status.state == "partial" and status.error == "deadline passed"
    row = assert_finished_and_consistent(own.engine, batch.id)
    assert row["succeeded"] > 0 and row["cancelled"] > 0
    answered, unanswered = _results(own, batch.id)
    assert answered > 0 and unanswered > 0


def test_sigterm_lets_a_worker_finish_its_sub_task_and_exit(own: OwnStack) -> None:
    first = own.start("workers", "--concurrency", "1")
    own.start("aggregator", "--concurrency", "1")
    batch = own.client.submit("poison", _points(3000, poison=set()))
    wait_for(lambda: own.succeeded_subtasks(batch.id) >= 100, 120, "progress")
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=60)
    running = own.count("SELECT count(*) FROM subtasks WHERE batch_id = :b AND state = 'running'", b=batch.id)
    assert running == 0
    own.start("workers", "--concurrency", "1")
    assert batch.wait(timeout=300).state == "succeeded"
    assert_finished_and_consistent(own.engine, batch.id)


def test_malformed_message_while_the_ledger_is_down_is_logged_and_acknowledged(own: OwnStack) -> None:
    """With PostgreSQL stopped, a malformed message cannot get its dead_letters row: the worker
    logs it (body included) on its one error line, acknowledges it, and keeps running."""
    worker = own.start("workers", "--models", "digit-ood", "--concurrency", "1")
    log = own.log_dir / "workers-0.log"
    wait_for(lambda: " ready." in log.read_text(errors="replace"), 120, "the worker to be ready")
    own.stop_postgres()
    message = Malformed("a JSON string", "shape", b'"a string"', broker.PREDICT_TASK)
    queue = broker.model_queue("digit-ood")
    publish(own.client.app, queue, [message])

    def named() -> list[str]:
        return [line for line in log.read_text(errors="replace").splitlines() if message.id in line]

    wait_for(lambda: named(), 60, "the worker to refuse the message")
    queues = redis.Redis.from_url(own.broker_url)
    wait_for(lambda: queues.llen(queue) == 0 and queues.hlen("unacked") == 0, 60, "the message to be acknowledged")
    time.sleep(1)
    assert worker.poll() is None
    [line] = named()
    assert "refused" in line and "shape" in line and "NOT recorded in dead_letters" in line and "a string" in line

"""The Python client as a service uses it: one `Client` shared by threads, each woken by
its own batch's notification; `wait` returns once a batch's results are readable, a
cancelled batch included; idempotency keys bound to their request; listing limits."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import Engine, event, text

from aggregator.assemble import aggregate_batch
from pipeline.client import BatchStatus, Client
from pipeline.errors import IdempotencyKeyError, InvalidArgumentError, PipelineError
from pipeline.listener import APPLICATION_NAME
from pipeline.pipelines.digits import held_out_strips
from pipeline.pipelines.screening import FEATURES, dataset_split, held_out_records
from pipeline.scratch import delete_keys
from tests.helpers import RunServices, run_client_settings, wait_for

# Longer than any wait in these tests is allowed to take: a waiter that misses its
# notification would sleep through its wait's timeout instead of re-reading in time.
NEVER_REREAD_S = 600.0


@pytest.fixture
def unserved(services: RunServices, models_dir: Path) -> Iterator[Client]:
    """A client publishing under a broker prefix no process consumes: its bulk batches never
    finish unless the test finishes them (a worker's interactive lane runs the interactive
    sub-tasks of its database, whatever the broker)."""
    prefix = f"unserved-{uuid.uuid4().hex[:8]}:"
    client = Client(run_client_settings(services, models_dir, broker_prefix=prefix, wait_reread_s=NEVER_REREAD_S))
    yield client
    client.close()
    delete_keys(services.broker_url, prefix)


def _cancel_and_assemble(client: Client, engine: Engine, batch_id: str) -> None:
    """Cancel a batch no worker runs and assemble its results here, as the aggregator would
    (a digits batch: its aggregate reads no model manifest)."""
    assert client.batch(batch_id).cancel().state == "cancelled"
    assert aggregate_batch(engine, uuid.UUID(batch_id)) == "cancelled"


def _screening_rows(count: int) -> np.ndarray:
    X_test = dataset_split()[1]
    return np.resize(X_test, (count, len(FEATURES)))


def test_threads_sharing_a_client_are_each_woken_by_their_own_batch(
    stack: object, services: RunServices, models_dir: Path, unserved: Client, engine: Engine
) -> None:
    """One thread waits on a batch that stays unfinished while four others submit and wait on
    three one-input batches each through the same client. The status is never re-read on a timer
    (NEVER_REREAD_S): a wait that missed its notification would time out."""
    shared = Client(run_client_settings(services, models_dir, wait_reread_s=NEVER_REREAD_S))
    try:
        long_batch = shared.batch(unserved.submit("digits", held_out_strips(3), priority="bulk").id)
        long_wait = ThreadPoolExecutor(1).submit(long_batch.wait, timeout=300)

        def submit_and_wait(thread: int) -> list[BatchStatus]:
            return [
                shared.submit("screening", held_out_records(1, seed=thread * 10 + i)).wait(timeout=120)
                for i in range(3)
            ]

        with ThreadPoolExecutor(4) as pool:
            short = [status for statuses in pool.map(submit_and_wait, range(4)) for status in statuses]
        assert [status.state for status in short] == ["succeeded"] * 12
        assert not long_wait.done()

        notified_before = shared.listener.notified
        _cancel_and_assemble(unserved, engine, long_batch.id)
        final = long_wait.result(timeout=120)
        assert final.state == "cancelled" and final.results_ready
        assert shared.listener.notified > notified_before  # woken by its notification
        assert len(list(long_batch.results())) == 3
    finally:
        shared.close()


def _listener_pids(engine: Engine) -> set[int]:
    with engine.connect() as conn:
        pids = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE application_name = :a AND datname = current_database()"),
            {"a": APPLICATION_NAME},
        )
        return set(pids.scalars())


def test_a_waiter_is_woken_after_the_listening_connection_was_lost(unserved: Client, engine: Engine) -> None:
    batch = unserved.submit("digits", held_out_strips(2), priority="bulk")
    waiting = ThreadPoolExecutor(1).submit(batch.wait, timeout=120)
    wait_for(lambda: bool(_listener_pids(engine)), 60, "the client's listening connection")
    lost = _listener_pids(engine)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:p AS int[])) AS pid"), {"p": list(lost)})
    wait_for(lambda: bool(_listener_pids(engine) - lost), 60, "the listening connection to be opened again")
    assert not waiting.done()
    _cancel_and_assemble(unserved, engine, batch.id)
    assert waiting.result(timeout=120).state == "cancelled"


def test_wait_on_a_cancelled_batch_returns_once_every_input_has_its_row(client: Client, stack: object) -> None:
    batch = client.submit("screening", _screening_rows(30_000))
    assert batch.cancel().state == "cancelled"
    status = batch.wait(timeout=300)
    assert status.state == "cancelled" and status.results_ready
    results = list(batch.results())
    assert [result.item for result in results] == list(range(30_000))
    assert all((result.output is None) != (result.error is None) for result in results)
    assert all("cancelled" in result.error for result in results if result.error is not None)


def test_wait_on_a_cancelled_batch_whose_results_no_one_assembles_times_out(unserved: Client, engine: Engine) -> None:
    batch = unserved.submit("digits", held_out_strips(4), priority="bulk")
    assert batch.cancel().state == "cancelled"
    status = batch.status()
    assert not status.finished and not status.results_ready and list(batch.results()) == []
    with pytest.raises(TimeoutError, match="cancelled, its results not yet assembled"):
        batch.wait(timeout=1)
    waiting = ThreadPoolExecutor(1).submit(batch.wait, timeout=120)
    assert aggregate_batch(engine, uuid.UUID(batch.id)) == "cancelled"
    assert waiting.result(timeout=120).finished
    assert len(list(batch.results())) == 4


def test_the_same_idempotency_key_is_bound_to_its_request(unserved: Client, engine: Engine) -> None:
    key = f"client-{uuid.uuid4().hex}"
    X = _screening_rows(5)
    first = unserved.submit("screening", X, idempotency_key=key)
    # The inputs as stored decide: the same rows as a DataFrame are the same request.
    assert unserved.submit("screening", pd.DataFrame(X, columns=FEATURES), idempotency_key=key).id == first.id
    changed = X.copy()
    changed[2, 7] += 1.0
    attempts: list[Callable[[], object]] = [
        lambda: unserved.submit("screening", changed, idempotency_key=key),
        lambda: unserved.submit("screening", X[:4], idempotency_key=key),
        lambda: unserved.submit("screening", X, idempotency_key=key, failure_policy="fail_fast"),
        lambda: unserved.submit("screening", X, idempotency_key=key, deadline_s=30),
    ]
    for attempt in attempts:
        with pytest.raises(IdempotencyKeyError, match=f"already names batch {first.id}, submitted with other"):
            attempt()
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM batches WHERE idempotency_key = :k"), {"k": key})
        assert stored.scalar_one() == 1
    first.cancel()


@pytest.mark.parametrize("limit", [-1, 0, 10_001, True, 2.5])
def test_batches_refuses_a_limit_out_of_range(client: Client, limit: object) -> None:
    with pytest.raises(InvalidArgumentError, match="limit must be an integer from 1 to 10000") as caught:
        client.batches(limit=limit)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, PipelineError)


def test_batches_refuses_an_unknown_state(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="state 'done' is not a batch state; known: pending"):
        client.batches(state="done")
    assert all(status.state == "succeeded" for status in client.batches(state="succeeded", limit=10_000))


def test_closing_a_client_closes_its_listening_connection(unserved: Client, engine: Engine) -> None:
    before = _listener_pids(engine)
    batch = unserved.submit("digits", held_out_strips(1), priority="bulk")
    with pytest.raises(TimeoutError):
        batch.wait(timeout=0.5)
    opened = _listener_pids(engine) - before
    assert len(opened) == 1
    unserved.close()
    wait_for(lambda: not opened & _listener_pids(engine), 30, "the listening connection to close")


def test_the_wait_that_sees_a_small_batch_finished_reads_its_results_with_its_status(
    client: Client, stack: object
) -> None:
    batch = client.submit("screening", held_out_records(3))
    statements: list[str] = []
    event.listen(client.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: statements.append(sql))
    status = batch.wait(timeout=60)
    assert status.state == "succeeded"
    read_by_wait = len(statements)
    ahead = list(batch.results())
    # The first result page came with the finished status: no read of its own.
    assert len(statements) == read_by_wait
    # A handle that did not wait reads the same results from the ledger.
    handle = client.batch(batch.id)
    before = len(statements)
    fresh = list(handle.results())
    assert len(statements) == before + 1
    assert ahead == fresh and [result.item for result in ahead] == [0, 1, 2]
    assert all(result.output is not None and result.model_versions for result in ahead)

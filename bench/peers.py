"""The peers: what a team would write by hand with Celery's own `chord` and the Redis
result backend, on the same broker, models and JSON serialisation as the pipeline.

* naive: one task per input (validate, split, predict with every model, aggregate);
* chunked: the pipeline's own chunking (`Chunker`, chunk size per model), one task per
  chunk carrying its float32 rows; the client assembles one result per input from the
  chunk outputs with the aggregator's own code, but nothing is written to a ledger;
* floor: a task that does nothing but write one ledger row and notify, waited for
  through the client's own `batch_finished` listener: the least a one-input batch
  can take on this broker and database;
* lean: a one-input batch kept as one ledger row: the client validates the input and
  inserts the row, one task claims it, answers with the pipeline's own code (the naive
  peer's) and finishes it with a durable commit and a notify, the client reads the answer.
  No sub-task per model, no pinned versions, no metrics: the least a ledger-tracked
  one-input batch could take, beside the floor.

The chord body returns the header's results, so the client reads them all from the
result backend. `python -m bench.peers` runs the peers' worker.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
from celery import Celery, chord
from sqlalchemy import Engine, text

from aggregator.assemble import ModelOutputStream
from pipeline import broker, ledger, registry
from pipeline.artifacts import Manifest, load_verified
from pipeline.chunker import Chunker
from pipeline.client import Client
from pipeline.definition import PageOutputs, Pipeline
from pipeline.garbage import collection_paused
from pipeline.inputs import encode_inputs, is_table
from pipeline.settings import Settings, get_settings


@cache
def loaded_model(name: str) -> tuple[Any, Manifest]:
    """Model `name` from PIPELINE_MODELS_DIR, loaded once per peer process (the peers run no registry)."""
    return load_verified(get_settings().resolved_models_dir, name)


QUEUE = "bench.peers"
NAIVE_TASK = "bench.naive_item"
CHUNK_TASK = "bench.predict_chunk"
COLLECT_TASK = "bench.collect"
FLOOR_TASK = "bench.floor"
FLOOR_TABLE = "bench_floor"
LEAN_TASK = "bench.lean"
LEAN_TABLE = "bench_lean"
# How long a client waits for a chord's results.
TIMEOUT_S = 3600

app = Celery("bench-peers", set_as_current=False)


def configure(settings: Settings) -> Celery:
    """The pipeline's broker settings, plus the Redis result backend under the run's prefix
    and Celery's own message consumer."""
    assert settings.broker_url is not None
    broker.configure(app, settings.broker_url, settings)
    app.conf.update(
        task_ignore_result=False,
        result_backend=settings.broker_url,
        result_backend_transport_options={"global_keyprefix": settings.broker_prefix},
        task_default_queue=QUEUE,
        # Celery's own consumer: the pipeline's guard accepts only the pipeline's task messages.
        worker_consumer="celery.worker.consumer:Consumer",
    )
    return app


def _encode(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()


def _decode(text: str) -> bytes:
    return base64.b64decode(text)


@app.task(name=NAIVE_TASK)
def naive_item(pipeline_name: str, item: dict[str, Any]) -> Any:
    """Validate, split, predict with every model and aggregate one input, with the pipeline's own code."""
    pipeline = registry.get_pipeline(pipeline_name)
    (page,) = encode_inputs(pipeline, [item], 1, get_settings().max_item_bytes)
    parts = pipeline.split_page(page)
    outputs = {}
    for spec in pipeline.models:
        rows = parts.get(spec.name)
        if rows is not None and len(rows.X):
            estimator, _ = loaded_model(spec.name)
            output = np.asarray(spec.predict(estimator, np.asarray(rows.X, dtype="<f4")), dtype="<f4")
            outputs[spec.name] = PageOutputs(output, np.asarray(rows.items))
    (result,) = pipeline.aggregate_page(page, outputs, [None], pipeline.kpis())
    return result


@app.task(name=CHUNK_TASK)
def predict_chunk(model: str, rows: int, payload: str) -> str:
    spec = registry.get_model(model)
    estimator, _ = loaded_model(model)
    X = np.frombuffer(_decode(payload), dtype="<f4").reshape(rows, spec.n_features)
    return _encode(spec.predict(estimator, X))


@app.task(name=COLLECT_TASK)
def collect(results: list[Any]) -> list[Any]:
    return results


def _ledger(durable_commits: bool = True) -> Engine:
    """The peers worker's engine on the ledger of its settings."""
    settings = get_settings()
    assert settings.database_url is not None
    return _engine(settings.database_url, durable_commits)


@cache
def _engine(database_url: str, durable_commits: bool = True) -> Engine:
    """One engine per process, ledger and commit mode."""
    return ledger.make_engine(database_url, durable_commits=durable_commits)


@app.task(name=FLOOR_TASK, ignore_result=True)
def floor(key: str) -> None:
    """One ledger write and its notification, as a sub-task completion and a batch finish make."""
    with _ledger().begin() as conn:
        conn.execute(
            text(f"INSERT INTO {FLOOR_TABLE} (key, done_at) VALUES (:key, clock_timestamp())"),  # noqa: S608
            {"key": key},
        )
        conn.execute(text("SELECT pg_notify(:channel, :key)"), {"channel": ledger.NOTIFY_CHANNEL, "key": key})


@app.task(name=LEAN_TASK, ignore_result=True)
def lean(key: str, pipeline_name: str) -> None:
    """Claim a lean batch's row, answer its input, finish the row and notify, as a worker's
    turn does: the claim without waiting for its WAL flush, the finish durable."""
    with _ledger(durable_commits=False).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        item = conn.execute(
            text(f"UPDATE {LEAN_TABLE} SET state = 'running' WHERE key = :key AND state = 'queued' RETURNING item"),  # noqa: S608
            {"key": key},
        ).scalar_one()
    answer = naive_item(pipeline_name, item)
    with _ledger().begin() as conn:
        conn.execute(
            text(
                f"UPDATE {LEAN_TABLE} SET state = 'done', answer = CAST(:answer AS jsonb)"  # noqa: S608
                " WHERE key = :key AND state = 'running'"
            ),
            {"key": key, "answer": json.dumps(answer)},
        )
        conn.execute(text("SELECT pg_notify(:channel, :key)"), {"channel": ledger.NOTIFY_CHANNEL, "key": key})


def create_round_trip_tables(client: Client) -> None:
    """The tables the no-op and lean tasks write (`floor_round_trip`, `lean_round_trip`),
    once before their first run."""
    with client.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE IF NOT EXISTS {FLOOR_TABLE} (key text PRIMARY KEY, done_at timestamptz)"))
        conn.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {LEAN_TABLE} (key text PRIMARY KEY, item jsonb, state text, answer jsonb)"
            )
        )


def _round_trips_ledger(client: Client) -> Engine:
    """The engine the no-op and lean round trips' own statements run on, apart from the
    client's: their reads end with a ROLLBACK, on which psycopg drops every statement it
    prepared on that connection, so on the client's pool they kept the pipeline's store
    and status read from ever being prepared (parsed and planned at every run instead).
    The round trips still wait through the client's listener."""
    assert client.settings.database_url is not None
    return _engine(client.settings.database_url)


def floor_round_trip(client: Client) -> float:
    """ms of one no-op round trip: `apply_async` → a peers worker → one ledger write and
    NOTIFY → the client's listener wakes → the row read back (`create_round_trip_tables` first)."""
    key = str(uuid.uuid4())
    start = time.perf_counter()
    _sent_and_woken(client, key, floor, (key,))
    with _round_trips_ledger(client).connect() as conn:
        conn.execute(text(f"SELECT done_at FROM {FLOOR_TABLE} WHERE key = :key"), {"key": key}).one()  # noqa: S608
    return (time.perf_counter() - start) * 1000


def lean_round_trip(client: Client, pipeline: Pipeline, item: dict[str, Any]) -> float:
    """ms of one lean one-input batch (`lean`): the input validated as `submit` does, its row
    inserted (a durable commit), the task sent, the client's listener woken, the answer read
    back (`create_round_trip_tables` first)."""
    key = str(uuid.uuid4())
    start = time.perf_counter()
    encode_inputs(pipeline, [item], 1, client.settings.max_item_bytes)
    with _round_trips_ledger(client).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(
            text(f"INSERT INTO {LEAN_TABLE} (key, item, state) VALUES (:key, CAST(:item AS jsonb), 'queued')"),  # noqa: S608
            {"key": key, "item": json.dumps(item)},
        )
    _sent_and_woken(client, key, lean, (key, pipeline.name))
    with _round_trips_ledger(client).connect() as conn:
        conn.execute(text(f"SELECT answer FROM {LEAN_TABLE} WHERE key = :key"), {"key": key}).one()  # noqa: S608
    return (time.perf_counter() - start) * 1000


def _sent_and_woken(client: Client, key: str, task: Any, args: tuple[str, ...]) -> None:
    """Send `task` with `args` and wait until the client's listener is woken by `key`."""
    with client.listener.subscription(key) as woken:
        woken.clear()
        task.apply_async(args, queue=QUEUE)
        if not woken.wait(TIMEOUT_S):
            raise RuntimeError(f"task {task.name} {key} never notified")


def naive_items(pipeline: Pipeline, inputs: Any) -> list[dict[str, Any]]:
    """The inputs as JSON-able items, one task message each."""
    if not is_table(inputs):
        return list(inputs)
    pages = encode_inputs(pipeline, inputs, len(inputs), get_settings().max_item_bytes)
    return [item.model_dump(mode="json") for page in pages for item in pipeline.page_items(page)]


def run_naive(pipeline: Pipeline, inputs: Any) -> int:
    """One task per input; return how many results were read back."""
    header = [naive_item.s(pipeline.name, item) for item in naive_items(pipeline, inputs)]
    results = chord(header)(collect.s()).get(timeout=TIMEOUT_S)
    return len(results)


def run_chunked(pipeline: Pipeline, inputs: Any, chunk_sizes: dict[str, int]) -> tuple[int, int]:
    """One task per chunk; return (results assembled, chunk tasks)."""
    settings = get_settings()
    pages = encode_inputs(pipeline, inputs, settings.max_batch_items, settings.max_item_bytes)
    # A chord's message carries its rows: no ledger to read them from.
    chunkers = [
        Chunker(spec, chunk_sizes.get(spec.name, spec.chunk_size), copy_inputs=True) for spec in pipeline.models
    ]
    chunks: list[ledger.NewSubtask] = []
    for page in pages:
        # The pipeline's own page calls as the pipeline makes them (pipeline/garbage.py).
        with collection_paused():
            parts = pipeline.split_page(page)
        for chunker in chunkers:
            rows = parts.get(chunker.spec.name)
            if rows is not None and len(rows.X):
                chunker.add(rows, page.first)
            chunks += chunker.take()
    for chunker in chunkers:
        chunks += chunker.take(final=True)
    header = [predict_chunk.s(c.model, c.rows, base64.b64encode(c.payload).decode()) for c in chunks]
    outputs = chord(header)(collect.s()).get(timeout=TIMEOUT_S)
    by_model: dict[str, list[ledger.SubtaskOutput]] = {spec.name: [] for spec in pipeline.models}
    for chunk, output in zip(chunks, outputs):
        by_model[chunk.model].append(ledger.SubtaskOutput(chunk.seq, chunk.items, _decode(output), None))
    streams = [ModelOutputStream(spec, _all_at_once(by_model[spec.name])) for spec in pipeline.models]
    kpis = pipeline.kpis()
    answered = 0
    for page in pages:
        page_outputs = {stream.spec.name: stream.take_page(page.first, page.count)[0] for stream in streams}
        with collection_paused():
            results = pipeline.aggregate_page(page, page_outputs, [None] * page.count, kpis)
        answered += sum(result is not None for result in results)
    return answered, len(chunks)


def _all_at_once(chunks: list[ledger.SubtaskOutput]) -> Callable[[int], list[ledger.SubtaskOutput]]:
    """A stream's fetch that hands over every chunk on the first call, nothing after."""
    pending = [chunks]
    return lambda _before_item: pending.pop() if pending else []


def main() -> None:
    """The peers' worker: `python -m bench.peers [concurrency]`."""
    concurrency = sys.argv[1] if len(sys.argv) > 1 else "2"
    configure(get_settings()).worker_main(
        [
            "worker",
            "--queues", QUEUE,
            "--concurrency", concurrency,
            "--hostname", f"bench-peers-{os.getpid()}@%h",
            "--loglevel", "WARNING",
            "--without-mingle",
            "--without-gossip",
        ]
    )  # fmt: skip


if __name__ == "__main__":
    main()

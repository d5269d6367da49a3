"""Malformed messages for each queue kind, published straight to a queue with kombu as an
attacker or a broken publisher would, and what a test checks once they were sent: each one
refused with its reason, dead-lettered once, logged once, gone from its queue, and counted
on /metrics, while the worker and aggregator keep serving (issue 11, point 1)."""

from __future__ import annotations

import json
import pickle
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text

from pipeline import broker, ledger
from pipeline.client import Client
from pipeline.pipelines.digits import held_out_strips
from pipeline.settings import Settings
from tests.helpers import Processes, wait_for

EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# A queue kind's task, a valid argument set, and argument sets its message model refuses.
BATCH_ID = "5b0f3c8e-2d1a-4c57-9b7e-8a6f0e4d2c19"
BAD_BATCH_KWARGS = ({"batch_id": "abc"}, {"batch_id": 42}, {"batch_id": BATCH_ID, "extra": 1}, {})
QUEUE_KINDS: dict[str, tuple[str, dict[str, Any], tuple[dict[str, Any], ...], str]] = {
    # kind: (task, valid kwargs, refused kwargs, a task another role runs)
    "model": (
        broker.PREDICT_TASK,
        {"subtask_id": 1},
        ({"subtask_id": "abc"}, {"subtask_id": 10**30}, {"subtask_id": 1, "extra": 1}, {}, {"subtask_id": True}),
        broker.AGGREGATE_TASK,
    ),
    "split": (broker.SPLIT_TASK, {"batch_id": BATCH_ID}, BAD_BATCH_KWARGS, broker.PREDICT_TASK),
    "aggregate": (broker.AGGREGATE_TASK, {"batch_id": BATCH_ID}, BAD_BATCH_KWARGS, broker.PREDICT_TASK),
}


@dataclass(frozen=True)
class Malformed:
    """One message to publish, and the reason it must be refused with."""

    what: str
    reason: str
    body: bytes
    task: str | None
    content_type: str = "application/json"
    headers: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def malformed_messages(kind: str) -> list[Malformed]:
    """Every kind of malformed message, addressed as a message of queue kind `kind`."""
    task, good, refused_kwargs, other_role_task = QUEUE_KINDS[kind]
    messages = [
        Malformed("a JSON string", "shape", _json("a string"), task),
        Malformed("a JSON number", "shape", _json(42), task),
        Malformed("a list of two", "shape", _json([[], good]), task),
        Malformed("an object", "shape", _json(good), task),
        Malformed("kwargs not an object", "shape", _json([[], "kwargs", EMBED]), task),
        Malformed("a callback", "shape", _json([[], good, {**EMBED, "callbacks": [{"task": "x"}]}]), task),
        Malformed("a hard time limit", "shape", _json([[], good, EMBED]), task, headers={"timelimit": [0.01, 0.01]}),
        Malformed("retries not a number", "shape", _json([[], good, EMBED]), task, headers={"retries": "x"}),
        Malformed("positional arguments", "arguments", _json([[1], good, EMBED]), task),
        *(Malformed(f"kwargs {kwargs}", "arguments", _json([[], kwargs, EMBED]), task) for kwargs in refused_kwargs),
        Malformed("an unknown task", "unknown_task", _json([[], good, EMBED]), "pipeline.nope"),
        Malformed("another role's task", "unknown_task", _json([[], good, EMBED]), other_role_task),
        Malformed("a Celery built-in task", "unknown_task", _json([[], {}, EMBED]), "celery.backend_cleanup"),
        Malformed("not JSON", "undecodable", b"{not json", task),
        Malformed("JSON nested 100,000 deep", "undecodable", b"[" * 100_000, task),
        Malformed("not compressed", "undecodable", _json([[], good, EMBED]), task, headers={"compression": "gzip"}),
        Malformed("a pickle", "content_type", pickle.dumps(((), good, EMBED)), task, "application/x-python-serialize"),
        Malformed("YAML", "content_type", b"!!python/object/apply:os.system ['true']", task, "application/x-yaml"),
        Malformed("an ETA that is no date", "invalid", _json([[], good, EMBED]), task, headers={"eta": "soon"}),
    ]
    # Protocol 1: no task header, the task named in the body.
    proto1 = Malformed("protocol 1", "shape", b"", None)
    body = {"task": task, "id": proto1.id, "args": [], "kwargs": good}
    return [*messages, Malformed(proto1.what, proto1.reason, _json(body), None, id=proto1.id)]


def publish(app: Celery, queue: str, messages: list[Malformed]) -> None:
    """Publish `messages` to `queue` through the default exchange, each with its id as header
    (when it names a task) and as correlation id."""
    with app.connection_for_write() as connection:
        producer = connection.Producer()
        for message in messages:
            headers = {"lang": "py", "id": message.id, "retries": 0, **message.headers}
            if message.task is not None:
                headers["task"] = message.task
            else:
                headers = {}
            producer.publish(
                message.body,
                exchange="",
                routing_key=queue,
                content_type=message.content_type,
                content_encoding="utf-8" if message.content_type == "application/json" else "binary",
                headers=headers,
                correlation_id=message.id,
                delivery_mode=2,
            )


def dead_letters(engine: Engine, messages: list[Malformed]) -> dict[str, Any]:
    """The dead_letters rows of `messages`, by message id."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM dead_letters WHERE message_id = ANY(:ids)"), {"ids": [m.id for m in messages]}
        ).all()
    return {row.message_id: row for row in rows}


def assert_refused(engine: Engine, queue: str, messages: list[Malformed]) -> None:
    """Wait until each of `messages` has its dead_letters row; check it is the only one and
    says what it should."""
    wait_for(lambda: len(dead_letters(engine, messages)) == len(messages), 90, f"{len(messages)} dead letters")
    rows = dead_letters(engine, messages)
    with engine.connect() as conn:
        copies = conn.execute(
            text("SELECT count(*) FROM dead_letters WHERE message_id = ANY(:ids)"), {"ids": [m.id for m in messages]}
        ).scalar_one()
    assert copies == len(messages), "one dead letter per message"
    # The process consuming the queue refused it.
    hostname_prefix = "models-" if queue.startswith("model.") else "aggregator-"
    for message in messages:
        row = rows[message.id]
        assert (row.queue, row.reason, row.task) == (queue, message.reason, message.task), message.what
        assert row.hostname.startswith(hostname_prefix) and row.detail, message.what
        assert row.content_type == message.content_type
        assert 0 < len(row.body) <= 4096 and "\x00" not in row.body


def assert_logged_once(log_dir: Path, messages: list[Malformed]) -> None:
    """Each message is named on exactly one line of the processes' logs, with no traceback."""
    lines = [line for path in sorted(log_dir.glob("*.log")) for line in path.read_text(errors="replace").splitlines()]
    for message in messages:
        named = [line for line in lines if message.id in line]
        assert len(named) == 1, f"{message.what}: {named}"
        assert "refused" in named[0] and message.reason in named[0]


def alive(processes: Processes) -> None:
    dead = [process.args for process in processes.running if process.poll() is not None]
    assert not dead, f"exited: {dead}"


def submit_through_every_queue(settings: Settings) -> None:
    """A batch just big enough to be split and aggregated by the aggregator (not by the client
    and the worker); assert it succeeds."""
    items = settings.small_batch_items + 1
    client = Client(settings)
    try:
        batch = client.submit("digits", held_out_strips(items, max_digits=2, seed=11))
        status = batch.wait(timeout=300)
    finally:
        client.close()
    assert status.state == "succeeded", status.error
    assert status.result is not None and status.result["answered"] == items


def rejected_counter(metrics_port: int) -> dict[tuple[str, str], float]:
    """pipeline_rejected_messages_total by (queue, reason), scraped from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
        exposition = response.read().decode()
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "pipeline_rejected_messages_total":
                counts[(sample.labels["queue"], sample.labels["reason"])] = sample.value
    return counts


def assert_counted(engine: Engine, metrics_port: int, queues: list[str]) -> None:
    """The counter equals the dead_letters rows per (queue, reason), and has a zero for every
    other reason of these queues."""
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT queue, reason, count(*) FROM dead_letters GROUP BY queue, reason")).all()
    expected: dict[tuple[str, str], float] = defaultdict(float)
    for queue in queues:
        for reason in ("shape", "arguments", "unknown_task", "undecodable", "content_type", "invalid"):
            expected[(queue, reason)] = 0
    for queue, reason, count in stored:
        expected[(queue, reason)] = count
    counted = rejected_counter(metrics_port)
    assert {key: counted.get(key) for key in expected} == dict(expected)


def assert_refused_while_serving(
    processes: Processes, settings: Settings, queues: dict[str, str], drained: Callable[[], bool]
) -> None:
    """Publish every malformed message to each of `queues` (queue kind -> queue), then check
    they were refused (each dead-lettered once, logged once, counted) and are gone from their
    queues (`drained`), while `processes` keep serving a batch through every queue."""
    sent = {queue: malformed_messages(kind) for kind, queue in queues.items()}
    client = Client(settings)
    try:
        for queue, messages in sent.items():
            publish(client.app, queue, messages)
    finally:
        client.close()
    engine = ledger.make_engine(settings.database_url)
    try:
        for queue, messages in sent.items():
            assert_refused(engine, queue, messages)
        alive(processes)
        submit_through_every_queue(settings)
        alive(processes)
        wait_for(drained, 60, "the queues to be drained and every message acknowledged")
        # Still one row each: none came back.
        for queue, messages in sent.items():
            assert_refused(engine, queue, messages)
        assert_logged_once(processes.log_dir, [message for messages in sent.values() for message in messages])
        assert_counted(engine, processes.metrics_port or 0, list(queues.values()))
    finally:
        engine.dispose()

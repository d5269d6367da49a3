"""The Prometheus endpoint of `pipeline aggregator` (aggregator/exporter.py): scraped
over HTTP while the test stack runs a batch, its collector read against known ledger
rows, and queue depth on Redis (under the run's key prefix) and on RabbitMQ."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator

import kombu
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, text

from aggregator.exporter import BUCKETS_S, LATENCY_WINDOW_S, PipelineCollector, queue_depths
from pipeline import broker, ledger, registry
from pipeline.client import Client
from pipeline.pipelines.digits import held_out_strips
from pipeline.settings import Settings
from tests.helpers import Processes, RunServices, free_port, wait_for

AMQP_URL = os.environ.get("PIPELINE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
FAMILIES = (
    "pipeline_queue_messages",
    "pipeline_batches",
    "pipeline_subtasks",
    "pipeline_model_unfinished_subtasks",
    "pipeline_model_retrying_subtasks",
    "pipeline_model_finished_subtasks",
    "pipeline_model_queue_wait_seconds_bucket",
    "pipeline_model_compute_seconds_bucket",
    "pipeline_metrics_source_up",
)

# Sample name -> {labels -> value}
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def _parse(exposition: str) -> Samples:
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples[sample.name][frozenset(sample.labels.items())] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][frozenset(labels.items())]


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples of `name` keyed by one label's value (the only label, or with the others summed)."""
    values: dict[str, float] = defaultdict(float)
    for labels, value in samples[name].items():
        values[dict(labels)[label]] += value
    return dict(values)


def _scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return _parse(response.read().decode())


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=30):
            return True
    except (urllib.error.URLError, OSError):
        return False


def _ledger_counts(engine: Engine) -> tuple[dict[str, int], dict[str, int]]:
    """Batches and sub-tasks by state, counted straight from the tables."""
    with engine.connect() as conn:
        batches = conn.execute(text("SELECT state, count(*) FROM batches GROUP BY state")).all()
        subtasks = conn.execute(text("SELECT state, count(*) FROM subtasks GROUP BY state")).all()
    return dict(batches), dict(subtasks)  # type: ignore[arg-type]


def _nonzero(values: dict[str, float]) -> dict[str, int]:
    return {key: int(value) for key, value in values.items() if value}


def _check_histogram(samples: Samples, name: str, model: str) -> tuple[float, float]:
    """Assert the buckets of `model` are cumulative and end in the count; return (count, sum)."""
    buckets = {float(dict(labels)["le"]): value for labels, value in samples[f"{name}_bucket"].items()
               if dict(labels)["model"] == model}  # fmt: skip
    assert sorted(buckets) == sorted(BUCKETS_S)
    counts = [buckets[le] for le in sorted(buckets)]
    assert counts == sorted(counts), f"{name}{{model={model}}} buckets are not cumulative: {counts}"
    count = _value(samples, f"{name}_gcount", model=model)
    assert counts[-1] == count
    return count, _value(samples, f"{name}_gsum", model=model)


def test_metrics_endpoint_during_a_run(stack: Processes, client: Client, engine: Engine) -> None:
    url = f"http://127.0.0.1:{stack.metrics_port}/metrics"
    wait_for(lambda: _answers(url), 90, "the aggregator's /metrics")
    before = _scrape(url)
    for family in FAMILIES:
        assert before[family], f"{family} missing"

    batch = client.submit("digits", held_out_strips(60))
    during = _scrape(url)
    # The new batch is counted, in whichever state it has reached.
    assert sum(during["pipeline_batches"].values()) == sum(before["pipeline_batches"].values()) + 1
    status = batch.wait(timeout=300)
    assert status.state == "succeeded", status.error

    def agrees_with_ledger() -> bool:
        # Ledger counts only move forward: equal before and after, nothing changed in between.
        first = _ledger_counts(engine)
        scraped = _scrape(url)
        last = _ledger_counts(engine)
        counted = (
            _nonzero(_by(scraped, "pipeline_batches", "state")),
            _nonzero(_by(scraped, "pipeline_subtasks", "state")),
        )
        return first == last == counted

    wait_for(agrees_with_ledger, 60, "a scrape that agrees with a count of the ledger's rows")
    after = _scrape(url)
    assert _value(after, "pipeline_metrics_source_up", source="ledger") == 1
    assert _value(after, "pipeline_metrics_source_up", source="broker") == 1
    batches, subtasks = _by(after, "pipeline_batches", "state"), _by(after, "pipeline_subtasks", "state")
    assert batches["succeeded"] >= _value(before, "pipeline_batches", state="succeeded") + 1
    assert subtasks["succeeded"] - _value(before, "pipeline_subtasks", state="succeeded") >= status.total > 0

    queues = _by(after, "pipeline_queue_messages", "queue")
    models = registry.all_models()
    assert {broker.model_queue(m) for m in models} | {broker.SPLIT_QUEUE, broker.AGGREGATE_QUEUE} <= set(queues)
    assert all(depth >= 0 for depth in queues.values())

    with engine.connect() as conn:
        per_model = dict(
            conn.execute(
                text("SELECT model, count(*) FROM subtasks WHERE batch_id = CAST(:id AS uuid) GROUP BY model"),
                {"id": status.id},
            ).all()
        )
    assert set(per_model) == {"digit-classifier", "digit-ood"}
    for model, subtasks in per_model.items():
        finished = _value(after, "pipeline_model_finished_subtasks", model=model, state="succeeded")
        assert finished >= subtasks
        wait_count, _ = _check_histogram(after, "pipeline_model_queue_wait_seconds", model)
        compute_count, compute_sum = _check_histogram(after, "pipeline_model_compute_seconds", model)
        failed = _value(after, "pipeline_model_finished_subtasks", model=model, state="failed")
        assert wait_count == compute_count == finished + failed
        assert compute_sum > 0


@pytest.fixture
def known_rows(engine: Engine) -> Iterator[str]:
    """A running batch of a model no pipeline has, with sub-tasks in every state at known times
    (leases a day ahead, so the stack's sweeper leaves them be); removed afterwards."""
    model = f"probe-{uuid.uuid4().hex[:8]}"
    batch_id = uuid.uuid4()
    # (state, attempts, error, queued / started / finished seconds ago)
    rows = [
        ("succeeded", 1, None, 10.0, 9.7, 7.7),  # wait 0.3 s, compute 2 s
        ("failed", 3, "boom", 20.0, 19.96, 19.84),  # wait 0.04 s, compute 0.12 s
        ("succeeded", 1, None, 30.0, 29.75, 29.0),  # wait 0.25 s: on a bucket's bound, counted in it
        ("succeeded", 1, None, 3700.0, 3699.0, 3690.0),  # finished before the window
        ("pending", 1, "boom", 5.0, None, None),  # waiting for a retry
        ("running", 1, None, 5.0, 4.0, None),
        ("dispatched", 0, None, 5.0, None, None),
    ]
    # A roll-out's shadow sub-tasks (seq -1 - k): never in the model's serving figures.
    shadows = [
        ("succeeded", 1, None, 10.0, 9.0, 1.0),
        ("pending", 1, "boom", 5.0, None, None),
        ("pending", 0, None, 5.0, None, None),
    ]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, pipeline, state, items, total, succeeded, failed)"
                " VALUES (:id, 'digits', 'running', 7, 7, 3, 1)"
            ),
            {"id": batch_id},
        )
        numbered = [(seq, "serve", row) for seq, row in enumerate(rows)]
        numbered += [(-1 - seq, "shadow", row) for seq, row in enumerate(shadows)]
        for seq, role, (state, attempts, error, queued, started, finished) in numbered:
            conn.execute(
                text(
                    """
                    INSERT INTO subtasks (batch_id, model, seq, role, state, attempts, max_attempts, rows, items,
                                          payload, error, queued_at, started_at, finished_at, lease_until)
                    VALUES (:batch_id, :model, :seq, :role, :state, :attempts, 3, 1, ARRAY[0], '\\x00', :error,
                            now() - make_interval(secs => :queued), now() - make_interval(secs => :started),
                            now() - make_interval(secs => :finished), now() + interval '1 day')
                    """
                ),
                dict(batch_id=batch_id, model=model, seq=seq, role=role, state=state, attempts=attempts,
                     error=error, queued=queued, started=started, finished=finished),
            )  # fmt: skip
    yield model
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM batches WHERE id = :id"), {"id": batch_id})


def test_collector_reads_the_ledger_exactly(known_rows: str, engine: Engine, client: Client) -> None:
    model = known_rows
    metrics = CollectorRegistry()
    metrics.register(PipelineCollector(engine, client.app, [model]))
    samples = _parse(generate_latest(metrics).decode())

    unfinished = {
        state: _value(samples, "pipeline_model_unfinished_subtasks", model=model, state=state)
        for state in ("pending", "dispatched", "running")
    }
    assert unfinished == {"pending": 1, "dispatched": 1, "running": 1}
    assert _value(samples, "pipeline_model_retrying_subtasks", model=model) == 1
    # The one finished an hour ago is outside the window.
    assert LATENCY_WINDOW_S < 3690
    assert _value(samples, "pipeline_model_finished_subtasks", model=model, state="succeeded") == 2
    assert _value(samples, "pipeline_model_finished_subtasks", model=model, state="failed") == 1

    def buckets(name: str) -> dict[str, float]:
        return {le: _value(samples, f"{name}_bucket", model=model, le=le) for le in ("0.025", "0.05", "0.25", "0.5")}

    assert buckets("pipeline_model_queue_wait_seconds") == {"0.025": 0, "0.05": 1, "0.25": 2, "0.5": 3}
    assert _check_histogram(samples, "pipeline_model_queue_wait_seconds", model) == (3, pytest.approx(0.59))
    assert buckets("pipeline_model_compute_seconds") == {"0.025": 0, "0.05": 0, "0.25": 1, "0.5": 1}
    assert _value(samples, "pipeline_model_compute_seconds_bucket", model=model, le="1.0") == 2
    assert _value(samples, "pipeline_model_compute_seconds_bucket", model=model, le="2.5") == 3
    assert _check_histogram(samples, "pipeline_model_compute_seconds", model) == (3, pytest.approx(2.87))
    assert _value(samples, "pipeline_metrics_source_up", source="ledger") == 1
    # The shadow sub-tasks: apart, and only there.
    assert _value(samples, "pipeline_model_shadow_unfinished_subtasks", model=model, state="pending") == 2
    assert _value(samples, "pipeline_model_shadow_finished_subtasks", model=model, state="succeeded") == 1


def test_unreachable_sources_are_reported_down() -> None:
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    app = broker.client_app(f"redis://{closed}/0", Settings(broker_url=f"redis://{closed}/0"))
    engine = ledger.make_engine(f"postgresql://postgres@{closed}/pipeline")
    metrics = CollectorRegistry()
    metrics.register(PipelineCollector(engine, app, ["digit-ood"]))
    samples = _parse(generate_latest(metrics).decode())
    engine.dispose()
    assert _by(samples, "pipeline_metrics_source_up", "source") == {"broker": 0, "ledger": 0}
    assert set(samples) == {"pipeline_metrics_source_up"}


def test_queue_depth_reads_the_prefixed_queues(
    isolated: tuple[Client, str], services: RunServices, quiet_engine: Engine
) -> None:
    client, prefix = isolated
    # Split by the client (it is small): one sub-task per model waits, as nothing consumes this prefix.
    batch = client.submit("digits", held_out_strips(3))
    try:
        model_queue = broker.model_queue("digit-classifier")
        queues = [broker.SPLIT_QUEUE, broker.AGGREGATE_QUEUE, model_queue]
        assert queue_depths(client.app, queues) == dict(zip(queues, [0, 0, 1]))
        assert redis.Redis.from_url(services.broker_url).llen(f"{prefix}{model_queue}") == 1
    finally:
        with quiet_engine.begin() as conn:  # no sweeper re-splits it later
            conn.execute(text("DELETE FROM batches WHERE id = CAST(:id AS uuid)"), {"id": batch.id})


def _rabbitmq_answers() -> bool:
    location = kombu.Connection(AMQP_URL)
    try:
        socket.create_connection((location.hostname, location.port or 5672), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.mark.services
@pytest.mark.skipif(not _rabbitmq_answers(), reason=f"no RabbitMQ answers at {AMQP_URL}")
def test_queue_depth_on_rabbitmq() -> None:
    app = broker.client_app(AMQP_URL, Settings(broker_url=AMQP_URL))
    queue = f"metrics-test-{uuid.uuid4().hex[:8]}"
    with kombu.Connection(AMQP_URL) as connection:
        channel = connection.channel()
        channel.queue_declare(queue=queue, durable=False, auto_delete=False)
        try:
            producer = kombu.Producer(channel)
            for n in range(3):
                producer.publish({"n": n}, exchange="", routing_key=queue)
            wait_for(lambda: queue_depths(app, [queue]) == {queue: 3}, 30, "RabbitMQ to count 3 messages")
            assert queue_depths(app, [f"{queue}-missing", queue]) == {f"{queue}-missing": 0, queue: 3}
        finally:
            channel.queue_delete(queue=queue)
            channel.close()

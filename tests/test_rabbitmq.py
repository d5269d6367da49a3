"""RabbitMQ as the broker: the transport options per broker, and a digits batch end to
end through real worker and aggregator processes on an `amqp://` URL.

The end-to-end run uses a vhost of this run's own (made and deleted with `rabbitmqctl`)
and a database of its own, so it sees no other run's messages or batches. It skips
where no RabbitMQ answers at `PIPELINE_TEST_AMQP_URL` (default guest@127.0.0.1:5672).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import text

from pipeline import broker, ledger
from pipeline.client import Client
from pipeline.errors import SettingsError
from pipeline.pipelines.digits import held_out_strips
from pipeline.scratch import ScratchServices, scratch_services
from pipeline.settings import Settings
from tests.helpers import TEST_SPLIT_ENV, Processes, free_port, register_champions, run_client_settings, wait_for
from tests.malformed import assert_refused_while_serving

AMQP_URL = os.environ.get("PIPELINE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DIGITS_QUEUES = ("model.digit-classifier", "model.digit-ood", broker.SPLIT_QUEUE, broker.AGGREGATE_QUEUE)
# A queue of each kind, for the malformed messages.
POISONED_QUEUES = {"model": "model.digit-ood", "split": broker.SPLIT_QUEUE, "aggregate": broker.AGGREGATE_QUEUE}
STRIPS = 80


def test_redis_gets_its_visibility_timeout_and_key_prefix() -> None:
    settings = Settings(broker_url="redis://127.0.0.1:6379/0", broker_prefix="run-1:", visibility_timeout_s=900)
    options = broker.transport_options(settings.broker_url, settings)
    assert options == {"visibility_timeout": 900, "global_keyprefix": "run-1:"}


def test_rabbitmq_gets_publisher_confirms_and_no_redis_only_options() -> None:
    settings = Settings(broker_url="amqp://guest:guest@127.0.0.1:5672/pipeline")
    app = broker.client_app(settings.broker_url, settings)
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    assert app.conf.task_default_delivery_mode == "persistent"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"broker_url": "amqp://guest@127.0.0.1//", "broker_prefix": "run-1:"}, "PIPELINE_BROKER_PREFIX"),
        ({"broker_url": "memory://"}, "PIPELINE_BROKER_URL"),
    ],
)
def test_settings_refuse_what_the_broker_cannot_do(values: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings(**values)


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=120)


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    """`AMQP_URL` on a vhost made for this run; the vhost, its queues and messages are deleted after."""
    parts = urlsplit(AMQP_URL)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    if not _answers(host, port):
        pytest.skip(f"no RabbitMQ answers on {host}:{port} (PIPELINE_TEST_AMQP_URL)")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip(f"RabbitMQ answers on {host}:{port}, but no rabbitmqctl is on PATH to make a vhost for this run")
    vhost = f"pipeline-test-{uuid.uuid4().hex[:12]}"
    made = _rabbitmqctl("add_vhost", vhost)
    if made.returncode != 0:
        pytest.skip(f"rabbitmqctl cannot make a vhost for this run: {(made.stderr or made.stdout).strip()}")
    try:
        granted = _rabbitmqctl("set_permissions", "-p", vhost, parts.username or "guest", ".*", ".*", ".*")
        assert granted.returncode == 0, granted.stderr
        yield urlunsplit(parts._replace(path=f"/{vhost}"))
    finally:
        deleted = _rabbitmqctl("delete_vhost", vhost)
        assert deleted.returncode == 0, deleted.stderr


@pytest.fixture(scope="module")
def rabbit_services(
    amqp_url: str, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ScratchServices]:
    """A database of this module's own, and the run's vhost as the broker."""
    with scratch_services("rabbitmq", tmp_path_factory.mktemp("embedded-rabbitmq")) as owned:
        register_champions(owned.database_url, models_dir)
        yield dataclasses.replace(owned, broker_url=amqp_url, broker_prefix="")


@pytest.fixture(scope="module")
def rabbit_stack(
    rabbit_services: ScratchServices, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Processes]:
    """A digits model worker and an aggregator consuming from RabbitMQ."""
    processes = Processes(tmp_path_factory.mktemp("logs-rabbitmq"))
    env = rabbit_services.env(models_dir, **TEST_SPLIT_ENV)
    processes.start("worker", ["-m", "workers", "--models", "digit-classifier,digit-ood", "--concurrency", "1"], env)
    processes.metrics_port = free_port()
    metrics = {"PIPELINE_METRICS_PORT": str(processes.metrics_port), "PIPELINE_METRICS_ADDRESS": "127.0.0.1"}
    processes.start("aggregator", ["-m", "aggregator", "--concurrency", "1"], {**env, **metrics})
    yield processes
    processes.stop_all()


def _queues(amqp_url: str) -> dict[str, tuple[bool, int, int]]:
    """Each queue of the run's vhost: (durable, messages ready, messages unacknowledged)."""
    vhost = urlsplit(amqp_url).path.lstrip("/")
    columns = ("name", "durable", "messages_ready", "messages_unacknowledged")
    listed = _rabbitmqctl("list_queues", "--quiet", "--no-table-headers", "-p", vhost, *columns)
    assert listed.returncode == 0, listed.stderr
    rows = (line.split("\t") for line in listed.stdout.splitlines() if line.strip())
    return {name: (durable == "true", int(ready), int(unacked)) for name, durable, ready, unacked in rows}


def test_digits_batch_end_to_end_on_rabbitmq(
    rabbit_services: ScratchServices, rabbit_stack: Processes, models_dir: Path, amqp_url: str
) -> None:
    inputs = held_out_strips(STRIPS, max_digits=6, seed=2)
    client = Client(run_client_settings(rabbit_services, models_dir))
    try:
        batch = client.submit("digits", inputs)
        status = batch.wait(timeout=300)
        results = list(batch.results())
    finally:
        client.close()

    assert status.state == "succeeded", status.error
    assert status.result == {"items": STRIPS, "answered": STRIPS, "unanswered": 0}
    assert [r.item for r in results] == list(range(STRIPS))
    accuracy = sum(r.output is not None and r.output["text"] == x["label"] for r, x in zip(results, inputs)) / STRIPS
    assert accuracy >= 0.9

    engine = ledger.make_engine(rabbit_services.database_url)
    try:
        with engine.connect() as conn:
            subtasks = conn.execute(
                text("SELECT model, state, attempts, worker FROM subtasks WHERE batch_id = :id"), {"id": batch.id}
            ).all()
    finally:
        engine.dispose()
    assert {s.model for s in subtasks} == {"digit-classifier", "digit-ood"}
    assert len(subtasks) > 2
    assert all(s.state == "succeeded" and s.attempts == 1 and s.worker.startswith("models-") for s in subtasks)

    # Every message went through this run's vhost, on durable queues, and was acknowledged.
    wait_for(
        lambda: all(_queues(amqp_url).get(q, (True, 1, 1))[1:] == (0, 0) for q in DIGITS_QUEUES),
        60,
        "the run's RabbitMQ queues to be drained and acknowledged",
    )
    queues = _queues(amqp_url)
    assert all(queues[q][0] for q in DIGITS_QUEUES), queues


def test_malformed_messages_are_refused_on_rabbitmq(
    rabbit_services: ScratchServices, rabbit_stack: Processes, models_dir: Path, amqp_url: str
) -> None:
    """tests/test_poison.py over RabbitMQ: each malformed message on a model, the split and the
    aggregate queue is refused, dead-lettered once and counted; both processes keep serving."""
    wait_for(lambda: set(DIGITS_QUEUES) <= set(_queues(amqp_url)), 120, "the processes to declare their queues")

    def drained() -> bool:
        """Nothing ready or unacknowledged in the queues."""
        queues = _queues(amqp_url)
        return all(queues[queue][1:] == (0, 0) for queue in POISONED_QUEUES.values())

    settings = run_client_settings(rabbit_services, models_dir)
    assert_refused_while_serving(rabbit_stack, settings, POISONED_QUEUES, drained)

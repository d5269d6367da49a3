"""Fixtures on real services: a PostgreSQL database and a Redis key prefix owned by
this test run (created, then removed), trained models, and real worker and
aggregator processes.

`PIPELINE_DATABASE_URL` / `PIPELINE_BROKER_URL` point at the servers to use;
when unset, the embedded PostgreSQL and Redis are started in a temporary folder.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

# Test-only pipelines, known to this process and every process the tests start.
os.environ["PIPELINE_PIPELINES"] = (
    "tests.pipelines:PoisonPipeline,tests.guarded:BadProbabilityPipeline,tests.user_pipeline:ShipmentsPipeline"
)

from pipeline import ledger  # noqa: E402  (after the environment is set)
from pipeline.client import Client  # noqa: E402
from pipeline.scratch import delete_keys, scratch_services  # noqa: E402
from pipeline.training import train_models  # noqa: E402
from tests.helpers import (  # noqa: E402
    TEST_SPLIT_ENV,
    Processes,
    RunServices,
    free_port,
    register_champions,
    run_client_settings,
)

# A test using any of these needs real services or trained models: it is marked `services`
# (the `make test` tier); the rest are pure logic (`make test-fast`).
SERVICE_FIXTURES = frozenset({"services", "models_dir", "amqp_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the run's embedded servers live when no URL is set."""
    return tmp_path_factory.mktemp("embedded")


@pytest.fixture(scope="session")
def services(embedded_dir: Path, models_dir: Path) -> Iterator[RunServices]:
    """The run's services, with the trained models registered as champions."""
    with scratch_services("test", embedded_dir) as owned:
        register_champions(owned.database_url, models_dir)
        yield owned


@pytest.fixture(scope="session")
def quiet_services(services: RunServices, embedded_dir: Path, models_dir: Path) -> Iterator[RunServices]:
    """A database of its own that no worker or aggregator process of the run reads: a worker
    claims any dispatched sub-task of its models, so tests that drive the ledger in-process
    keep their sub-tasks here."""
    with scratch_services("quiet", embedded_dir) as owned:
        register_champions(owned.database_url, models_dir)
        yield owned


@pytest.fixture
def quiet_engine(quiet_services: RunServices) -> Iterator[Engine]:
    """An engine on `quiet_services`' database, emptied of batches after each test."""
    engine = ledger.make_engine(quiet_services.database_url)
    yield engine
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE batches CASCADE"))
    engine.dispose()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    train_models(folder)
    return folder


@pytest.fixture(scope="session")
def engine(services: RunServices) -> Iterator[Engine]:
    engine = ledger.make_engine(services.database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def client(services: RunServices, models_dir: Path) -> Iterator[Client]:
    client = Client(run_client_settings(services, models_dir))
    yield client
    client.close()


@pytest.fixture
def isolated(quiet_services: RunServices, quiet_engine: Engine, models_dir: Path) -> Iterator[tuple[Client, str]]:
    """A client on the database no process of the run reads (`quiet_services`: read it with
    `quiet_engine`, which empties it after the test), publishing under a broker prefix no
    process consumes, so what it stores and queues stays as it left it (a worker's
    interactive lane runs the interactive sub-tasks of its database, whatever the broker)."""
    prefix = f"isolated-{uuid.uuid4().hex[:8]}:"
    client = Client(run_client_settings(quiet_services, models_dir, broker_prefix=prefix))
    yield client, prefix
    client.close()
    delete_keys(quiet_services.broker_url, prefix)


@pytest.fixture(scope="session")
def stack(services: RunServices, models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    """One model worker (2 processes, every model) and one aggregator, for the whole run."""
    processes = Processes(tmp_path_factory.mktemp("logs"))
    env = services.env(models_dir, **TEST_SPLIT_ENV)
    processes.start("worker", ["-m", "workers", "--concurrency", "2"], env)
    processes.metrics_port = free_port()
    metrics = {"PIPELINE_METRICS_PORT": str(processes.metrics_port), "PIPELINE_METRICS_ADDRESS": "127.0.0.1"}
    processes.start("aggregator", ["-m", "aggregator", "--concurrency", "1"], {**env, **metrics})
    yield processes
    processes.stop_all()

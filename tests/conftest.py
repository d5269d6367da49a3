"""Fixtures on real services: a PostgreSQL database and a Redis key prefix owned by
this test run (created, then removed), trained models, and real worker and
aggregator processes.

`PIPELINE_DATABASE_URL` / `PIPELINE_BROKER_URL` point at the servers to use;
when unset, the embedded PostgreSQL and Redis are started in a temporary folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

# Test-only pipelines, known to this process and every process the tests start.
os.environ["PIPELINE_PIPELINES"] = "tests.pipelines:PoisonPipeline,tests.guarded:BadProbabilityPipeline"

from pipeline import ledger  # noqa: E402  (after the environment is set)
from pipeline.client import Client
from pipeline.scratch import ScratchServices, delete_keys, scratch_services
from pipeline.settings import Settings
from pipeline.training import train_models

# The services a test run owns (its database and broker prefix).
RunServices = ScratchServices

# A test using any of these needs real services or trained models: it is marked `services`
# (the `make test` tier); the rest are pure logic (`make test-fast`).
SERVICE_FIXTURES = frozenset({"services", "models_dir", "amqp_url"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunServices]:
    with scratch_services("test", tmp_path_factory.mktemp("embedded")) as owned:
        yield owned


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


# How the tests split, for the aggregator and for clients alike (a client splits a small
# batch itself). Odd chunk sizes, different per model, so strips straddle sub-task
# boundaries and every model of a small batch runs several sub-tasks (latency
# percentiles); small split steps, so a multi-input batch is split in several steps and
# has its results assembled while its sub-tasks run.
TEST_CHUNK_SIZES = {
    "digit-classifier": 97,
    "digit-ood": 128,
    "screen-logreg": 16,
    "screen-forest": 23,
    "screen-boosting": 40,
}
TEST_SPLIT_STEP_ITEMS = 40
TEST_SPLIT_ENV = {
    "PIPELINE_CHUNK_SIZES": json.dumps(TEST_CHUNK_SIZES),
    "PIPELINE_SPLIT_STEP_ITEMS": str(TEST_SPLIT_STEP_ITEMS),
}


def run_client_settings(services: ScratchServices, models_dir: Path, **overrides: object) -> Settings:
    """A client's settings for the run's services, splitting as the stack does."""
    return services.settings(
        models_dir, chunk_sizes=TEST_CHUNK_SIZES, split_step_items=TEST_SPLIT_STEP_ITEMS, **overrides
    )


@pytest.fixture(scope="session")
def client(services: RunServices, models_dir: Path) -> Iterator[Client]:
    client = Client(run_client_settings(services, models_dir))
    yield client
    client.close()


@pytest.fixture
def isolated(services: RunServices, models_dir: Path) -> Iterator[tuple[Client, str]]:
    """A client publishing under a broker prefix no process consumes, so what it queues stays visible."""
    prefix = f"isolated-{uuid.uuid4().hex[:8]}:"
    client = Client(run_client_settings(services, models_dir, broker_prefix=prefix))
    yield client, prefix
    client.close()
    delete_keys(services.broker_url, prefix)


class Processes:
    """Real `python -m workers` / `python -m aggregator` processes, logging to files."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[subprocess.Popen[bytes]] = []
        # The port of the `stack` aggregator's Prometheus endpoint.
        self.metrics_port: int | None = None

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start `python *argv` in its own process group, so `kill` reaches its pool children too."""
        log = open(self.log_dir / f"{name}-{len(self.running)}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.running.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """kill -9 the process and its pool children."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self, timeout: float = 30) -> None:
        """SIGTERM every process (a warm shutdown), SIGKILL what is left after `timeout` s."""
        for process in self.running:
            if process.poll() is None:
                process.terminate()
        for process in self.running:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(process)


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: object, timeout: float, what: str) -> None:
    """Poll `predicate()` until true; fail the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)

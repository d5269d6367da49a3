"""Worker heartbeats: which queues each live worker and aggregator process consumes, so a
batch waiting on a queue no one serves can say so."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine, delete

from pipeline.ledger import queries
from pipeline.ledger.connection import autocommit
from pipeline.schema import WorkerHeartbeat


def record_heartbeat(engine: Engine, worker: str, queues: Sequence[str]) -> None:
    """Record that `worker` (its Celery node name) is alive and consumes `queues`."""
    with autocommit(engine) as conn:
        conn.execute(queries.RECORD_HEARTBEAT, {"worker": worker, "queues": list(queues)})


def forget_worker(engine: Engine, worker: str) -> None:
    """Remove `worker`'s heartbeat (it is stopping)."""
    with autocommit(engine) as conn:
        conn.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.worker == worker))


def unserved_queues(engine: Engine, queues: Sequence[str], max_age_s: float) -> list[str]:
    """The `queues`, in order, that no worker has reported consuming within `max_age_s` seconds."""
    with autocommit(engine) as conn:
        rows = conn.execute(queries.UNSERVED_QUEUES, {"queues": list(queues), "max_age_s": max_age_s}).scalars()
        return list(rows)

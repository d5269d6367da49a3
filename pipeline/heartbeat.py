"""Heartbeats of the consuming processes: a thread in each `pipeline worker` and `pipeline
aggregator` records in the ledger (`worker_heartbeats`), every `PIPELINE_HEARTBEAT_S`, the
queues it consumes; a client then names the queues a batch waits on that no one serves.

The ledger, not the broker, holds them: reading them is one query on a small table, the
same on Redis and RabbitMQ, where asking the workers (Celery's `inspect`) costs a broadcast
and a reply timeout, and says nothing when a worker is slow to answer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from celery import signals
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline import ledger, runtime
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# A queue counts as served while a consumer beat within this many heartbeat intervals.
MISSED_BEATS = 3


def queue_key(settings: Settings, queue: str) -> str:
    """`queue` as the broker holds it (behind `PIPELINE_BROKER_PREFIX`): deployments sharing
    one ledger database through different prefixes do not serve each other's queues."""
    return settings.broker_prefix + queue


def max_beat_age_s(settings: Settings) -> float:
    """How old a consumer's last heartbeat may be for it to count as live."""
    return MISSED_BEATS * settings.heartbeat_s


def unserved_queues(engine: Engine, settings: Settings, queues: Sequence[str]) -> list[str]:
    """The `queues`, in order, that no live worker or aggregator consumes."""
    keys = {queue_key(settings, queue): queue for queue in queues}
    return [keys[key] for key in ledger.unserved_queues(engine, list(keys), max_beat_age_s(settings))]


class Heartbeat(threading.Thread):
    """Records every `interval_s` that `worker` consumes `queues` (as the broker names them,
    `queue_key`), on an `engine` of its own, until `stop()`, which removes its row and
    disposes of the engine."""

    def __init__(self, engine: Engine, worker: str, queues: Sequence[str], interval_s: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.engine = engine
        self.worker = worker
        self.queues = list(queues)
        self.interval_s = interval_s
        self._stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                ledger.record_heartbeat(self.engine, self.worker, self.queues)
            except SQLAlchemyError as error:
                log.warning("heartbeat not recorded, retrying in %.0f s: %s", self.interval_s, error)
            if self._stopped.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=self.interval_s + 5)
        try:
            ledger.forget_worker(self.engine, self.worker)
        except SQLAlchemyError as error:
            log.warning("heartbeat of %s not removed (it ages out): %s", self.worker, error)
        self.engine.dispose()


def beat_while_consuming(worker: str, queues: Sequence[str], settings: Settings) -> None:
    """Make this Celery worker process beat for `queues` under its node name `worker`: from
    `worker_ready` (once its pool has forked, so no child inherits the thread's engine)
    until `worker_shutdown`."""
    beats: list[Heartbeat] = []
    keys = [queue_key(settings, queue) for queue in queues]

    @signals.worker_ready.connect(weak=False)
    def start_heartbeat(**_: Any) -> None:
        beat = Heartbeat(ledger.make_engine(runtime.service_urls().database_url), worker, keys, settings.heartbeat_s)
        beat.start()
        beats.append(beat)

    @signals.worker_shutdown.connect(weak=False)
    def stop_heartbeat(**_: Any) -> None:
        for beat in beats:
            beat.stop()

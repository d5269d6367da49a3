"""The sweeper: a thread in every `pipeline aggregator` that reconciles the ledger
with the queues every `PIPELINE_SWEEP_INTERVAL_S`, so nothing the ledger says is
unfinished is lost when Redis loses messages or a worker dies. Several aggregators
may run: a PostgreSQL advisory lock lets one sweep at a time."""

from __future__ import annotations

import logging
import threading

import kombu.exceptions
import redis
from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline import broker, ledger, rollouts
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# A sweep that cannot reach PostgreSQL or Redis is retried at the next interval.
TRANSIENT_ERRORS = (SQLAlchemyError, kombu.exceptions.OperationalError, redis.RedisError, OSError)


def sweep_once(engine: Engine, app: Celery, settings: Settings) -> ledger.Sweep | None:
    """Run one sweep and publish what it found, then recompute the gates of active roll-outs
    whose evidence changed (`rollouts.refresh_gates`); return the sweep (None when another
    process swept)."""
    found = ledger.sweep(engine, settings.lease_s)
    if found is None:
        return None
    for batch_id in found.split:
        broker.publish_split(app, str(batch_id))
    broker.publish_predictions(app, found.predict)
    for batch_id in found.aggregate:
        broker.publish_aggregate(app, str(batch_id))
    rollouts.refresh_gates(engine, settings.rollout_gate_interval_s)
    if found.predict or found.split or found.aggregate or found.gave_up:
        log.warning(
            "sweeper: re-published %d sub-tasks, %d splits, %d aggregates; gave up on %d lost sub-tasks",
            len(found.predict),
            len(found.split),
            len(found.aggregate),
            found.gave_up,
        )
    return found


class Sweeper(threading.Thread):
    """Runs `sweep_once` every `settings.sweep_interval_s` until `stop()`."""

    def __init__(self, engine: Engine, app: Celery, settings: Settings) -> None:
        super().__init__(name="sweeper", daemon=True)
        self.engine = engine
        self.app = app
        self.settings = settings
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.settings.sweep_interval_s):
            try:
                sweep_once(self.engine, self.app, self.settings)
            except TRANSIENT_ERRORS as error:
                log.warning("sweep failed, retrying in %.0f s: %s", self.settings.sweep_interval_s, error)

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=self.settings.sweep_interval_s + 5)
        self.engine.dispose()

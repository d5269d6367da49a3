"""The Celery tasks the aggregator process runs: `split` and `aggregate`."""

from __future__ import annotations

import uuid

import pipeline.splitter  # noqa: F401  (registers the split task on the shared app)
from aggregator.assemble import aggregate_batch
from pipeline import broker, runtime


@broker.app.task(name=broker.AGGREGATE_TASK)
def aggregate(batch_id: str) -> None:
    aggregate_batch(runtime.engine(), uuid.UUID(broker.AggregateMessage(batch_id=batch_id).batch_id))

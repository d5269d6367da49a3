"""Malformed messages on every queue kind (model.<name>, split, aggregate) over Redis: each
is refused, dead-lettered once and counted, and the worker and the aggregator keep serving.
The same over RabbitMQ is in tests/test_rabbitmq.py; with the ledger down, in tests/test_faults.py."""

from __future__ import annotations

from pathlib import Path

import redis

from pipeline import broker
from tests.helpers import Processes, RunServices, run_client_settings
from tests.malformed import assert_refused_while_serving

QUEUES = {"model": broker.model_queue("digit-ood"), "split": broker.SPLIT_QUEUE, "aggregate": broker.AGGREGATE_QUEUE}


def test_malformed_messages_are_refused_and_every_queue_keeps_serving(
    stack: Processes, services: RunServices, models_dir: Path
) -> None:
    keys = redis.Redis.from_url(services.broker_url)
    prefix = services.broker_prefix

    def drained() -> bool:
        """Nothing waits in the queues or is held unacknowledged."""
        return all(keys.llen(prefix + queue) == 0 for queue in QUEUES.values()) and keys.hlen(prefix + "unacked") == 0

    assert_refused_while_serving(stack, run_client_settings(services, models_dir), QUEUES, drained)

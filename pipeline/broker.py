"""The Celery app every role shares, and the messages it carries.

The broker (Redis or RabbitMQ) is only transport: a message names a ledger row,
nothing more; the ledger decides what runs. Tasks are named here by string, so
this package never imports `workers` or `aggregator`, which define them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Annotated, Literal

import kombu.exceptions
from celery import Celery
from kombu import Producer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pipeline.settings import AMQP_SCHEMES, Settings

log = logging.getLogger(__name__)

SPLIT_TASK = "pipeline.split"
PREDICT_TASK = "pipeline.predict"
AGGREGATE_TASK = "pipeline.aggregate"
SPLIT_QUEUE = "split"
# Most broker commands (a message, its sent event) buffered before a publish batch is flushed.
PUBLISH_BATCH = 1000
AGGREGATE_QUEUE = "aggregate"


def model_queue(model: str) -> str:
    return f"model.{model}"


def _uuid_text(value: str) -> str:
    """`value` when it is a UUID's text (a batch id); raises ValueError otherwise."""
    uuid.UUID(value)
    return value


BatchId = Annotated[str, Field(max_length=45), AfterValidator(_uuid_text)]
# A `subtasks.id`: a positive PostgreSQL bigint.
SubtaskId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class Message(BaseModel):
    """A task's keyword arguments on the wire: exactly these fields, of exactly these types
    (strict: no "5" for 5, no true for 1), so a consumer can refuse anything else."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class SplitMessage(Message):
    batch_id: BatchId


class PredictMessage(Message):
    subtask_id: SubtaskId
    # Shown in Flower; the ledger, not this, decides what a worker claims first.
    priority: Literal["interactive", "bulk", "shadow"] | None = None


class AggregateMessage(Message):
    batch_id: BatchId


# The message model of each of the pipeline's tasks; a consumer refuses a message of any other task.
MESSAGES: dict[str, type[Message]] = {
    SPLIT_TASK: SplitMessage,
    PREDICT_TASK: PredictMessage,
    AGGREGATE_TASK: AggregateMessage,
}


# The app the worker and aggregator processes register their tasks on.
app = Celery("pipeline", set_as_current=True)


def client_app(broker_url: str, settings: Settings) -> Celery:
    """A separate app for a client that only publishes (tasks are named by string)."""
    return configure(Celery("pipeline-client", set_as_current=False), broker_url, settings)


def transport_options(broker_url: str, settings: Settings) -> dict[str, object]:
    """The options of `broker_url`'s transport: RabbitMQ and Redis take different ones."""
    if broker_url.startswith(AMQP_SCHEMES):
        # Publisher confirms: a publish returns once RabbitMQ has taken the message.
        return {"confirm_publish": True}
    options: dict[str, object] = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.broker_prefix:
        options["global_keyprefix"] = settings.broker_prefix
    return options


def configure(app: Celery, broker_url: str, settings: Settings) -> Celery:
    """Point `app` at `broker_url` with the pipeline's delivery settings; return it."""
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options(broker_url, settings),
        broker_connection_retry_on_startup=True,
        # JSON only: nothing on the wire can make a process unpickle.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        # At-least-once: a message is acked after the task ran, and re-queued if its worker died.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # The ledger holds every result; no result backend.
        task_ignore_result=True,
        result_backend=None,
        # On RabbitMQ, queues are declared durable and messages sent persistent: both survive a restart.
        task_default_delivery_mode="persistent",
        # Flower shows tasks from the workers' events (received, started, succeeded, failed).
        # No `task-sent` event: it would cost a publish of its own per message sent, one more
        # broker round trip per predict message on the submitting client's path (about 1 ms
        # of a one-input batch's latency, measured by `make bench`'s latency phases).
        worker_send_task_events=True,
        task_send_sent_event=False,
        task_create_missing_queues=True,
        task_routes={SPLIT_TASK: {"queue": SPLIT_QUEUE}, AGGREGATE_TASK: {"queue": AGGREGATE_QUEUE}},
        worker_hijack_root_logger=False,
        # Refuses a malformed message (dead-lettered, counted) instead of letting it stop the worker.
        worker_consumer="pipeline.consumer:GuardedConsumer",
    )
    return app


def publish_split(app: Celery, batch_id: str) -> None:
    app.send_task(SPLIT_TASK, kwargs=SplitMessage(batch_id=batch_id).model_dump(), queue=SPLIT_QUEUE)


def publish_aggregate(app: Celery, batch_id: str) -> None:
    app.send_task(AGGREGATE_TASK, kwargs=AggregateMessage(batch_id=batch_id).model_dump(), queue=AGGREGATE_QUEUE)


# `subtasks.priority` rank → its name (the `priority` of a predict message).
PRIORITY_NAMES: dict[int, Literal["interactive", "bulk", "shadow"]] = {0: "interactive", 1: "bulk", 2: "shadow"}


def publish_predictions(app: Celery, subtasks: Iterable[tuple[int, str, int]], countdown: float | None = None) -> int:
    """Publish one predict message per (sub-task id, model, priority rank) — a
    `ledger.Dispatch` — over one producer, each to run no sooner than `countdown` seconds
    from now; return the count. The first goes out at once, so a worker starts on it while
    the rest are built; the rest in batches (on Redis one pipelined round trip per batch,
    with kombu's `Producer.batch`).

    Raises:
        kombu.exceptions.OperationalError: the broker is unreachable (after kombu's retries);
            some of the messages may have gone out.
    """
    messages = [
        (PredictMessage(subtask_id=subtask_id, priority=PRIORITY_NAMES.get(rank)), model_queue(model))
        for subtask_id, model, rank in subtasks
    ]
    if not messages:
        return 0
    try:
        with app.producer_or_acquire() as producer:
            _send_prediction(app, *messages[0], countdown, producer)
            with producer.batch(PUBLISH_BATCH):
                for message, queue in messages[1:]:
                    _send_prediction(app, message, queue, countdown, producer)
    # A batch is flushed without kombu's reconnecting retry, and a failed flush leaves unknown
    # which of its messages went out: publish each again with the retry (a duplicate is
    # dropped by the ledger). A broker still unreachable then raises OperationalError, the
    # error every caller takes as transient (a BatchPublishError stopped the sweeper thread).
    # celery-types' kombu stubs predate BatchPublishError (kombu 5.7).
    except kombu.exceptions.BatchPublishError as error:  # type: ignore[attr-defined]
        log.warning("a batch of predict messages failed (%s); publishing them one by one", error.__cause__ or error)
        for message, queue in messages:
            _send_prediction(app, message, queue, countdown, None)
    return len(messages)


def _send_prediction(
    app: Celery, message: PredictMessage, queue: str, countdown: float | None, producer: Producer | None
) -> None:
    app.send_task(
        PREDICT_TASK,
        kwargs=message.model_dump(exclude_none=True),
        queue=queue,
        producer=producer,
        countdown=countdown,
    )

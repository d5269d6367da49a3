"""The Celery consumer of every worker and aggregator process (`worker_consumer` in
`pipeline.broker.configure`): it refuses a malformed message before Celery reads it.

Celery's own consumer lets some malformed messages raise in the worker's main process (a
JSON body `"a string"` or `42` under a task header: `ValueError: too many values to unpack`),
which stops the worker; the message is restored, so every restart dies on it again. Here each
message is checked against the shape `pipeline.broker` publishes (a Celery protocol 2 task
message of one of the pipeline's tasks, its keyword arguments valid for the task's message
model, JSON only) before Celery's strategy sees it. A message that fails is refused: one
error line naming it, one `dead_letters` row, acknowledged (never redelivered), counted by
`pipeline_rejected_messages_total`; the process goes on with the next message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Annotated, Any

from celery import Task
from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.message import Message
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from vine import promise

from pipeline import broker, runtime
from pipeline.ledger import dead_letters
from pipeline.ledger.dead_letters import RejectedMessage
from pipeline.schema import RejectionReason

log = logging.getLogger(__name__)

# The keys of a protocol 2 body's third part; the pipeline sets none of them.
EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})


class TaskHeaders(BaseModel):
    """The protocol 2 headers Celery reads in a worker's main process, typed as the pipeline's
    publishers send them. Other headers are let through: brokers add their own (RabbitMQ's
    `x-death`, say), and Celery's main process does not read them."""

    model_config = ConfigDict(strict=True, extra="allow")

    id: str = Field(min_length=1)
    task: str
    retries: int = Field(default=0, ge=0)
    # A retry's countdown. Celery parses it, and refuses one that is no ISO 8601 time (`invalid`).
    eta: str | None = None
    expires: str | None = None
    shadow: str | None = None
    # The pipeline sets no time limit; a hard one would kill pool processes mid-sub-task.
    timelimit: Annotated[tuple[None, None] | None, Field(strict=False)] = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    argsrepr: str | None = None
    kwargsrepr: str | None = None
    origin: str | None = None
    ignore_result: bool | None = None
    replaced_task_nesting: int = 0
    stamped_headers: list[str] | None = None
    stamps: dict[str, Any] | None = None


class MalformedMessage(Exception):
    """A message the pipeline refuses, and why."""

    def __init__(self, reason: RejectionReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _errors(error: ValidationError) -> str:
    """A validation error in one line, naming each bad field (not its value, which may be huge)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in error.errors())


def _keyword_arguments(body: object) -> dict[str, Any]:
    """The keyword arguments of a protocol 2 body `[args, kwargs, embed]`.

    Raises:
        MalformedMessage: another shape, positional arguments, or a callback, errback,
        chain or chord (the pipeline uses none).
    """
    if not isinstance(body, list) or len(body) != 3:
        kind = f"a list of {len(body)}" if isinstance(body, list) else f"of type {type(body).__name__}"
        raise MalformedMessage(RejectionReason.shape, f"the body is {kind}, not [args, kwargs, embed]")
    args, kwargs, embed = body
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        raise MalformedMessage(RejectionReason.shape, "the body is not [list, object, object]")
    if set(embed) - EMBED_KEYS or any(value is not None for value in embed.values()):
        raise MalformedMessage(RejectionReason.shape, "callbacks, errbacks, chains and chords are not accepted")
    if args:
        raise MalformedMessage(RejectionReason.arguments, "positional arguments: the tasks take keyword arguments")
    return kwargs


def check_message(message: Message, tasks: Mapping[str, Task[Any, Any]]) -> None:
    """Return when `message` is a JSON protocol 2 message of one of the pipeline's tasks that
    is registered in `tasks` (this process's), with headers and keyword arguments as the
    pipeline publishes them.

    Raises:
        MalformedMessage: anything else, with the reason and what is wrong.
    """
    try:
        body = message.decode()
    except ContentDisallowed as error:
        raise MalformedMessage(RejectionReason.content_type, str(error)) from None
    except DecodeError as error:
        raise MalformedMessage(RejectionReason.undecodable, f"the body does not decode: {error!r}") from None
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        raise MalformedMessage(RejectionReason.shape, "no task header: not a Celery protocol 2 task message")
    try:
        TaskHeaders.model_validate(headers)
    except ValidationError as error:
        raise MalformedMessage(RejectionReason.shape, f"headers: {_errors(error)}") from None
    name = headers["task"]
    model = broker.MESSAGES.get(name)
    if model is None or name not in tasks:
        raise MalformedMessage(RejectionReason.unknown_task, f"{name!r} is not a task of this process")
    try:
        model.model_validate(_keyword_arguments(body))
    except ValidationError as error:
        raise MalformedMessage(RejectionReason.arguments, _errors(error)) from None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def rejected_message(message: Message, reason: RejectionReason, detail: str, hostname: str) -> RejectedMessage:
    """What the dead-letter row of `message` holds."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    return RejectedMessage(
        # The routing key: on every route the pipeline declares (the default exchange, or a
        # queue's own direct exchange), it is the queue's name.
        queue=_text((message.delivery_info or {}).get("routing_key")) or "",
        message_id=_text(headers.get("id")) or _text((message.properties or {}).get("correlation_id")),
        task=_text(headers.get("task")),
        reason=reason,
        # One line, whatever the sender put in a content type.
        detail=" ".join(detail.split()),
        content_type=_text(message.content_type),
        body=message.body or "",
        hostname=hostname,
    )


class GuardedConsumer(Consumer):
    """Celery's consumer, refusing a malformed message (see the module docstring)."""

    @cached_property
    def dead_letter_engine(self) -> Engine:
        return dead_letters.make_engine(runtime.service_urls().database_url)

    def create_task_handler(self, promise: Any = promise) -> Callable[[Message], None]:
        take = super().create_task_handler(promise)

        def on_task_received(message: Message) -> None:
            try:
                check_message(message, self.app.tasks)
            except MalformedMessage as malformed:
                self.refuse(message, malformed.reason, malformed.detail)
                return
            take(message)

        return on_task_received

    def on_invalid_task(self, body: object, message: Message, exc: Exception) -> None:
        """Celery found the message invalid while taking it (e.g. an ETA that is no date)."""
        self.refuse(message, RejectionReason.invalid, str(exc))

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        """kombu could not read the message (e.g. its declared compression fails)."""
        self.refuse(message, RejectionReason.undecodable, f"the body does not decode: {exc!r}")

    def refuse(self, message: Message, reason: RejectionReason, detail: str) -> None:
        """Dead-letter `message`, log it in one line, and acknowledge it.

        A ledger that cannot take the row does not keep the message: it cannot become valid,
        and requeued it would come straight back (Redis restores it to the head of its queue)
        and hold the queue for as long as PostgreSQL is down. The error line then carries
        the row's content instead, body included.
        """
        rejected = rejected_message(message, reason, detail, self.hostname or "")
        try:
            dead_letters.record(self.dead_letter_engine, rejected)
            outcome = "dead-lettered"
        except SQLAlchemyError as error:
            outcome = f"NOT recorded in dead_letters ({getattr(error, 'orig', None) or error}); body {rejected.body!r}"
        log.error(
            "refused message %r on queue %r (task %r): %s: %s; %s",
            rejected.message_id,
            rejected.queue,
            rejected.task,
            reason,
            rejected.detail,
            " ".join(outcome.split()),
        )
        message.ack()

"""The Python client: submit batches (`Client.submit`), find them again, reach the roll-outs;
each batch is a `pipeline.batch_handle.BatchHandle` to watch and read.

client = Client()
batch = client.submit("digits", inputs, idempotency_key="run-42")
status = batch.wait(timeout=600, progress=True)
for item in batch.results(): ...

One `Client` may be shared by every thread of a process (a web service's request
threads): its engine and broker producers come from thread-safe pools, and one
listening connection wakes each waiting thread on its own batch's notification.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from pipeline import ledger
from pipeline.batch_handle import BatchHandle
from pipeline.embedded import ensure_services
from pipeline.errors import BatchNotFoundError, InvalidArgumentError, validation_line
from pipeline.ledger.connection import autocommit, driver_connection
from pipeline.listener import BatchListener
from pipeline.schema import FailurePolicy, Priority
from pipeline.settings import Settings, get_settings
from pipeline.status import BatchStatus as BatchStatus
from pipeline.status import newest_batches

if TYPE_CHECKING:
    from celery import Celery

    from pipeline.client_split import ServingReads
    from pipeline.definition import InputPage
    from pipeline.rollouts import Rollouts

# The broker (Celery), the splitter and the input encoder are imported by the methods that
# publish or store: a command that only reads the ledger (`pipeline status ID`) loads none of them.

# The longest deadline a batch may have: a year (a longer one is a mistake, and 1e13 s
# overflows PostgreSQL's timestamps).
MAX_DEADLINE_S = 365 * 24 * 3600.0


class SubmitOptions(BaseModel):
    """A submission's options, checked before anything is written."""

    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    failure_policy: FailurePolicy = FailurePolicy.best_effort
    max_failed_fraction: float | None = Field(default=None, gt=0, le=1)
    deadline_s: float | None = Field(default=None, gt=0, le=MAX_DEADLINE_S)
    # None: by size (`Settings.is_small_batch`: interactive).
    priority: Literal["interactive", "bulk"] | None = None


class Client:
    """Entry point of the Python API; a context manager that closes it on exit.

    `settings`: default from the `PIPELINE_*` environment. A service without a URL
    is the embedded one, started (or reused) here; nothing else connects before the
    first call that needs it. `close()` releases the connections.

    Raises:
        EmbeddedServiceError: an embedded service could not be started.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        urls = ensure_services(self.settings.database_url, self.settings.broker_url, self.settings.data_dir)
        self.database_url = urls.database_url
        self.engine = ledger.make_engine(urls.database_url)
        self.broker_url = urls.broker_url
        self._app: Celery | None = None
        self._app_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        # Wakes the threads waiting on a batch; its thread and connection start with the first wait.
        self.listener = BatchListener(urls.database_url)
        # What small batches' splits pin, read once for several (`client_split.SERVING_REUSE_S`).
        self._servings: ServingReads | None = None

    def publisher(self) -> Celery:
        """The broker app to publish with. Celery creates its connection and producer pools
        lazily and unguarded: here they are created once, under a lock, before the first
        publish, so two threads never create one each. (Not in `__init__`: importing the
        broker's transport costs a command that only reads the ledger most of a second.)"""
        if self._app is None:
            with self._app_lock:
                if self._app is None:
                    from pipeline import broker

                    app = broker.client_app(self.broker_url, self.settings)
                    app.amqp.producer_pool  # noqa: B018  (creates both pools; nothing connects)
                    self._app = app
        return self._app

    def servings(self) -> ServingReads:
        """The client's reads of what small batches' splits pin, shared by its threads (made on
        first use: the client split's module imports the broker's)."""
        if self._servings is None:
            with self._app_lock:
                if self._servings is None:
                    from pipeline.client_split import ServingReads

                    self._servings = ServingReads()
        return self._servings

    @contextmanager
    def publishing(self) -> Iterator[Celery]:
        """The broker app, held by this thread while the block publishes: publishes through
        one client are serialized. Threads sharing a client through a Redis restart otherwise
        met a channel whose connection kombu had closed meanwhile (an AttributeError out of
        kombu, seen by the chaos soak)."""
        app = self.publisher()
        with self._publish_lock:
            yield app

    @property
    def rollouts(self) -> Rollouts:
        """Roll-outs of challenger model versions (`pipeline.rollouts.Rollouts`; the gate's
        scipy is imported on first use)."""
        from pipeline.rollouts import Rollouts

        return Rollouts(self)

    @property
    def app(self) -> Celery:
        """The broker app (`publisher()`)."""
        return self.publisher()

    def submit(
        self,
        pipeline: str,
        inputs: Iterable[Any],
        *,
        idempotency_key: str | None = None,
        failure_policy: FailurePolicy | str = FailurePolicy.best_effort,
        max_failed_fraction: float | None = None,
        deadline_s: float | None = None,
        priority: Priority | str | None = None,
    ) -> BatchHandle:
        """Validate every input, store the batch and queue its split; return its handle at once.

        `inputs`: an iterable of items shaped like the pipeline's input model (dicts or
        pydantic objects; a generator is read once, a page at a time, so memory does not
        grow with the batch), or for a feature-vector pipeline a 2-D array or a DataFrame.
        The same `idempotency_key` again returns the first batch and stores nothing.
        `failure_policy`: `best_effort` finishes as `partial` with every result it
        could produce; `fail_fast` fails the batch at the first failed sub-task and
        cancels the rest. `max_failed_fraction` (0..1] aborts a best-effort batch once
        more than that share of its sub-tasks failed. Past `deadline_s` seconds (at most
        a year) the batch is finished with what it has. `priority`: `interactive` sub-tasks are claimed
        by workers before `bulk` ones, bulk batches share the workers round-robin; default
        by size, interactive up to `PIPELINE_SMALL_BATCH_ITEMS` inputs.

        Raises:
            UnknownPipelineError: no pipeline is registered as `pipeline`.
            InvalidInputError: some inputs are invalid or too large, or there are too
                many, or `inputs` is not a collection of items; nothing was stored or queued.
            InvalidArgumentError: an option is out of range.
            SettingsError: `PIPELINE_CHUNK_SIZES` names a model no pipeline has.
            IdempotencyKeyError: `idempotency_key` already names a batch of another
                pipeline, or of other inputs or options.
            kombu.exceptions.OperationalError: the broker is unreachable; the batch
                is stored, and the aggregator's sweeper queues its split later.
            sqlalchemy.exc.OperationalError: the ledger is unreachable (restarting, or the
                connection was cut); the batch may have been stored. Submitting again with
                the same `idempotency_key` stores it once and returns it.
        """
        from pipeline import broker, registry
        from pipeline.client_split import ClientSplit
        from pipeline.inputs import iter_input_pages, read_ahead
        from pipeline.splitter import SPLIT_ERRORS, SplitStep, publish_step

        try:
            options = SubmitOptions(
                idempotency_key=idempotency_key,
                failure_policy=failure_policy,
                max_failed_fraction=max_failed_fraction,
                deadline_s=deadline_s,
                priority=priority,
            )
        except ValidationError as error:
            raise InvalidArgumentError(validation_line(error)) from None
        definition = registry.get_pipeline(pipeline)
        registry.check_chunk_sizes(self.settings.chunk_sizes)
        # JSON items are split as they are validated (see `split` below).
        json_items = not definition.feature_names
        pages = iter_input_pages(
            definition, inputs, self.settings.max_batch_items, self.settings.max_item_bytes, split=json_items
        )
        head, small = self._head_pages(pages)
        priority_of_batch = Priority(options.priority or ("interactive" if small else "bulk"))
        # Split here, as the pages are stored, in the transaction that stores them: a small
        # batch (no split message, no second commit before its sub-tasks are published),
        # and any batch of JSON items, split from the objects just validated (the
        # aggregator's split would validate every item again). A big batch of packed
        # features is split by the aggregator, in steps its workers start on at once.
        split = (
            ClientSplit(self.settings, pipeline, priority_of_batch, small, self.servings())
            if small or json_items
            else None
        )
        request = (
            options.idempotency_key,
            options.failure_policy,
            options.max_failed_fraction,
            options.deadline_s,
            priority_of_batch,
        )
        # A new batch's handle, watched from before the batch is stored when this client listens
        # already: its first `wait` reads nothing until the batch finishes. Dropped (and its
        # watch released) when the batch is not stored or an idempotency key names another.
        new_id = uuid.uuid4()
        handle = BatchHandle(self, new_id, self.listener.watch(str(new_id)))
        step: SplitStep | None = None
        stored = None
        if small:
            assert split is not None, "a small batch is split by its client"
            # Split first, then stored in one statement: from the client's latest read of what
            # the split pins, then, if a champion or roll-out changed since, from a fresh one.
            # Inputs the pipeline cannot split are stored below, and the batch fails with the
            # reason; so is a batch whose pins changed again (the storing transaction reads
            # them as it splits).
            with suppress(*SPLIT_ERRORS), autocommit(self.engine) as conn:
                for fresh in (False, True):
                    whole = partial(split.whole, conn, fresh=fresh)
                    stored = ledger.store_split_batch(conn, pipeline, head, *request, split=whole, batch_id=new_id)
                    if stored is not None:
                        break
        if stored is not None:
            batch_id, created = stored.batch_id, stored.created
            step = SplitStep(stored.published, True, stored.aggregate)
        else:
            # The rest of the pages are validated as they are stored: a bad one raises and the
            # transaction stores nothing.
            with self.engine.begin() as conn:
                batch_id, created = ledger.insert_batch(
                    conn,
                    pipeline,
                    # A small batch's pages are all in hand (a list: its row is inserted whole); a
                    # big batch's next page is validated while PostgreSQL writes the current one.
                    head if small else itertools.chain(head, read_ahead(pages)),
                    *request,
                    stored=None if split is None else split.page_stored,
                    batch_id=new_id,
                )
                step = split.finish(conn, batch_id) if created and split is not None else None
        if created:
            with self.publishing() as app:
                if split is None:
                    broker.publish_split(app, str(batch_id))
                elif step is not None:
                    # A big batch is followed by an aggregator; a small one is aggregated by
                    # the worker finishing it.
                    publish_step(app, batch_id, step, follow=not small)
        return handle if batch_id == new_id else BatchHandle(self, batch_id)

    def _head_pages(self, pages: Iterator[InputPage]) -> tuple[list[InputPage], bool]:
        """The first pages of a batch, read until they hold more inputs than a small batch
        may (`PIPELINE_SMALL_BATCH_ITEMS`) or are all of them; and whether the batch is small."""
        head, count = [], 0
        for page in pages:
            head.append(page)
            count += page.count
            if not self.settings.is_small_batch(count):
                return head, False
        return head, True

    def batch(self, batch_id: str | uuid.UUID) -> BatchHandle:
        """Return a handle on the existing batch `batch_id` (a UUID or its string).

        Raises:
            BatchNotFoundError: `batch_id` is not a UUID, or no batch has it.
        """
        try:
            handle = BatchHandle(self, uuid.UUID(str(batch_id)))
        except ValueError:
            raise BatchNotFoundError(f"{batch_id!r} is not a batch id (a UUID)") from None
        handle.status()
        return handle

    def batches(self, state: str | None = None, limit: int = 50) -> list[BatchStatus]:
        """Return the statuses of the newest `limit` batches (1 .. 10,000), newest first,
        optionally only those in `state` (`pipeline.status.newest_batches`).

        Raises:
            InvalidArgumentError: `state` is not a batch state, or `limit` is out of range.
        """
        with autocommit(self.engine) as conn:
            return newest_batches(driver_connection(conn), state, limit)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release database and broker connections and the listening connection."""
        self.listener.close()
        self.engine.dispose()
        if self._app is not None:
            self._app.close()

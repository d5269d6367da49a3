"""The Python client: submit batches, watch them, read their results.

client = Client()
batch = client.submit("digits", inputs, idempotency_key="run-42")
status = batch.wait(timeout=600, progress=True)
for item in batch.results(): ...
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, Literal

import psycopg
from pydantic import BaseModel, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline import broker, ledger, registry
from pipeline.embedded import ensure_services
from pipeline.errors import BatchNotFoundError
from pipeline.inputs import encode_inputs
from pipeline.schema import FINISHED_BATCH_STATES, BatchState, FailurePolicy, Priority
from pipeline.settings import Settings, get_settings, libpq_url
from pipeline.splitter import first_split_step, run_split


class SubmitOptions(BaseModel):
    """A submission's options, checked before anything is written."""

    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    failure_policy: FailurePolicy = FailurePolicy.best_effort
    max_failed_fraction: float | None = Field(default=None, gt=0, le=1)
    deadline_s: float | None = Field(default=None, gt=0)
    # None: by size (`Settings.is_small_batch`: interactive).
    priority: Literal["interactive", "bulk"] | None = None


class BatchStatus(BaseModel):
    """One row of the `batch_status` view, with the batch's result and metrics."""

    id: uuid.UUID
    pipeline: str
    state: BatchState
    priority: Priority
    items: int
    total: int
    succeeded: int
    failed: int
    cancelled: int
    remaining: int
    progress: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    wait_s: float | None
    aggregation_s: float | None
    elapsed_s: float | None
    error: str | None
    result: dict[str, Any] | None
    metrics: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        """True once the batch is `succeeded`, `partial`, `failed` or `cancelled`."""
        return self.state in FINISHED_BATCH_STATES


class ItemResult(BaseModel):
    """One input's result: `output` when it has one, else the `error` saying why not."""

    item: int
    output: dict[str, Any] | None
    error: str | None


class BatchHandle:
    """A submitted batch, as `Client.submit` and `Client.batch` return it; every method
    reads or changes the ledger through its client."""

    def __init__(self, client: Client, batch_id: uuid.UUID) -> None:
        self._client = client
        self._uuid = batch_id

    @property
    def id(self) -> str:
        """The batch id, a UUID as a string."""
        return str(self._uuid)

    def __repr__(self) -> str:
        return f"BatchHandle({self.id!r})"

    def status(self) -> BatchStatus:
        """Return the batch's current row of `batch_status` (counters, not a count of
        sub-tasks), with its result and metrics once it has finished.

        Raises:
            BatchNotFoundError: the batch is not in the ledger.
        """
        row = ledger.batch_status_row(self._client.engine, self._uuid)
        if row is None:
            raise BatchNotFoundError(f"no batch {self.id}")
        return BatchStatus.model_validate(row)

    def wait(self, timeout: float | None = None, progress: bool = False) -> BatchStatus:
        """Block until the batch is finished; return its final status.

        `timeout`: seconds to wait at most (None: no limit). `progress`: draw a
        progress bar of the batch's sub-tasks on the terminal while waiting.
        Woken by the aggregator's NOTIFY; re-reads the status at least every few
        seconds in case a notification was missed.

        Raises:
            TimeoutError: not finished within `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _ProgressBar(self.id) if progress else None
        try:
            while True:
                # LISTEN before reading the status, so a finish in between still wakes us.
                listener = self._client.listener()
                status = self.status()
                if bar is not None:
                    bar.update(status)
                if status.finished:
                    return status
                pause = 0.25 if bar is not None else 5.0
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(
                            f"batch {self.id} not finished after {timeout} s: {status.state.value},"
                            f" {status.progress:.0%} of {status.total} sub-tasks done"
                        )
                    pause = min(pause, left)
                try:
                    for _ in listener.notifies(timeout=pause, stop_after=1):
                        pass
                except psycopg.OperationalError:
                    self._client.drop_listener()  # reconnected on the next turn
        finally:
            if bar is not None:
                bar.close()

    def results(self) -> Iterator[ItemResult]:
        """Yield one `ItemResult` per input, in input order, streamed page by page
        (constant memory). Yields nothing before the batch has finished: results are
        written when it is aggregated."""
        for row in ledger.iter_results(self._client.engine, self._uuid):
            yield ItemResult(item=row.item, output=row.output, error=row.error)

    def cancel(self) -> BatchStatus:
        """Cancel the batch if it is still pending or running; return its status.

        Sub-tasks not yet running are skipped; running ones finish, and every result
        produced stays readable through `results()` once they have. A finished batch
        is left as it is.

        Raises:
            BatchNotFoundError: the batch is not in the ledger.
        """
        outcome = ledger.cancel_batch(self._client.engine, self._uuid)
        if outcome.aggregate:
            broker.publish_aggregate(self._client.app, self.id)
        return self.status()


class _ProgressBar:
    def __init__(self, batch_id: str) -> None:
        self._progress = Progress(
            TextColumn(f"batch {batch_id[:8]}"),
            TextColumn("{task.fields[state]:<11}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("sub-tasks"),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task("batch", total=None, state="pending")
        self._progress.start()

    def update(self, status: BatchStatus) -> None:
        done = status.succeeded + status.failed + status.cancelled
        self._progress.update(self._task, total=status.total or None, completed=done, state=status.state.value)

    def close(self) -> None:
        self._progress.stop()


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
        self.app = broker.client_app(urls.broker_url, self.settings)
        self._listener: psycopg.Connection[Any] | None = None

    def listener(self) -> psycopg.Connection[Any]:
        """The client's connection listening for `batch_finished` notifications, opened on
        first use and kept, so waiting on many small batches costs no connection each."""
        if self._listener is None or self._listener.closed:
            self._listener = psycopg.connect(libpq_url(self.database_url), autocommit=True)
            self._listener.execute(f"LISTEN {ledger.NOTIFY_CHANNEL}")
        return self._listener

    def drop_listener(self) -> None:
        """Close the listening connection (e.g. after it broke); the next wait opens another."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None

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

        `inputs`: items shaped like the pipeline's input model (dicts or pydantic
        objects), or for a feature-vector pipeline a 2-D array or a DataFrame.
        The same `idempotency_key` again returns the first batch and stores nothing.
        `failure_policy`: `best_effort` finishes as `partial` with every result it
        could produce; `fail_fast` fails the batch at the first failed sub-task and
        cancels the rest. `max_failed_fraction` (0..1] aborts a best-effort batch once
        more than that share of its sub-tasks failed. Past `deadline_s` seconds the
        batch is finished with what it has. `priority`: `interactive` sub-tasks are claimed
        by workers before `bulk` ones, bulk batches share the workers round-robin; default
        by size, interactive up to `PIPELINE_SMALL_BATCH_ITEMS` inputs.

        Raises:
            UnknownPipelineError: no pipeline is registered as `pipeline`.
            InvalidInputError: some inputs are invalid or too large, or there are too
                many; nothing was stored or queued.
            ValueError: an option is out of range (pydantic's ValidationError).
            IdempotencyKeyError: `idempotency_key` already names a batch of another pipeline.
            kombu.exceptions.OperationalError: the broker is unreachable; the batch
                is stored, and the aggregator's sweeper queues its split later.
        """
        options = SubmitOptions(
            idempotency_key=idempotency_key,
            failure_policy=failure_policy,
            max_failed_fraction=max_failed_fraction,
            deadline_s=deadline_s,
            priority=priority,
        )
        pages = encode_inputs(
            registry.get_pipeline(pipeline), inputs, self.settings.max_batch_items, self.settings.max_item_bytes
        )
        small = self.settings.is_small_batch(sum(page.count for page in pages))
        priority_of_batch = Priority(options.priority or ("interactive" if small else "bulk"))
        with self.engine.begin() as conn:
            batch_id, created = ledger.insert_batch(
                conn,
                pipeline,
                pages,
                options.idempotency_key,
                options.failure_policy,
                options.max_failed_fraction,
                options.deadline_s,
                priority_of_batch,
            )
            # A small batch is split here, in the transaction that stores it: no split
            # message and no second commit before its sub-tasks are published.
            first_step = first_split_step(conn, self.settings, batch_id) if created and small else None
        if created:
            if small:
                run_split(self.engine, self.settings, batch_id, self.app, first_step)
            else:
                broker.publish_split(self.app, str(batch_id))
        return BatchHandle(self, batch_id)

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
        """Return the statuses of the newest `limit` batches, newest first, optionally
        only those in `state`.

        Raises:
            ValueError: `state` is not a batch state.
        """
        if state is not None:
            BatchState(state)
        return [BatchStatus.model_validate(row) for row in ledger.batch_status_rows(self.engine, state, limit)]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release database and broker connections and the listening connection."""
        self.drop_listener()
        self.engine.dispose()
        self.app.close()

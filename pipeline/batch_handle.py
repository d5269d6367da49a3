"""A submitted batch as its client sees it: `BatchHandle` (status, wait, results, labels,
cancel) and `ItemResult`, one input's result.

batch = client.submit("digits", inputs)
status = batch.wait(timeout=600, progress=True)
for item in batch.results(): ...

Every method reads or changes the ledger through the handle's `Client`; a waiting thread is
woken by the client's one listening connection (`pipeline.listener`).
"""

from __future__ import annotations

import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from pipeline import ledger
from pipeline.errors import BatchNotFoundError, UnknownPipelineError
from pipeline.schema import BatchState
from pipeline.status import BatchStatus

if TYPE_CHECKING:
    from pipeline.client import Client

# How often a progress bar reads the batch's status.
PROGRESS_REFRESH_S = 0.25


class ItemResult(BaseModel):
    """One input's result: `output` when it has one, else the `error` saying why not;
    `model_versions`: per model, the version (artifact SHA-256) that scored the input's rows
    (a canary's challenger for the inputs it serves; a model that scored none of them, its
    sub-task failed or cancelled, is absent)."""

    item: int
    output: dict[str, Any] | None
    error: str | None
    model_versions: dict[str, str]


class BatchHandle:
    """A submitted batch, as `Client.submit` and `Client.batch` return it; every method
    reads or changes the ledger through its client."""

    def __init__(self, client: Client, batch_id: uuid.UUID, watched: threading.Event | None = None) -> None:
        self._client = client
        self._uuid = batch_id
        # The first result page, read by the `wait` that saw the batch finished (results
        # never change once they are ready).
        self._results_ahead: ledger.ResultsPage | None = None
        # The listener's event for the batch, registered by `submit` before the batch was
        # stored (`BatchListener.watch`): its first `wait` takes it, and reads nothing until
        # it is set. Released with the handle if no `wait` took it.
        self._watched = watched
        self._watched_lock = threading.Lock()
        if watched is not None:
            weakref.finalize(self, client.listener.unwatch, self.id, watched)

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

    def _status_reading_ahead(self) -> BatchStatus:
        """`status()`; once the batch is finished, a small one's (at most
        `PIPELINE_SMALL_BATCH_ITEMS` inputs) first result page comes in the same read, for
        `results()`."""
        row, ahead = ledger.batch_status_read_ahead(
            self._client.engine, self._uuid, self._client.settings.small_batch_items
        )
        if row is None:
            raise BatchNotFoundError(f"no batch {self.id}")
        if ahead is not None:
            self._results_ahead = ahead
        return BatchStatus.model_validate(row)

    def wait(self, timeout: float | None = None, progress: bool = False) -> BatchStatus:
        """Block until the batch is finished and every input's result is readable through
        `results()`, whatever its final state; return its final status.

        `timeout`: seconds to wait at most (None: no limit). `progress`: draw a progress
        bar of the batch's sub-tasks on the terminal while waiting, which also names the
        queues the batch waits on that no worker serves. Woken by the `batch_finished`
        NOTIFY of its batch (the client's one listening connection, shared by every
        thread); re-reads the status every `PIPELINE_WAIT_REREAD_S` as a safety net.
        Safe to call from several threads at once.

        Raises:
            TimeoutError: not finished within `timeout` seconds (e.g. a cancelled batch
                whose results no aggregator assembles).
            BatchNotFoundError: the batch is not in the ledger.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        if progress:
            from pipeline.progress import ProgressBar

            bar = ProgressBar(self)
        reread_s = PROGRESS_REFRESH_S if bar is not None else self._client.settings.wait_reread_s
        with self._watched_lock:
            watched, self._watched = self._watched, None

        def pause() -> float:
            """Until the next read: the re-read's interval, or what is left before the deadline."""
            return reread_s if deadline is None else min(reread_s, max(0.0, deadline - time.monotonic()))

        try:
            # Subscribed before the status is read, so a finish right after the read still wakes us.
            with self._client.listener.subscription(self.id, watched) as woken:
                if watched is not None and bar is None:
                    # Watched since before the batch was stored: nothing finished unseen, so
                    # the first read waits for the wake-up (or the re-read's safety net).
                    woken.wait(pause())
                while True:
                    woken.clear()
                    status = self._status_reading_ahead()
                    if bar is not None:
                        bar.update(status)
                    if status.finished:
                        return status
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"batch {self.id} not finished after {timeout} s: {_unfinished(status)}")
                    woken.wait(pause())
        finally:
            if bar is not None:
                bar.close()

    def unserved_queues(self, status: BatchStatus | None = None) -> list[str]:
        """The queues this unfinished batch waits on that no live worker (or aggregator)
        consumes, by their heartbeats in the ledger: e.g. `["model.digit-ood"]`. Empty once
        the batch is finished. `status`: the batch's status when just read (else read here).

        A `pending` batch waits on `split` and its models' queues (the client splits a small
        batch and a batch of JSON items as it stores them: committed, they are `running`); a
        `running` one on its models' queues; an `aggregating` or cancelled one on `aggregate`.

        Raises:
            BatchNotFoundError: the batch is not in the ledger.
        """
        status = status or self.status()
        if status.finished:
            return []
        from pipeline import broker, heartbeat, registry

        settings = self._client.settings
        try:
            models = [broker.model_queue(spec.name) for spec in registry.get_pipeline(status.pipeline).models]
        except UnknownPipelineError:
            models = []  # a pipeline this client does not know: its models' queues are unknown too
        queues = {
            BatchState.pending: [broker.SPLIT_QUEUE, *models],
            BatchState.running: models,
        }.get(status.state, [broker.AGGREGATE_QUEUE])
        return heartbeat.unserved_queues(self._client.engine, settings, queues)

    def results(self) -> Iterator[ItemResult]:
        """Yield one `ItemResult` per input, in input order, streamed page by page
        (constant memory). Yields nothing before the batch has finished: results are
        written when it is aggregated."""
        for row in ledger.iter_results(self._client.engine, self._uuid, self._results_ahead):
            yield ItemResult(item=row.item, output=row.output, error=row.error, model_versions=row.model_versions)

    def add_labels(self, labels: Mapping[int, Any]) -> ledger.StoredLabels:
        """Store ground truth that arrived after the batch: `{input index: label}`, each label
        of the pipeline's `label_type`. All or nothing; the same label again changes nothing,
        another label for a labelled input replaces it (the old one is kept as history). The
        batch's realised KPIs (`metrics.realised`) are recomputed from its stored results:
        no model runs; so is the gate of each active roll-out the batch follows. Returns what
        was added, changed and unchanged, and the realised figures.

        Raises:
            BatchNotFoundError: the batch is not in the ledger.
            InvalidLabelError: the batch has not finished, its pipeline takes no labels, or
                an index is out of range or a label of the wrong type; nothing was stored.
        """
        from pipeline.rollouts import evaluate_batch

        stored = ledger.store_labels(self._client.engine, self._uuid, labels.items())
        evaluate_batch(self._client.engine, self._uuid, "after labels for batch")
        return stored

    def cancel(self) -> BatchStatus:
        """Cancel the batch if it is still pending or running; return its status.

        Sub-tasks not yet running are skipped; running ones finish, and every result
        produced stays readable through `results()` once they have. The batch is
        `cancelled` at once; `wait()` returns once its results are written. A finished
        batch is left as it is.

        Raises:
            BatchNotFoundError: the batch is not in the ledger.
        """
        from pipeline import broker

        outcome = ledger.cancel_batch(self._client.engine, self._uuid)
        if outcome.aggregate:
            with self._client.publishing() as app:
                broker.publish_aggregate(app, self.id)
        return self.status()


def _unfinished(status: BatchStatus) -> str:
    """What an unfinished batch is doing, for a timeout's message."""
    if status.state.finished:
        return f"{status.state.value}, its results not yet assembled"
    return f"{status.state.value}, {status.progress:.0%} of {status.total} sub-tasks done"

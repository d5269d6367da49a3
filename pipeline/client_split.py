"""The client's split of a batch it stores: a small batch's whole split before anything is
stored (`ClientSplit.whole`, then `ledger.store_split_batch`), or a batch of JSON items
split page by page on its storing transaction (`ClientSplit.page_stored`, `finish`)."""

from __future__ import annotations

import uuid

from sqlalchemy import Connection

from pipeline import broker, heartbeat, ledger, registry
from pipeline.batch_splitter import BatchSplitter, NewBatch
from pipeline.definition import InputPage, Pipeline
from pipeline.schema import BatchState, Priority
from pipeline.settings import Settings
from pipeline.splitter import SPLIT_ERRORS, SplitStep, fail_split


class ClientSplit:
    """The split a client makes of a new batch, from the objects it validated (reading the
    pages back would validate every input again). A small batch is split whole before
    anything is stored (`whole`, for `ledger.store_split_batch`). A batch of JSON items (or
    a small one the pipeline cannot split) is split on its storing transaction
    (`ledger.insert_batch`'s `stored`): each page once written, its full chunks written at
    once; `finish` writes the rest and counts the split. Either way the batch is committed
    `running` with every sub-task, and its messages go once it is committed.
    """

    def __init__(self, settings: Settings, pipeline: str, priority: Priority, small: bool) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._priority = priority
        # A small batch's sub-tasks ride on each other's messages (`ledger.riders`).
        self._small = small
        self._splitter: BatchSplitter | None = None
        self._published: list[ledger.Dispatch] = []
        self._error: Exception | None = None

    def _new_splitter(self, conn: Connection, batch_id: uuid.UUID) -> BatchSplitter:
        pipeline = registry.get_pipeline(self._pipeline)
        settings = self._settings
        ride = ride_query(settings, pipeline) if self._small else None
        batch = NewBatch(batch_id, self._pipeline, self._priority)
        return BatchSplitter(conn, batch, pipeline, settings.chunk_sizes, settings.bulk_chunk_ms, ride)

    def whole(self, conn: Connection, batch_id: uuid.UUID, pages: list[InputPage]) -> ledger.WholeSplit:
        """The whole split of a small batch's `pages`, read on `conn` before anything is
        stored (`ledger.store_split_batch`).

        Raises:
            SplitError, NoChampionError: the pipeline cannot split the inputs.
        """
        splitter = self._new_splitter(conn, batch_id)
        for page in pages:
            splitter.add(page)
        subtasks = splitter.take(final=True)
        return ledger.WholeSplit(subtasks, splitter.serving, splitter.versions, splitter.riding, splitter.followed)

    def page_stored(self, conn: Connection, batch_id: uuid.UUID, page: InputPage) -> None:
        """A `ledger.PageStored`: split the page just written and write its full chunks. Once
        the pipeline cannot split a page, the rest are only stored (the batch fails at `finish`)."""
        if self._error is not None:
            return
        try:
            if self._splitter is None:
                self._splitter = self._new_splitter(conn, batch_id)
            self._splitter.add(page)
        except SPLIT_ERRORS as error:
            self._error = error
            return
        full = self._splitter.take()
        if full:  # most pages of a small batch fill no chunk: no COPY round trip for nothing
            self._published += ledger.copy_subtasks(conn, batch_id, full, self._splitter.riding)

    def finish(self, conn: Connection, batch_id: uuid.UUID) -> SplitStep | None:
        """Write the last chunks and count the split: the batch becomes `running`, or
        `aggregating` when it has no sub-task. Returns None when the pipeline could not split
        the inputs: the batch is then `failed` with the reason (the sub-tasks written for its
        first pages counted, then cancelled), and nothing is to be published."""
        splitter = self._splitter
        assert splitter is not None, "a new batch has a page"
        split = self._error is None
        last = splitter.take(final=True) if split else []
        state = ledger.record_split(conn, batch_id, 0, splitter.split_items, splitter.serving, split, splitter.versions)
        assert state is not None, "a batch being stored is pending, and its client alone sees it"
        if not split:
            assert self._error is not None
            fail_split(conn, batch_id, self._error)
            return None
        published = self._published + ledger.copy_subtasks(conn, batch_id, last, splitter.riding)
        splitter.record_rollouts(conn)
        return SplitStep(published, True, state == BatchState.aggregating)


def ride_query(settings: Settings, pipeline: Pipeline) -> ledger.RideQuery:
    """What a small batch of `pipeline` asks the ledger to ride (`ledger.RideQuery`): its
    models' queues as the broker names them, and the age up to which a heartbeat counts."""
    queues = {spec.name: heartbeat.queue_key(settings, broker.model_queue(spec.name)) for spec in pipeline.models}
    return ledger.RideQuery(queues, heartbeat.max_beat_age_s(settings))

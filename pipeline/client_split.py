"""The client's split of a batch it stores: a small batch's whole split before anything is
stored (`ClientSplit.whole`, then `ledger.store_split_batch`), or a batch of JSON items
split page by page on its storing transaction (`ClientSplit.page_stored`, `finish`)."""

from __future__ import annotations

import threading
import time
import uuid

from sqlalchemy import Connection

from pipeline import broker, heartbeat, ledger, registry
from pipeline.batch_splitter import BatchSplitter, NewBatch
from pipeline.definition import InputPage, Pipeline
from pipeline.ledger import rollouts as rollout_rows
from pipeline.schema import BatchState, Priority
from pipeline.settings import Settings
from pipeline.splitter import SPLIT_ERRORS, SplitStep, fail_split

# How long a client reuses its read of what a small batch's split pins (`serving_of`: one
# round trip before every small batch's store). The statement storing the batch checks
# that its champions and roll-outs are still those (`ledger.store_split_batch`); who
# consumes each queue comes from heartbeats `heartbeat.max_beat_age_s` old at most, so a
# read a second older changes which sub-tasks ride at most as a missed beat does.
SERVING_REUSE_S = 1.0


class ServingReads:
    """A client's latest read of `serving_of` for small batches, per pipeline, reused for
    `SERVING_REUSE_S` (threads sharing the client share it)."""

    def __init__(self) -> None:
        self._reads: dict[str, tuple[float, rollout_rows.Serving]] = {}
        self._lock = threading.Lock()

    def serving(self, conn: Connection, settings: Settings, pipeline: Pipeline, fresh: bool) -> rollout_rows.Serving:
        """What a small batch of `pipeline` pins and who consumes its models' queues: the
        latest read when it is recent enough and not `fresh`, else read now on `conn`."""
        now = time.monotonic()
        with self._lock:
            held = self._reads.get(pipeline.name)
        if not fresh and held is not None and now - held[0] < SERVING_REUSE_S:
            return held[1]
        names = [spec.name for spec in pipeline.models]
        serving = rollout_rows.serving_of(conn, names, ride_query(settings, pipeline))
        with self._lock:
            self._reads[pipeline.name] = (now, serving)
        return serving


class ClientSplit:
    """The split a client makes of a new batch, from the objects it validated (reading the
    pages back would validate every input again). A small batch is split whole before
    anything is stored (`whole`, for `ledger.store_split_batch`). A batch of JSON items (or
    a small one the pipeline cannot split) is split on its storing transaction
    (`ledger.insert_batch`'s `stored`): each page once written, its full chunks written at
    once; `finish` writes the rest and counts the split. Either way the batch is committed
    `running` with every sub-task, and its messages go once it is committed.
    """

    def __init__(
        self, settings: Settings, pipeline: str, priority: Priority, small: bool, servings: ServingReads | None = None
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._priority = priority
        # A small batch's sub-tasks ride on each other's messages (`ledger.riders`); its split
        # reads what it pins through the client's `servings`.
        self._small = small
        self._servings = servings or ServingReads()
        self._splitter: BatchSplitter | None = None
        self._published: list[ledger.Dispatch] = []
        self._error: Exception | None = None

    def _new_splitter(
        self, conn: Connection, batch_id: uuid.UUID, serving: rollout_rows.Serving | None
    ) -> BatchSplitter:
        pipeline = registry.get_pipeline(self._pipeline)
        settings = self._settings
        batch = NewBatch(batch_id, self._pipeline, self._priority)
        return BatchSplitter(conn, batch, pipeline, settings.chunk_sizes, settings.bulk_chunk_ms, serving)

    def _serving(self, conn: Connection, fresh: bool) -> rollout_rows.Serving | None:
        """A small batch's read of what it pins (`ServingReads`); None for a big one (its
        splitter reads it without the consumers)."""
        if not self._small:
            return None
        return self._servings.serving(conn, self._settings, registry.get_pipeline(self._pipeline), fresh)

    def whole(
        self, conn: Connection, batch_id: uuid.UUID, pages: list[InputPage], fresh: bool = False
    ) -> ledger.WholeSplit:
        """The whole split of a small batch's `pages`, before anything is stored
        (`ledger.store_split_batch`): from the client's latest read of what it pins
        (`ServingReads`; read now on `conn` when it is old, or when `fresh`).

        Raises:
            SplitError, NoChampionError: the pipeline cannot split the inputs.
        """
        serving = self._serving(conn, fresh)
        assert serving is not None, "a whole split is a small batch's"
        splitter = self._new_splitter(conn, batch_id, serving)
        for page in pages:
            splitter.add(page)
        subtasks = splitter.take(final=True)
        pins = serving.pins([spec.name for spec in splitter.pipeline.models])
        return ledger.WholeSplit(
            subtasks, splitter.serving, splitter.versions, splitter.riding, splitter.followed, pins
        )

    def page_stored(self, conn: Connection, batch_id: uuid.UUID, page: InputPage) -> None:
        """A `ledger.PageStored`: split the page just written and write its full chunks. Once
        the pipeline cannot split a page, the rest are only stored (the batch fails at `finish`)."""
        if self._error is not None:
            return
        try:
            if self._splitter is None:
                self._splitter = self._new_splitter(conn, batch_id, self._serving(conn, fresh=True))
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

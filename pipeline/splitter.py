"""The split: turns a batch's inputs into sub-tasks, one chunk of up to `chunk_size`
rows per model, written with COPY and published per model queue. The client splits a
small batch and a batch of JSON items as it stores it (`ClientSplit`); the `split` task
splits a stored `pending` batch one committed step of inputs at a time (`split_steps`)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from celery import Celery
from sqlalchemy import Connection, Engine

from pipeline import broker, heartbeat, ledger, registry, runtime
from pipeline.definition import InputPage, ModelRows, ModelSpec, Pipeline
from pipeline.errors import NoChampionError, SplitError, UnknownPipelineError
from pipeline.garbage import collection_paused
from pipeline.ledger import rollouts as rollout_rows
from pipeline.ledger.split import COST_MIN_ROWS
from pipeline.schema import BatchState, Priority, RolloutMode, SubtaskRole
from pipeline.settings import Settings, get_settings

log = logging.getLogger(__name__)


# What a batch's inputs can make a split raise: the batch fails with the reason. Anything
# else is a bug (in a pipeline or here): it propagates with its traceback, the batch stays
# `pending`, and the sweeper splits it again once fixed code is deployed.
SPLIT_ERRORS = (SplitError, UnknownPipelineError, NoChampionError)
# The first step of a split covers the stored pages holding this many inputs and each later
# one doubles what is split so far, up to `split_step_items`: a big batch's first sub-tasks
# are published after reading a page or a few, not a whole step (its first results come sooner).
FIRST_STEP_ITEMS = 2_000


class SeqCounter:
    """The next `seq` of one model's sub-tasks in a batch: shared by a canary's two chunkers
    (champion and challenger), so each version's chunks are numbered in item order."""

    def __init__(self, first: int) -> None:
        self.next = first

    def take(self) -> int:
        seq, self.next = self.next, self.next + 1
        return seq


class Chunker:
    """Packs one model's rows, as they arrive in item order, into sub-tasks of `chunk_size` rows.

    Rows that are the inputs' own stored features (`ModelRows.of_inputs`) are not
    copied into the sub-tasks unless `copy_inputs`. `priority`: the sub-tasks' rank
    (`Priority.rank`); `model_version`: the version pinned on them; `seqs`: a counter
    shared with another chunker of the model (default: its own, from `first_seq`).
    """

    def __init__(
        self,
        spec: ModelSpec,
        chunk_size: int,
        first_seq: int = 0,
        copy_inputs: bool = False,
        priority: int = Priority.bulk.rank,
        model_version: str | None = None,
        seqs: SeqCounter | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"model {spec.name!r}: chunk size must be at least 1, got {chunk_size}")
        self.spec = spec
        self.chunk_size = chunk_size
        self.seqs = seqs if seqs is not None else SeqCounter(first_seq)
        self.copy_inputs = copy_inputs
        self.priority = priority
        self.model_version = model_version
        self._rows: list[np.ndarray] = []
        self._items: list[np.ndarray] = []
        self._buffered = 0
        self._of_inputs: bool | None = None

    def add(self, rows: ModelRows, offset: int) -> None:
        """Buffer `rows` of inputs numbered from `offset`."""
        X = rows.X
        if X.ndim != 2 or X.shape[1] != self.spec.n_features or len(X) != len(rows.items):
            raise SplitError(
                f"model {self.spec.name!r}: split gave rows of shape {X.shape} with {len(rows.items)} item indices;"
                f" expected (n, {self.spec.n_features}) with n indices"
            )
        of_inputs = rows.of_inputs and not self.copy_inputs
        if self._of_inputs is not None and of_inputs != self._of_inputs:
            raise SplitError(f"model {self.spec.name!r}: split mixed rows of the inputs with other rows")
        self._of_inputs = of_inputs
        if not of_inputs:
            self._rows.append(np.ascontiguousarray(X, dtype="<f4"))
        self._items.append(np.asarray(rows.items, dtype=np.int64) + offset)
        self._buffered += len(X)

    def take(self, final: bool = False) -> Iterator[ledger.NewSubtask]:
        """Yield full chunks; with `final`, the remainder too."""
        size = self.chunk_size
        if self._buffered < size and not (final and self._buffered):
            return
        items = np.concatenate(self._items)
        rows = None if self._of_inputs else np.concatenate(self._rows)
        end = len(items) if final else len(items) - len(items) % size
        for start in range(0, end, size):
            yield ledger.NewSubtask(
                model=self.spec.name,
                seq=self.seqs.take(),
                max_attempts=self.spec.max_attempts,
                priority=self.priority,
                items=items[start : start + size],
                payload=None if rows is None else rows[start : start + size].tobytes(),
                model_version=self.model_version,
            )
        self._items = [items[end:]]
        self._rows = [] if rows is None else [rows[end:]]
        self._buffered = len(items) - end


@dataclass(frozen=True)
class SplitStep:
    """What one committed split step did: the sub-tasks to publish, whether the split is
    finished, and whether the batch must now be aggregated."""

    published: list[ledger.Dispatch]
    finished: bool
    aggregate: bool


def pin_champions(conn: Connection, pipeline: Pipeline, ride: ledger.RideQuery | None = None) -> rollout_rows.Serving:
    """Each of the pipeline's models' champion version, and per model its active roll-out of
    another version (with `ride`, who consumes its queue): one query for a batch's whole split
    (its first step; the later ones keep what it pinned and follow the roll-outs it recorded).

    Raises:
        NoChampionError: a model has no version yet.
    """
    names = [spec.name for spec in pipeline.models]
    serving = rollout_rows.serving_of(conn, names, ride)
    for name in names:
        if name not in serving.champions:
            raise NoChampionError(name)
    rollouts = {
        model: rollout for model, rollout in serving.rollouts.items() if rollout.version != serving.champions[model]
    }
    return replace(serving, rollouts=rollouts)


def canary_inputs(batch_id: uuid.UUID, items: np.ndarray, percent: float) -> np.ndarray:
    """For each input index in `items`, True when a canary of `percent` % sends it to the
    challenger: a splitmix64 hash of (batch id, input index) mapped to [0, 100), so an input
    of a batch always gets the same version, whenever and however often it is split."""
    key = np.uint64(int.from_bytes(batch_id.bytes[:8], "big") ^ int.from_bytes(batch_id.bytes[8:], "big"))
    with np.errstate(over="ignore"):
        x = key ^ np.asarray(items, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (100.0 / 2.0**53) < percent


def _subset(rows: ModelRows, chosen: np.ndarray) -> ModelRows:
    """The rows of `rows` where `chosen`; always copied (a subset is not the inputs' own rows)."""
    return ModelRows(rows.X[chosen], rows.items[chosen], of_inputs=False)


def bulk_chunk_sizes(sizes: dict[str, int], cpu_s_per_row: dict[str, float], bulk_chunk_ms: float) -> dict[str, int]:
    """`sizes` (rows per sub-task, per model) cut to about `bulk_chunk_ms` of predict CPU at
    each model's `cpu_s_per_row`, never below `ledger.split.COST_MIN_ROWS` rows (a model
    without a measured cost keeps its size)."""
    capped = dict(sizes)
    for model, cost in cpu_s_per_row.items():
        if model in capped and cost > 0:
            capped[model] = min(capped[model], max(COST_MIN_ROWS, int(bulk_chunk_ms / 1000 / cost)))
    return capped


class BatchSplitter:
    """Turns a `pending` batch's input pages, taken in item order from input
    `batch.split_items` on, into its sub-tasks: one `Chunker` per model (two for a canary's
    model: champion and challenger), and a shadow copy of each serve sub-task of a model in
    shadow. Reads what the batch's split pins (champions, roll-outs, bulk chunk sizes) once.

    Raises:
        NoChampionError: a model of the pipeline has no version to pin.
    """

    def __init__(
        self,
        conn: Connection,
        batch: Any,
        pipeline: Pipeline,
        chunk_sizes: dict[str, int],
        bulk_chunk_ms: float,
        ride: ledger.RideQuery | None = None,
    ) -> None:
        self.batch_id: uuid.UUID = batch.id
        self.pipeline = pipeline
        # The first step numbers every model's sub-tasks from 0; a later one goes on from the last.
        seqs = ledger.next_seqs(conn, batch.id) if batch.split_items else {}
        rank = Priority(batch.priority).rank
        # With `ride` (a small batch's first split), whose sub-tasks may ride (`ledger.riders`).
        self.riding: ledger.Riding | None = None
        if batch.model_versions is None:
            serving = pin_champions(conn, pipeline, ride)
            self.versions, self.rollouts, self.riding = serving.champions, serving.rollouts, serving.riding
        else:
            self.versions = batch.model_versions
            self.rollouts = {r.model: r for r in rollout_rows.active_rollouts_of_batch(conn, batch.id)}
        # The roll-outs this split is the first to follow (recorded by `record_rollouts`).
        self._new_rollouts = batch.model_versions is None
        self._chunkers: list[Chunker] = []
        self._champions: dict[str, Chunker] = {}
        self._canaries: dict[str, tuple[Chunker, Chunker, float]] = {}
        sizes = {spec.name: chunk_sizes.get(spec.name, spec.chunk_size) for spec in pipeline.models}
        if bulk_chunk_ms and rank == Priority.bulk.rank:
            sizes = bulk_chunk_sizes(sizes, ledger.model_row_costs(conn, list(sizes)), bulk_chunk_ms)
        for spec in pipeline.models:
            size = sizes[spec.name]
            counter = SeqCounter(seqs.get(spec.name, 0))
            rollout = self.rollouts.get(spec.name)
            canary = rollout is not None and rollout.mode == RolloutMode.canary
            champion = Chunker(
                spec, size, copy_inputs=canary, priority=rank, model_version=self.versions.get(spec.name), seqs=counter
            )
            self._chunkers.append(champion)
            self._champions[spec.name] = champion
            if canary:
                assert rollout is not None and rollout.percent is not None, "rollouts_percent_of_canary"
                challenger = Chunker(
                    spec, size, copy_inputs=True, priority=rank, model_version=rollout.version, seqs=counter
                )
                self._chunkers.append(challenger)
                self._canaries[spec.name] = (champion, challenger, rollout.percent)
        self._shadows = {model: r.version for model, r in self.rollouts.items() if r.mode == RolloutMode.shadow}
        # Inputs split so far, and serve sub-tasks taken so far.
        self.split_items: int = batch.split_items
        self.serving = 0

    def add(self, page: InputPage) -> None:
        """Split the next `page` of inputs into the chunkers.

        Raises:
            SplitError: the pipeline cannot split the page, or gave rows the models cannot take.
        """
        pipeline = self.pipeline
        if page.split is not None:
            parts = page.split
        else:
            with collection_paused():
                parts = pipeline.split_page(pipeline.with_features(page))
        for spec in pipeline.models:
            rows = parts.get(spec.name)
            if rows is None or not len(rows.X):
                continue
            # A worker can read the inputs' rows only where their features are stored.
            rows = rows if page.X is not None else replace(rows, of_inputs=False)
            if spec.name in self._canaries:
                champion, challenger, percent = self._canaries[spec.name]
                chosen = canary_inputs(self.batch_id, np.asarray(rows.items) + page.first, percent)
                for chunker, part in ((champion, _subset(rows, ~chosen)), (challenger, _subset(rows, chosen))):
                    if len(part.X):
                        chunker.add(part, page.first)
            else:
                self._champions[spec.name].add(rows, page.first)
        self.split_items = page.first + page.count

    def take(self, final: bool = False) -> list[ledger.NewSubtask]:
        """The full chunks of every model (with `final`, the remainders too), each serve
        sub-task followed by its shadow copies."""
        serving = [subtask for chunker in self._chunkers for subtask in chunker.take(final)]
        self.serving += len(serving)
        return serving + [
            replace(
                subtask,
                seq=-1 - subtask.seq,
                priority=Priority.shadow.rank,
                model_version=self._shadows[subtask.model],
                role=SubtaskRole.shadow,
            )
            for subtask in serving
            if subtask.model in self._shadows
        ]

    @property
    def followed(self) -> list[int]:
        """The roll-outs this split is the first to follow: the batch's first split step's."""
        return [r.id for r in self.rollouts.values()] if self._new_rollouts else []

    def record_rollouts(self, conn: Connection) -> None:
        """Record that the batch follows its roll-outs, on the first split step's transaction."""
        if self.followed:
            rollout_rows.add_rollout_batch(conn, self.followed, self.batch_id)


def split_step(
    conn: Connection,
    batch_id: uuid.UUID,
    chunk_sizes: dict[str, int],
    step_items: int,
    bulk_chunk_ms: float = 0.0,
) -> SplitStep | None:
    """Split the next inputs of a `pending` batch into `dispatched` sub-tasks, on `conn`'s
    transaction: the stored pages that hold the next `step_items`, or the next
    `FIRST_STEP_ITEMS` or as many as are split already when fewer (the steps ramp up); the
    last step moves the batch to `running`.

    With a roll-out active for a model: in shadow, every serve sub-task of the model gets a
    shadow copy (its challenger version, role shadow, rank shadow, seq -1 - its seq); as a
    canary, the inputs `canary_inputs` chooses are scored by the challenger in serve
    sub-tasks of their own.

    A bulk batch's chunks are also cut to about `bulk_chunk_ms` of predict CPU each
    (`bulk_chunk_sizes`, from the models' recent sub-tasks; 0: not cut), so an interactive
    sub-task waits at most about that long for a worker process busy with bulk work.

    Chunks do not span steps, so a step interrupted by a crash is redone from
    `batches.split_items` with the same sub-tasks. The batch's row is not locked while the
    step is made (workers count finished sub-tasks on it meanwhile); the step is counted
    first, by a statement that refuses it when another split counted these inputs. Returns
    None, having written nothing, when the batch is not `pending` (split already, cancelled
    or aborted) or another split took the step.

    Raises:
        SplitError, UnknownPipelineError: the pipeline cannot split the inputs
            (raised before anything is written).
        NoChampionError: a model of the pipeline has no version to pin.
    """
    batch = ledger.pending_batch(conn, batch_id)
    if batch is None:
        return None
    pipeline = registry.get_pipeline(batch.pipeline)
    splitter = BatchSplitter(conn, batch, pipeline, chunk_sizes, bulk_chunk_ms)
    split_from = batch.split_items
    step = min(step_items, max(FIRST_STEP_ITEMS, split_from), batch.items - split_from)
    # Whole stored pages: a step ends where a page does (cutting a page of JSON items parses it).
    for page in ledger.input_pages(conn, batch_id, len(pipeline.feature_names), split_from, step):
        splitter.add(page)
    subtasks = splitter.take(final=True)
    finished = splitter.split_items >= batch.items
    # Counted before its sub-tasks are written: the statement refuses a step another split
    # counted meanwhile, and from here to the commit (briefly) holds the batch's row.
    state = ledger.record_split(
        conn, batch_id, split_from, splitter.split_items, splitter.serving, finished, splitter.versions
    )
    if state is None:
        return None
    published = ledger.copy_subtasks(conn, batch_id, subtasks)
    splitter.record_rollouts(conn)
    return SplitStep(published, finished, state == BatchState.aggregating)


def split_steps(
    engine: Engine, batch_id: uuid.UUID, chunk_sizes: dict[str, int], step_items: int, bulk_chunk_ms: float = 0.0
) -> Iterator[SplitStep]:
    """Yield each step of a `pending` batch's split once it is committed, until the split is
    finished; nothing when the batch is not `pending`.

    Raises:
        SplitError, UnknownPipelineError: the pipeline cannot split the inputs.
        NoChampionError: a model of the pipeline has no version to pin.
    """
    while True:
        with engine.begin() as conn:
            step = split_step(conn, batch_id, chunk_sizes, step_items, bulk_chunk_ms)
        if step is None:
            return
        yield step
        if step.finished:
            return


def _fail_split(conn: Connection, batch_id: uuid.UUID, error: Exception) -> None:
    log.error("batch %s cannot be split: %s", batch_id, error, exc_info=error)
    ledger.fail_pending_batch(conn, batch_id, f"split failed: {error}")


@dataclass(frozen=True)
class NewBatch:
    """What `BatchSplitter` reads of a batch its client is storing: known to the client, so
    its row is not read back (a `pending` batch's row has the same fields)."""

    id: uuid.UUID
    pipeline: str
    priority: Priority
    split_items: int = 0
    model_versions: dict[str, str] | None = None


class ClientSplit:
    """The split a client makes of a new batch as it stores it, on the storing transaction
    (`ledger.insert_batch`'s `stored`): each page is split once written, from the objects
    the client validated (reading it back would validate every input again), and its full
    chunks are written at once; `finish` writes the rest and counts the split, so the batch
    is committed `running` with every sub-task, and its messages go once it is committed.
    """

    def __init__(self, settings: Settings, pipeline: str, priority: Priority, small: bool) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._priority = priority
        # A small batch's sub-tasks ride on each other's messages (`ledger.copy_subtasks`).
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
            _fail_split(conn, batch_id, self._error)
            return None
        published = self._published + ledger.copy_subtasks(conn, batch_id, last, splitter.riding)
        splitter.record_rollouts(conn)
        return SplitStep(published, True, state == BatchState.aggregating)


def ride_query(settings: Settings, pipeline: Pipeline) -> ledger.RideQuery:
    """What a small batch of `pipeline` asks the ledger to ride (`ledger.RideQuery`): its
    models' queues as the broker names them, and the age up to which a heartbeat counts."""
    queues = {spec.name: heartbeat.queue_key(settings, broker.model_queue(spec.name)) for spec in pipeline.models}
    return ledger.RideQuery(queues, heartbeat.max_beat_age_s(settings))


def publish_step(app: Celery, batch_id: uuid.UUID, step: SplitStep, follow: bool) -> int:
    """Publish a committed split step's sub-tasks, then the batch's aggregate when it is due,
    or when its split is finished and an aggregator is to `follow` it (assembling its results
    as its sub-tasks finish); return how many sub-tasks were published."""
    created = broker.publish_predictions(app, step.published)
    if step.aggregate or (step.finished and follow):
        broker.publish_aggregate(app, str(batch_id))
    return created


def run_split(engine: Engine, settings: Settings, batch_id: uuid.UUID, app: Celery) -> None:
    """Split a batch step by step, publishing each step's sub-tasks with `app` once it is
    committed, so workers start on the first chunks while the rest is split.

    A batch whose inputs the pipeline cannot split is marked `failed` with the reason.
    """
    created = steps = 0
    try:
        for step in split_steps(
            engine, batch_id, settings.chunk_sizes, settings.split_step_items, settings.bulk_chunk_ms
        ):
            steps += 1
            # A batch of several steps is followed (a one-step one is aggregated once due).
            created += publish_step(app, batch_id, step, follow=steps > 1)
    except SPLIT_ERRORS as error:
        with engine.begin() as conn:
            _fail_split(conn, batch_id, error)
        return
    log.info("batch %s: %d sub-tasks published", batch_id, created)


@broker.app.task(name=broker.SPLIT_TASK)
def split_task(batch_id: str) -> None:
    message = broker.SplitMessage(batch_id=batch_id)
    run_split(runtime.engine(), get_settings(), uuid.UUID(message.batch_id), runtime.celery_app())

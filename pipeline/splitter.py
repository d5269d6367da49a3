"""The split: turns a batch's inputs into sub-tasks, one chunk of up to `chunk_size`
rows per model (`batch_splitter.BatchSplitter`), written with COPY and published per model
queue. The `split` task splits a stored `pending` batch one committed step of inputs at a
time (`split_steps`); the client splits a small batch and a batch of JSON items as it
stores it (`client_split.ClientSplit`)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from celery import Celery
from sqlalchemy import Connection, Engine

from pipeline import broker, ledger, registry, runtime
from pipeline.batch_splitter import BatchSplitter
from pipeline.errors import NoChampionError, SplitError, UnknownPipelineError
from pipeline.schema import BatchState
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


@dataclass(frozen=True)
class SplitStep:
    """What one committed split step did: the sub-tasks to publish, whether the split is
    finished, and whether the batch must now be aggregated."""

    published: list[ledger.Dispatch]
    finished: bool
    aggregate: bool


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


def fail_split(conn: Connection, batch_id: uuid.UUID, error: Exception) -> None:
    """`pending` → `failed`: the pipeline cannot split the batch's inputs (`error`)."""
    log.error("batch %s cannot be split: %s", batch_id, error, exc_info=error)
    ledger.fail_pending_batch(conn, batch_id, f"split failed: {error}")


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
            fail_split(conn, batch_id, error)
        return
    log.info("batch %s: %d sub-tasks published", batch_id, created)


@broker.app.task(name=broker.SPLIT_TASK)
def split_task(batch_id: str) -> None:
    message = broker.SplitMessage(batch_id=batch_id)
    run_split(runtime.engine(), get_settings(), uuid.UUID(message.batch_id), runtime.celery_app())

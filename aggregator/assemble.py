"""The aggregate step: one result per input, in input order, from every model's
sub-task outputs, streamed page by page; then the batch's final state."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import kombu.exceptions
import numpy as np
from sqlalchemy import Connection, Row

from aggregator.drift import ScoredCounts
from aggregator.latency import SubtaskTimes
from aggregator.metrics import batch_metrics
from aggregator.versions import UNSCORED, ResultVersions
from pipeline import broker, ledger, registry, rollouts, runtime
from pipeline.definition import InputPage, ModelSpec, PageOutputs
from pipeline.estimation import ScoreCounts
from pipeline.garbage import collection_paused
from pipeline.ledger import rollouts as rollout_rows
from pipeline.ledger.connection import Bind, connected, transaction
from pipeline.monitor import evaluate_if_due
from pipeline.schema import BatchState, FailurePolicy
from pipeline.settings import get_settings

log = logging.getLogger(__name__)

# How often a followed batch is checked for newly finished sub-tasks.
FOLLOW_POLL_S = 0.05
# States after which a batch is never due for aggregation (a cancelled one still is, once).
ENDED_STATES = (BatchState.succeeded, BatchState.partial, BatchState.failed)


# The next sub-tasks of one model that start before an input; empty when there are none.
FetchOutputs = Callable[[int], Sequence[ledger.SubtaskOutput]]
# Sub-tasks read per model and query.
FETCH_LIMIT = 64


class BatchOutputs:
    """A batch's serve sub-task outputs for every stream (model, pinned version) of its
    pipeline, in `seq` order: one query reads the next ones of every stream that has run
    out, and a stream known to have no more before an input is not asked again. Given
    `read`, every stream's outputs read already, it asks nothing."""

    def __init__(
        self,
        conn: Connection,
        batch_id: uuid.UUID,
        models: Sequence[ledger.StreamKey],
        read: dict[ledger.StreamKey, list[ledger.SubtaskOutput]] | None = None,
    ) -> None:
        # The succeeded sub-tasks' scoring versions and drift counts, and the timings of
        # those that ran to an outcome, counted as they are read.
        self.scored = ScoredCounts()
        self.times = SubtaskTimes()
        self._conn = conn
        self._batch_id = batch_id
        self._read: dict[ledger.StreamKey, list[ledger.SubtaskOutput]] = {model: [] for model in models}
        self._after_seq = dict.fromkeys(models, -1)
        # Every sub-task of the stream starting before this input has been read.
        self._complete_before = dict.fromkeys(models, -1)
        if read is not None:
            self._complete_before = dict.fromkeys(models, sys.maxsize)
            for model in models:
                self._add(model, read.get(model, []))

    def _add(self, model: ledger.StreamKey, chunks: list[ledger.SubtaskOutput]) -> None:
        """Hold stream `model`'s next sub-tasks `chunks`, counted as read."""
        for chunk in chunks:
            if chunk.output is not None:
                self.scored.add(*model, len(chunk.items), chunk.bin_counts)
            self.times.add(model[0], chunk.timing)
        self._read[model] = chunks
        if chunks:
            self._after_seq[model] = chunks[-1].seq

    def fetch(self, model: ledger.StreamKey, before_item: int) -> list[ledger.SubtaskOutput]:
        """The next sub-tasks of stream `model` starting before input `before_item` (a `FetchOutputs`)."""
        if not self._read[model] and self._complete_before[model] < before_item:
            wanted = {
                m: seq
                for m, seq in self._after_seq.items()
                if not self._read[m] and self._complete_before[m] < before_item
            }
            for m, chunks in ledger.subtask_outputs(
                self._conn, self._batch_id, wanted, before_item, FETCH_LIMIT
            ).items():
                self._add(m, chunks)
                if len(chunks) < FETCH_LIMIT:
                    self._complete_before[m] = before_item
        chunks, self._read[model] = self._read[model], []
        return chunks


class ModelOutputStream:
    """One model's output rows of a batch, handed out one page of inputs at a time, in item order."""

    def __init__(self, spec: ModelSpec, fetch: FetchOutputs) -> None:
        self.spec = spec
        self._fetch = fetch
        self._fetched: deque[ledger.SubtaskOutput] = deque()
        self._chunk: ledger.SubtaskOutput | None = None
        self._items = np.empty(0, dtype=np.int64)
        self._rows: np.ndarray | None = None

    def _current_chunk(self, before_item: int) -> ledger.SubtaskOutput | None:
        """The chunk being handed out, or the next one starting before `before_item`; None
        when there is none."""
        if self._chunk is not None:
            return self._chunk
        if not self._fetched:
            self._fetched.extend(self._fetch(before_item))
            if not self._fetched:
                return None
        self._chunk = self._fetched.popleft()
        self._items = np.asarray(self._chunk.items, dtype=np.int64)
        output = self._chunk.output
        self._rows = None if output is None else np.frombuffer(output, "<f4").reshape(-1, self.spec.n_outputs)
        return self._chunk

    def take_page(self, first: int, count: int) -> tuple[PageOutputs, dict[int, str]]:
        """Return this model's output rows for inputs `first` .. `first + count - 1` (indices
        within the page), and for each of those inputs whose rows are in a sub-task that did
        not succeed, why (by index within the page). Every sub-task starting before the
        page's end must be finished."""
        end = first + count
        rows: list[np.ndarray] = []
        items: list[np.ndarray] = []
        errors: dict[int, str] = {}
        while (chunk := self._current_chunk(end)) is not None:
            lo, hi = np.searchsorted(self._items, (first, end))
            if lo < hi:
                if self._rows is None:
                    reason = chunk.error or "no output"
                    errors.update((int(item) - first, reason) for item in np.unique(self._items[lo:hi]))
                else:
                    rows.append(self._rows[lo:hi])
                    items.append(self._items[lo:hi] - first)
            if hi < len(self._items):
                break  # the chunk goes on into the next page
            self._chunk = None
        if not rows:
            return PageOutputs(np.empty((0, self.spec.n_outputs), "<f4"), np.empty(0, np.int64)), errors
        return PageOutputs(np.concatenate(rows), np.concatenate(items)), errors


class ModelOutputs:
    """One model's output rows of a batch from its streams: one per pinned version (a canary's
    model has two, whose chunks interleave by input); each page merged in item order."""

    def __init__(self, spec: ModelSpec, streams: Sequence[ModelOutputStream]) -> None:
        self.spec = spec
        self._streams = streams

    def take_page(self, first: int, count: int) -> tuple[PageOutputs, dict[int, str], np.ndarray]:
        """As `ModelOutputStream.take_page`, over every stream of the model; with, per input of
        the page, the index of the stream whose rows it has (UNSCORED: none)."""
        served = np.full(count, UNSCORED, np.int8)
        pages: list[PageOutputs] = []
        errors: dict[int, str] = {}
        for code, stream in enumerate(self._streams):
            page, failed = stream.take_page(first, count)
            served[page.items] = code
            pages.append(page)
            errors.update(failed)
        # An input with rows in a failed sub-task has no version, even if others of its rows ran.
        served[list(errors)] = UNSCORED
        if len(pages) == 1:
            return pages[0], errors, served
        items = np.concatenate([page.items for page in pages])
        order = np.argsort(items, kind="stable")
        return PageOutputs(np.concatenate([page.rows for page in pages])[order], items[order]), errors, served


class FailureCauses:
    """Why inputs have no result: per failed sub-task error (`model 'm': error`), how many
    inputs it left without one; a cancelled sub-task is no cause. At most `MAX_CAUSES`
    distinct errors are counted."""

    MAX_CAUSES = 100

    def __init__(self) -> None:
        self._inputs: Counter[str] = Counter()

    def add(self, cause: str, inputs: int) -> None:
        if cause in self._inputs or len(self._inputs) < self.MAX_CAUSES:
            self._inputs[cause] += inputs

    def explain(self, reason: str, unanswered: int) -> str:
        """`reason`, followed by the error that left the most inputs without a result."""
        if not self._inputs:
            return reason
        cause, inputs = self._inputs.most_common(1)[0]
        return f"{reason}; {inputs} of {unanswered} inputs without a result: {cause}"


def final_state(
    batch: Row[Any], answered: int, unanswered: int, causes: FailureCauses
) -> tuple[BatchState, str | None]:
    """A batch's final state, and why it is not `succeeded`, from its failure policy
    and how many inputs got a result; a failed batch's reason names its commonest cause."""
    reason = batch.error
    if batch.state == BatchState.cancelled:
        return BatchState.cancelled, reason
    if unanswered == 0:
        return BatchState.succeeded, reason
    if batch.failure_policy == FailurePolicy.fail_fast:
        return BatchState.failed, causes.explain(reason or ledger.FAIL_FAST_REASON, unanswered)
    if batch.max_failed_fraction is not None and batch.failed > batch.max_failed_fraction * batch.total:
        reason = reason or ledger.too_many_failures_reason(batch.max_failed_fraction)
        return BatchState.failed, causes.explain(reason, unanswered)
    if answered == 0:
        return BatchState.failed, causes.explain(reason or "no input has a result", unanswered)
    return BatchState.partial, reason


def _wait_for(ready: Callable[[], bool]) -> None:
    while not ready():
        time.sleep(FOLLOW_POLL_S)


def _due_batch(conn: Connection, batch_id: uuid.UUID) -> Row[Any] | None:
    """Wait until a followed batch, whose sub-tasks are all finished, is due for aggregation
    and lock its row; None if it ended another way meanwhile."""
    while (batch := ledger.lock_aggregating_batch(conn, batch_id)) is None:
        if ledger.batch_state(conn, batch_id) in ENDED_STATES:
            return None
        time.sleep(FOLLOW_POLL_S)
    return batch


def publish_shadows(bind: Bind, batch_id: uuid.UUID) -> None:
    """Publish the finished batch's shadow sub-tasks again: they become claimable only now
    (`ledger.claims.BEST_DISPATCHED`). A broker that cannot take them is logged: they stay
    `dispatched`, and the sweeper publishes them once their lease expires."""
    with connected(bind) as conn:
        shadows = rollout_rows.dispatched_shadows(conn, batch_id)
    if not shadows:
        return
    try:
        broker.publish_predictions(runtime.celery_app(), shadows)
    except kombu.exceptions.OperationalError as error:
        log.warning("batch %s: its %d shadow sub-tasks could not be published (%s)", batch_id, len(shadows), error)


class Assembly:
    """A batch's results assembled a page of inputs at a time on `conn`, from its serve
    sub-tasks' outputs (read as the pages need them, or all read already: `read`); each
    page is stored once the next is assembled, the last one by the statement finishing the
    batch (`finish`: one round trip fewer for a one-page batch)."""

    def __init__(self, conn: Connection, batch: Row[Any], read: ledger.OnePageBatch | None = None) -> None:
        self.pipeline = registry.get_pipeline(batch.pipeline)
        pinned = ledger.serving_versions(batch) if read is None else read.serving
        keys = {spec.name: [(spec.name, v) for v in pinned.get(spec.name, [None])] for spec in self.pipeline.models}
        streams = [key for model_keys in keys.values() for key in model_keys]
        self.outputs = BatchOutputs(conn, batch.id, streams, None if read is None else read.outputs)
        self._streams = [
            ModelOutputs(spec, [ModelOutputStream(spec, partial(self.outputs.fetch, key)) for key in keys[spec.name]])
            for spec in self.pipeline.models
        ]
        self._versions = ResultVersions(
            batch.model_versions or {}, {name: [version for _, version in key] for name, key in keys.items()}
        )
        self._conn = conn
        self._batch_id = batch.id
        self._split_items = batch.split_items
        # Inputs past `split_items` were never split: the batch was cancelled or aborted first.
        self._unsplit_error = batch.error or "batch cancelled before it was split"
        self._kpis = self.pipeline.kpis()
        # CBPE: the pages' scores, calibrated once the scoring version is known (batch_metrics).
        self._scores = ScoreCounts() if self.pipeline.estimation is not None else None
        self._causes = FailureCauses()
        self.answered = self.unanswered = 0
        self._last_page: dict[str, Any] | None = None

    def add(self, stored: InputPage) -> None:
        """Assemble the results of a stored page of inputs; every sub-task holding rows of its
        inputs must be finished."""
        pipeline = self.pipeline
        page = pipeline.with_features(stored)
        errors: list[str | None] = [None] * page.count
        for index in range(max(0, self._split_items - page.first), page.count):
            errors[index] = self._unsplit_error
        page_outputs = {}
        failures: dict[str, dict[int, str]] = {}
        served: dict[str, np.ndarray] = {}
        for stream in self._streams:
            name = stream.spec.name
            page_outputs[name], failures[name], served[name] = stream.take_page(page.first, page.count)
            for index, reason in failures[name].items():
                message = f"model {name!r}: {reason}"
                errors[index] = message if errors[index] is None else f"{errors[index]}; {message}"
        with collection_paused():
            results = pipeline.aggregate_page(page, page_outputs, errors, self._kpis)
        if self._scores is not None:
            self._scores.add(*pipeline.estimate_scores(page, page_outputs, results))
        for model, failed in failures.items():
            unanswered_by = Counter(reason for index, reason in failed.items() if results[index] is None)
            for reason, inputs in unanswered_by.items():
                if reason != ledger.CANCELLED_ERROR:
                    self._causes.add(f"model {model!r}: {reason}", inputs)
        page_answered = page.count - results.count(None)
        self.answered += page_answered
        self.unanswered += page.count - page_answered
        self.store_last()
        self._last_page = ledger.result_page_row(
            self._batch_id,
            page.first,
            results,
            [None if r is not None else e or "the pipeline gave no result" for r, e in zip(results, errors)],
            self._versions.page_json(served),
        )

    def store_last(self) -> None:
        """Store the page assembled last, if not stored yet."""
        if self._last_page is not None:
            ledger.insert_result_page(self._conn, self._last_page)
            self._last_page = None

    def finish(self, batch: Row[Any]) -> Finished | None:
        """Move `batch` (its row as read due) to its final state with its metrics, window
        contributions and last page (`ledger.finish_batch`); None when it did not move."""
        state, error = final_state(batch, self.answered, self.unanswered, self._causes)
        result = {"items": batch.items, "answered": self.answered, "unanswered": self.unanswered}
        metrics, contributions = batch_metrics(
            self._conn,
            batch,
            self._kpis.summary(),
            datetime.now(UTC),
            self.outputs.scored.scored(),
            self.outputs.times,
            self._scores,
        )
        followed_rollout = ledger.finish_batch(
            self._conn, batch, state, error, result, metrics, contributions, self._last_page
        )
        if followed_rollout is None:
            return None
        log.info(
            "batch %s aggregated: %s (%d answered, %d without result)",
            batch.id,
            state.value,
            self.answered,
            self.unanswered,
        )
        return Finished(batch.pipeline, state, followed_rollout, bool(contributions))


@dataclass(frozen=True)
class Finished:
    """A batch its aggregate moved to its final state: what follows the commit needs."""

    pipeline: str
    state: BatchState
    followed_rollout: bool
    contributed: bool


def _finish_one_page(conn: Connection, read: ledger.OnePageBatch) -> Finished | None:
    """Aggregate a due batch of one input page read whole (`ledger.one_page_batch_due`) with
    no transaction: its one page assembled, then one checked statement finishing it. None
    when it did not move (another aggregation finished or holds it meanwhile)."""
    assembly = Assembly(conn, read.batch, read)
    assembly.add(read.input_page(len(assembly.pipeline.feature_names)))
    return assembly.finish(read.batch)


def _aggregate_locked(bind: Bind, batch_id: uuid.UUID) -> Finished | None:
    """Aggregate a batch in one transaction under its aggregation lock, a page of inputs at a
    time; follow a `running` one whose split is finished. None when another aggregation
    holds the batch, it is neither due nor followable, or it ended another way while
    followed."""
    with transaction(bind) as conn:
        held, locked = ledger.lock_aggregation(conn, batch_id)
        if not held:
            return None
        following = locked is None
        batch = locked if locked is not None else ledger.running_batch(conn, batch_id)
        if batch is None:
            return None
        if following:
            log.info("batch %s: assembling its results as its sub-tasks finish", batch_id)
        assembly = Assembly(conn, batch)
        n_features = len(assembly.pipeline.feature_names)
        for stored in ledger.input_pages(conn, batch_id, n_features, 0, batch.items):
            end = stored.first + stored.count
            if following:
                _wait_for(lambda: not ledger.unfinished_before(conn, batch_id, end))  # noqa: B023
            assembly.add(stored)
        if following:
            due = _due_batch(conn, batch_id)
            if due is None:
                assembly.store_last()
                return None
            batch = due
        return assembly.finish(batch)


def aggregate_batch(bind: Bind, batch_id: uuid.UUID, due: ledger.OnePageBatch | None = None) -> BatchState | None:
    """Write one result per input and move a batch due for aggregation to its final
    state: on a connection of Engine `bind`, or on autocommit Connection `bind` (a worker's
    turn), which then also runs what follows the commit.

    A batch of one input page is read whole in one statement (or `due`: read already, by the
    completion that made it due) and finished by one checked statement, with no transaction
    (`_finish_one_page`). Any other is aggregated in one
    transaction under its aggregation lock, a page of inputs at a time; one still `running`
    whose split is finished is followed instead: each page is assembled as soon as the
    sub-tasks holding its rows are finished, so assembly overlaps the workers' compute, and
    the batch is finished once it is due. Returns the final state; None when another
    aggregation holds or finished the batch, or it is neither due nor followable (a
    duplicate message).
    """
    with connected(bind) as conn:
        read = due if due is not None else ledger.one_page_batch_due(conn, batch_id)
        finished = None if read is None else _finish_one_page(conn, read)
    if read is None:
        finished = _aggregate_locked(bind, batch_id)
    if finished is None:
        return None
    settings = get_settings()
    # A batch no roll-out followed has no shadow sub-task and no gate: nothing to read.
    if finished.followed_rollout:
        publish_shadows(bind, batch_id)
        # After commit: the batch's results never wait for the gate.
        rollouts.evaluate_batch(bind, batch_id, min_age_s=settings.rollout_gate_interval_s)
    if finished.contributed:
        evaluate_if_due(bind, finished.pipeline, settings.monitor_windows, settings.monitor_evaluate_s)
    return finished.state

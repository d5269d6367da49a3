"""The batch splitter: turns a batch's input pages, in item order, into its sub-tasks,
one `chunker.Chunker` per model version it pins (champions, a canary's challenger) and a
shadow copy of each serve sub-task of a model in shadow. The split step (`splitter`) and
the client's split (`client_split`) both drive it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import cycle, islice
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Connection

from pipeline import ledger
from pipeline.chunker import Chunker, SeqCounter, bulk_chunk_sizes, canary_inputs
from pipeline.definition import InputPage, ModelRows, Pipeline
from pipeline.errors import NoChampionError
from pipeline.garbage import collection_paused
from pipeline.ledger import rollouts as rollout_rows
from pipeline.schema import Priority, RolloutMode, SubtaskRole

T = TypeVar("T")


def pin_champions(serving: rollout_rows.Serving, pipeline: Pipeline) -> rollout_rows.Serving:
    """What a batch's whole split pins (its first step; the later ones keep what it pinned
    and follow the roll-outs it recorded), from its one read of `serving_of`: each of the
    pipeline's models' champion version, and per model its active roll-out of another
    version (and, as read, who consumes its queue).

    Raises:
        NoChampionError: a model has no version yet.
    """
    for spec in pipeline.models:
        if spec.name not in serving.champions:
            raise NoChampionError(spec.name)
    rollouts = {
        model: rollout for model, rollout in serving.rollouts.items() if rollout.version != serving.champions[model]
    }
    return replace(serving, rollouts=rollouts)


def _subset(rows: ModelRows, chosen: np.ndarray) -> ModelRows:
    """The rows of `rows` where `chosen`; always copied (a subset is not the inputs' own rows)."""
    return ModelRows(rows.X[chosen], rows.items[chosen], of_inputs=False)


@dataclass(frozen=True)
class NewBatch:
    """What `BatchSplitter` reads of a batch its client is storing: known to the client, so
    its row is not read back (a `pending` batch's row has the same fields)."""

    id: uuid.UUID
    pipeline: str
    priority: Priority
    split_items: int = 0
    model_versions: dict[str, str] | None = None


class BatchSplitter:
    """Turns a `pending` batch's input pages, taken in item order from input
    `batch.split_items` on, into its sub-tasks: one `Chunker` per model (two for a canary's
    model: champion and challenger), and a shadow copy of each serve sub-task of a model in
    shadow. Reads what the batch's split pins (champions, roll-outs, bulk chunk sizes) once,
    or takes `serving`, its client's read of `serving_of` with who consumes each queue.

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
        serving: rollout_rows.Serving | None = None,
    ) -> None:
        self.batch_id: uuid.UUID = batch.id
        self.pipeline = pipeline
        # The first step numbers every model's sub-tasks from 0; a later one goes on from the last.
        seqs = ledger.next_seqs(conn, batch.id) if batch.split_items else {}
        rank = Priority(batch.priority).rank
        # With a small batch's `serving` (its client's read), whose sub-tasks may ride (`ledger.riders`).
        self.riding: ledger.Riding | None = None
        if batch.model_versions is None:
            read = serving or rollout_rows.serving_of(conn, [spec.name for spec in pipeline.models])
            pinned = pin_champions(read, pipeline)
            self.versions, self.rollouts, self.riding = pinned.champions, pinned.rollouts, pinned.riding
        else:
            self.versions = batch.model_versions
            self.rollouts = {r.model: r for r in rollout_rows.active_rollouts_of_batch(conn, batch.id)}
        # The roll-outs this split is the first to follow (recorded by `record_rollouts`).
        self._new_rollouts = batch.model_versions is None
        # Per model, its chunkers: the champion's, then a canary's challenger's.
        self._chunkers: list[tuple[Chunker, ...]] = []
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
            self._champions[spec.name] = champion
            if canary:
                assert rollout is not None and rollout.percent is not None, "rollouts_percent_of_canary"
                challenger = Chunker(
                    spec, size, copy_inputs=True, priority=rank, model_version=rollout.version, seqs=counter
                )
                self._chunkers.append((champion, challenger))
                self._canaries[spec.name] = (champion, challenger, rollout.percent)
            else:
                self._chunkers.append((champion,))
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
        sub-task followed by its shadow copies. A canary's champion and challenger chunks
        alternate (numbered, stored and claimed in that order), so the two versions are
        timed side by side, at the same moments: taken one version after the other, the
        gate's latency check compared the machine's load at two moments as much as the
        versions."""
        serving = [subtask for versions in self._chunkers for subtask in _in_turn([c.take(final) for c in versions])]
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


def _in_turn(runs: list[Iterator[T]]) -> Iterator[T]:
    """The items of `runs`, one of each in turn while they last (itertools' `roundrobin` recipe:
    a run that ends stops the `map`, and the cycle goes on over the runs left)."""
    turns: Iterator[Iterator[T]] = iter(runs)
    for active in range(len(runs), 0, -1):
        turns = cycle(islice(turns, active))
        yield from map(next, turns)

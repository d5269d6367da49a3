"""The `split` task: turns a pending batch's inputs into sub-tasks, one chunk of
up to `chunk_size` rows per model, written with COPY and published per model queue."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import numpy as np
from pydantic import TypeAdapter
from sqlalchemy import Engine

from pipeline import broker, ledger, registry, runtime
from pipeline.definition import ModelSpec
from pipeline.settings import Settings, get_settings

log = logging.getLogger(__name__)

INPUT_PAGE = 2000
DISPATCH_PAGE = 5000


class SplitError(ValueError):
    """A pipeline's split returned rows that do not fit its model specs."""


class Chunker:
    """Packs one model's rows, as they arrive in item order, into sub-tasks of `chunk_size` rows."""

    def __init__(self, spec: ModelSpec, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"model {spec.name!r}: chunk size must be at least 1, got {chunk_size}")
        self.spec = spec
        self.chunk_size = chunk_size
        self.seq = 0
        self._rows: list[np.ndarray] = []
        self._items: list[np.ndarray] = []
        self._buffered = 0

    def add(self, X: np.ndarray, items: np.ndarray) -> None:
        if X.ndim != 2 or X.shape[1] != self.spec.n_features or len(X) != len(items):
            raise SplitError(
                f"model {self.spec.name!r}: split gave rows of shape {X.shape} with {len(items)} item indices;"
                f" expected (n, {self.spec.n_features}) with n indices"
            )
        self._rows.append(np.ascontiguousarray(X, dtype="<f4"))
        self._items.append(np.asarray(items, dtype=np.int64))
        self._buffered += len(X)

    def take(self, final: bool = False) -> Iterator[ledger.NewSubtask]:
        """Yield full chunks; with `final`, the remainder too."""
        size = self.chunk_size
        if self._buffered < size and not (final and self._buffered):
            return
        rows = np.concatenate(self._rows)
        items = np.concatenate(self._items)
        end = len(rows) if final else len(rows) - len(rows) % size
        for start in range(0, end, size):
            yield ledger.NewSubtask(
                model=self.spec.name,
                seq=self.seq,
                max_attempts=self.spec.max_attempts,
                items=items[start : start + size].tolist(),
                payload=rows[start : start + size].tobytes(),
            )
            self.seq += 1
        self._rows, self._items = [rows[end:]], [items[end:]]
        self._buffered = len(rows) - end


def split_batch(engine: Engine, batch_id: uuid.UUID, chunk_sizes: dict[str, int]) -> int | None:
    """Create a pending batch's sub-tasks and move it to `running`, in one transaction.

    Returns the number of sub-tasks created; None when the batch was not pending
    (a duplicate message).
    """
    with engine.begin() as conn:
        batch = ledger.lock_pending_batch(conn, batch_id)
        if batch is None:
            return None
        pipeline = registry.get_pipeline(batch.pipeline)
        adapter = TypeAdapter(list[pipeline.input_model])  # type: ignore[name-defined]
        chunkers = [Chunker(spec, chunk_sizes.get(spec.name, spec.chunk_size)) for spec in pipeline.models]
        total = 0
        offset = 0
        for page in ledger.iter_inputs(conn, batch_id, INPUT_PAGE):
            parts = pipeline.split(adapter.validate_python(page))
            for chunker in chunkers:
                rows = parts.get(chunker.spec.name)
                if rows is not None and len(rows.X):
                    chunker.add(rows.X, rows.items + offset)
                total += ledger.copy_subtasks(conn, batch_id, chunker.take())
            offset += len(page)
        for chunker in chunkers:
            total += ledger.copy_subtasks(conn, batch_id, chunker.take(final=True))
        ledger.start_batch(conn, batch_id, total)
    return total


def dispatch_pending(engine: Engine, batch_id: uuid.UUID, lease_s: float) -> int:
    """Publish every `pending` sub-task of a batch and mark it `dispatched`; return how many."""
    pending = ledger.pending_subtasks(engine, batch_id)
    for start in range(0, len(pending), DISPATCH_PAGE):
        page = pending[start : start + DISPATCH_PAGE]
        broker.publish_predictions(runtime.celery_app(), page)
        ledger.mark_dispatched(engine, [subtask_id for subtask_id, _ in page], lease_s)
    return len(pending)


def run_split(engine: Engine, settings: Settings, batch_id: uuid.UUID) -> None:
    """Split a batch, then dispatch its sub-tasks (or aggregate an empty split).

    A batch whose inputs the pipeline cannot split is marked `failed` with the reason.
    """
    try:
        created = split_batch(engine, batch_id, settings.chunk_sizes)
    except (SplitError, registry.UnknownPipelineError, ValueError) as error:
        log.error("batch %s cannot be split: %s", batch_id, error)
        ledger.fail_pending_batch(engine, batch_id, f"split failed: {error}")
        return
    if created is None:
        return
    log.info("batch %s split into %d sub-tasks", batch_id, created)
    if created:
        dispatch_pending(engine, batch_id, settings.lease_s)
    else:
        broker.publish_aggregate(runtime.celery_app(), str(batch_id))


@broker.app.task(name=broker.SPLIT_TASK)
def split_task(batch_id: str) -> None:
    run_split(runtime.engine(), get_settings(), uuid.UUID(broker.SplitMessage(batch_id=batch_id).batch_id))

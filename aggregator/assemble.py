"""The aggregate step: one result per input, in input order, from every model's
sub-task outputs, streamed page by page; then the batch's final state."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pydantic import TypeAdapter
from sqlalchemy import Engine, Row

from aggregator.metrics import batch_metrics
from pipeline import ledger, registry
from pipeline.definition import ModelSpec
from pipeline.schema import BatchState, FailurePolicy

log = logging.getLogger(__name__)

INPUT_PAGE = 2000


class ModelOutputStream:
    """One model's output rows of a batch, handed out per input item in item order."""

    def __init__(self, spec: ModelSpec, outputs: Iterator[ledger.SubtaskOutput]) -> None:
        self.spec = spec
        self._outputs = outputs
        self._items = np.empty(0, dtype=np.int64)
        self._rows: np.ndarray | None = None
        self._error: str | None = None
        self._pos = 0

    def _next_chunk(self) -> bool:
        chunk = next(self._outputs, None)
        if chunk is None:
            return False
        self._items = np.asarray(chunk.items, dtype=np.int64)
        self._rows = (
            np.frombuffer(chunk.output, dtype="<f4").reshape(len(self._items), self.spec.n_outputs)
            if chunk.output is not None
            else None
        )
        self._error = chunk.error or ("no output" if chunk.output is None else None)
        self._pos = 0
        return True

    def take(self, item: int) -> tuple[np.ndarray | None, str | None]:
        """Return (rows, None) for `item`'s output rows (None when it has none),
        or (None, error) when a sub-task holding its rows failed."""
        parts: list[np.ndarray] = []
        error: str | None = None
        while True:
            if self._pos >= len(self._items) and not self._next_chunk():
                break
            if self._items[self._pos] != item:
                break
            end = int(np.searchsorted(self._items, item, side="right"))
            if self._rows is None:
                error = self._error
            else:
                parts.append(self._rows[self._pos : end])
            self._pos = end
            if end < len(self._items):
                break
        if error is not None:
            return None, error
        if not parts:
            return None, None
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)), None


def final_state(batch: Row[Any], answered: int, unanswered: int) -> tuple[BatchState, str | None]:
    """A batch's final state, and why it is not `succeeded`, from its failure policy
    and how many inputs got a result."""
    reason = batch.error
    if batch.state == BatchState.cancelled:
        return BatchState.cancelled, reason
    if unanswered == 0:
        return BatchState.succeeded, reason
    if batch.failure_policy == FailurePolicy.fail_fast:
        return BatchState.failed, reason or ledger.FAIL_FAST_REASON
    if batch.max_failed_fraction is not None and batch.failed > batch.max_failed_fraction * batch.total:
        return BatchState.failed, reason or ledger.too_many_failures_reason(batch.max_failed_fraction)
    if answered == 0:
        return BatchState.failed, reason or "no input has a result"
    return BatchState.partial, reason


def aggregate_batch(engine: Engine, batch_id: uuid.UUID) -> BatchState | None:
    """Write one result per input and move an `aggregating` batch to its final state,
    in one transaction. Returns the final state; None when the batch was not
    `aggregating` (already aggregated: a duplicate message)."""
    with engine.begin() as conn:
        batch = ledger.lock_aggregating_batch(conn, batch_id)
        if batch is None:
            return None
        pipeline = registry.get_pipeline(batch.pipeline)
        adapter = TypeAdapter(list[pipeline.input_model])  # type: ignore[name-defined]
        streams = [
            ModelOutputStream(spec, ledger.iter_subtask_outputs(conn, batch_id, spec.name)) for spec in pipeline.models
        ]
        kpis = pipeline.kpis()
        # A batch cancelled (or past its deadline) before it was split has no sub-task at all.
        unsplit = batch.total == 0 and (batch.state == BatchState.cancelled or batch.error is not None)
        unsplit_error = batch.error or "batch cancelled before it was split"
        answered = unanswered = 0
        item_index = 0
        for page in ledger.iter_inputs(conn, batch_id, INPUT_PAGE):
            rows: list[tuple[int, str | None, str | None]] = []
            for item in adapter.validate_python(page):
                outputs: dict[str, np.ndarray] = {}
                errors: list[str] = [unsplit_error] if unsplit else []
                for stream in streams:
                    output, error = stream.take(item_index)
                    if error is not None:
                        errors.append(f"model {stream.spec.name!r}: {error}")
                    elif output is not None:
                        outputs[stream.spec.name] = output
                result = None
                if not errors:
                    # A pipeline bug on one input must not lose the others' results.
                    try:
                        result = pipeline.aggregate(item, outputs)
                    except Exception as error:  # noqa: BLE001
                        errors.append(f"aggregate failed: {type(error).__name__}: {error}")
                if result is None:
                    rows.append((item_index, None, "; ".join(errors)))
                    unanswered += 1
                else:
                    rows.append((item_index, json.dumps(result), None))
                    answered += 1
                kpis.add(item, result)
                item_index += 1
            ledger.copy_results(conn, batch_id, rows)
        state, error = final_state(batch, answered, unanswered)
        result = {"items": item_index, "answered": answered, "unanswered": unanswered}
        metrics = batch_metrics(conn, batch, kpis.summary(), datetime.now(UTC))
        ledger.finish_batch(conn, batch_id, state, error, result, metrics)
    log.info("batch %s aggregated: %s (%d answered, %d without result)", batch_id, state.value, answered, unanswered)
    return state

"""Chunking: one model's rows of a batch, in item order, packed into sub-tasks of
`chunk_size` rows (`Chunker`, numbered by a `SeqCounter`); which inputs a canary sends to
its challenger (`canary_inputs`); and a bulk batch's chunk sizes cut to a CPU budget
(`bulk_chunk_sizes`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np

from pipeline import ledger
from pipeline.definition import ModelRows, ModelSpec
from pipeline.errors import SplitError
from pipeline.ledger.split import COST_MIN_ROWS
from pipeline.schema import Priority


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


def bulk_chunk_sizes(sizes: dict[str, int], cpu_s_per_row: dict[str, float], bulk_chunk_ms: float) -> dict[str, int]:
    """`sizes` (rows per sub-task, per model) cut to about `bulk_chunk_ms` of predict CPU at
    each model's `cpu_s_per_row`, never below `ledger.split.COST_MIN_ROWS` rows (a model
    without a measured cost keeps its size)."""
    capped = dict(sizes)
    for model, cost in cpu_s_per_row.items():
        if model in capped and cost > 0:
            capped[model] = min(capped[model], max(COST_MIN_ROWS, int(bulk_chunk_ms / 1000 / cost)))
    return capped

"""What a benchmark run submits: the same inputs, rebuilt from a seed in every process,
and the float32 rows every model of the pipeline scores for them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

DEFAULT_ROWS = {"screening": 1_000_000, "digits": 200_000}
# A digits input is a strip of 1..MAX_STRIP tiles, as in the demo.
MAX_STRIP = 6


@dataclass(frozen=True)
class Workload:
    """`inputs` is what `Client.submit` takes (a list of items, or a 2-D array for a
    feature-vector pipeline); input i gives `rows_per_item[i]` rows of `X` to every model.

    `X` is made on first use from `rows`: a client process, whose memory is measured,
    holds only the inputs a user would."""

    inputs: Any
    rows_per_item: np.ndarray
    rows_of: Callable[[], np.ndarray]

    @cached_property
    def X(self) -> np.ndarray:
        return self.rows_of()

    @property
    def items(self) -> int:
        return len(self.rows_per_item)

    @property
    def rows(self) -> int:
        return int(self.rows_per_item.sum())

    def head(self, count: int) -> Workload:
        """The first `count` inputs."""
        rows_per_item = self.rows_per_item[:count]
        return Workload(self.inputs[:count], rows_per_item, lambda: self.X[: int(rows_per_item.sum())])


def make_workload(pipeline: str, rows: int, seed: int = 0) -> Workload:
    """`rows` model rows of held-out data for `pipeline` (digits: tiles; screening: records)."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    if pipeline == "digits":
        return _digits(rows, seed)
    if pipeline == "screening":
        return _screening(rows, seed)
    raise ValueError(f"no benchmark workload for pipeline {pipeline!r}; known: {', '.join(DEFAULT_ROWS)}")


def _digits(rows: int, seed: int) -> Workload:
    from pipeline.pipelines.digits import TILE, dataset_split

    _, X_test, _, y_test = dataset_split()
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, MAX_STRIP + 1, size=rows)
    ends = np.cumsum(sizes)
    count = int(np.searchsorted(ends, rows)) + 1
    sizes = sizes[:count]
    sizes[-1] -= ends[count - 1] - rows
    chosen = rng.integers(0, len(X_test), size=rows)
    tiles = X_test[chosen]
    inputs = []
    start = 0
    for k in sizes.tolist():
        image = tiles[start : start + k].reshape(k, TILE, TILE).transpose(1, 0, 2).reshape(TILE, k * TILE)
        label = "".join(str(digit) for digit in y_test[chosen[start : start + k]].tolist())
        inputs.append({"image": image.tolist(), "label": label})
        start += k
    return Workload(inputs, sizes, lambda: tiles.astype("<f4"))


def _screening(rows: int, seed: int) -> Workload:
    from pipeline.pipelines.screening import dataset_split

    _, X_test, _, _ = dataset_split()
    X = X_test[np.random.default_rng(seed).integers(0, len(X_test), size=rows)]
    return Workload(X, np.ones(rows, dtype=np.int64), lambda: X.astype("<f4"))

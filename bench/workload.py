"""What a benchmark run submits: the same inputs, rebuilt from a seed in every process,
and the float32 rows every model of the pipeline scores for them. `digits` and
`screening` have workloads here, sized in model rows; any other pipeline is benchmarked
on its own `Pipeline.example_inputs`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, overload

import numpy as np

from pipeline.definition import Pipeline
from pipeline.garbage import collection_paused
from pipeline.inputs import encode_inputs
from pipeline.settings import get_settings

DEFAULT_ROWS = {"screening": 1_000_000, "digits": 200_000}
# Any other pipeline's inputs are made this many at a time, block b of seed s from seed
# s * EXAMPLE_SEEDS + b.
EXAMPLE_BLOCK = 1000
EXAMPLE_SEEDS = 1_000_003
# A digits input is a strip of 1..MAX_STRIP tiles, as in the demo.
MAX_STRIP = 6


@dataclass(frozen=True)
class Workload:
    """`inputs` is what `Client.submit` takes (a list of items, or a 2-D array for a
    feature-vector pipeline); input i gives `rows_per_item[i]` rows (for a pipeline
    without a workload here, a row is an input).

    `Xs`, the float32 rows each model scores, come from the pipeline's own validation and
    split, on first use: a client process, whose memory is measured, holds only the inputs
    a user would."""

    pipeline: Pipeline
    inputs: Any
    rows_per_item: np.ndarray

    @cached_property
    def Xs(self) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {spec.name: [] for spec in self.pipeline.models}
        for page in encode_inputs(self.pipeline, self.inputs, self.items, get_settings().max_item_bytes):
            for name, rows in self.pipeline.split_page(page).items():
                parts[name].append(np.asarray(rows.X, dtype="<f4"))
        return {name: np.concatenate(arrays) for name, arrays in parts.items()}

    @property
    def items(self) -> int:
        return len(self.rows_per_item)

    @property
    def rows(self) -> int:
        return int(self.rows_per_item.sum())

    def head(self, count: int) -> Workload:
        """The first `count` inputs."""
        return Workload(self.pipeline, self.inputs[:count], self.rows_per_item[:count])


def make_workload(pipeline: Pipeline, rows: int, seed: int = 0) -> Workload:
    """`rows` model rows of held-out data for `pipeline` (digits: tiles; screening: records);
    for any other pipeline, `rows` inputs from its `example_inputs`."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    if pipeline.name == "digits":
        return _digits(pipeline, rows, seed)
    if pipeline.name == "screening":
        return _screening(pipeline, rows, seed)
    return Workload(pipeline, ExampleInputs(pipeline, seed, 0, rows), np.ones(rows, dtype=np.int64))


class ExampleInputs(Sequence[Any]):
    """Inputs `start` .. `stop - 1` of a pipeline's `example_inputs`, made `EXAMPLE_BLOCK`
    at a time as they are read (block b from seed `seed * EXAMPLE_SEEDS + b`), as a user's
    generator hands them over: the client process holds one block, not every input as
    Python objects (at 100,000 `shipments` inputs, the list alone was 0.5 GB)."""

    def __init__(self, pipeline: Pipeline, seed: int, start: int, stop: int) -> None:
        self._pipeline, self._seed, self._start, self._stop = pipeline, seed, start, stop
        self._block: tuple[int, list[Any]] = (-1, [])

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> ExampleInputs: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("example inputs are sliced with step 1")
            return ExampleInputs(self._pipeline, self._seed, self._start + start, self._start + max(start, stop))
        if not 0 <= index < len(self):
            raise IndexError(index)
        block, offset = divmod(self._start + index, EXAMPLE_BLOCK)
        if self._block[0] != block:
            # Made with the collector paused, as the library validates them (pipeline/garbage.py).
            with collection_paused():
                inputs = self._pipeline.example_inputs(EXAMPLE_BLOCK, self._seed * EXAMPLE_SEEDS + block)
            self._block = (block, inputs)
        return self._block[1][offset]


def _digits(pipeline: Pipeline, rows: int, seed: int) -> Workload:
    from pipeline.pipelines.digits import dataset_split

    _, X_test, _, y_test = dataset_split()
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, MAX_STRIP + 1, size=rows)
    ends = np.cumsum(sizes)
    count = int(np.searchsorted(ends, rows)) + 1
    sizes = sizes[:count]
    sizes[-1] -= ends[count - 1] - rows
    chosen = rng.integers(0, len(X_test), size=rows)
    # Pixel values are the integers 0..16: kept as bytes, the items are built as read.
    # (Indexing the bytes, not the float64 rows: no 0.5 KB-a-row temporary at any size.)
    tiles = X_test.astype(np.uint8)[chosen]
    labels = y_test.astype(np.uint8)[chosen]
    return Workload(pipeline, DigitStrips(tiles, labels, np.cumsum(sizes) - sizes, sizes), sizes)


class DigitStrips(Sequence[dict[str, Any]]):
    """`digits` inputs built one at a time from compact arrays (a byte per pixel), as a
    user's generator or file reader hands them over: the client process holds what the
    library keeps, not the inputs as Python lists (64 floats a tile, 0.4 GB at 200,000 tiles)."""

    def __init__(self, tiles: np.ndarray, labels: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> None:
        self._tiles, self._labels, self._starts, self._sizes = tiles, labels, starts, sizes

    def __len__(self) -> int:
        return len(self._sizes)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> DigitStrips: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | DigitStrips:
        if isinstance(index, slice):
            return DigitStrips(self._tiles, self._labels, self._starts[index], self._sizes[index])
        from pipeline.pipelines.digits import TILE

        start, k = int(self._starts[index]), int(self._sizes[index])
        strip = self._tiles[start : start + k].astype(np.float64)
        image = strip.reshape(k, TILE, TILE).transpose(1, 0, 2).reshape(TILE, k * TILE)
        label = "".join(str(digit) for digit in self._labels[start : start + k].tolist())
        return {"image": image.tolist(), "label": label}


def _screening(pipeline: Pipeline, rows: int, seed: int) -> Workload:
    from pipeline.pipelines.screening import dataset_split

    _, X_test, _, _ = dataset_split()
    X = X_test[np.random.default_rng(seed).integers(0, len(X_test), size=rows)]
    return Workload(pipeline, X, np.ones(rows, dtype=np.int64))

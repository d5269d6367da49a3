"""What a pipeline is: its input model, how it splits an input into model rows,
the models it needs, how it puts one input's answers back together, and its KPIs.

A pipeline is one module holding a `Pipeline` subclass; see `pipeline/pipelines/digits.py`.
"""

from __future__ import annotations

import json
import types
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, Field, TypeAdapter

from pipeline.json_array import JsonArray
from pipeline.profile import DriftConfig

# How the roll-out gate reads a model's rows against stored labels (`Pipeline.row_labels`):
# (each row's input index, each row's position among its input's rows, input index → label)
# → each row's class as `pipeline.rollout_evidence.decisions_of` numbers the model's decisions, or
# `pipeline.gate.NO_LABEL` (-1) where its input has no label or the label says nothing of it.
RowLabels = Callable[[np.ndarray, np.ndarray, Mapping[int, Any]], np.ndarray]


@cache
def list_adapter(model: type[BaseModel]) -> TypeAdapter[list[BaseModel]]:
    """A validator of a list of `model` objects (a type known only at run time); built once
    per model, as building one costs more than validating a one-input batch."""
    # A type built at run time: pydantic takes it, mypy cannot see a variable as a type form.
    item_list: Any = types.GenericAlias(list, (model,))
    return TypeAdapter(item_list)


@dataclass(frozen=True)
class TrainedModel:
    """What a model's `train` returns: the fitted estimator and its held-out metrics.

    `reference` (rows x features, normally the training rows) gives the drift
    reference profile stored in the manifest; `reference_scores` are the output
    scores of those rows (e.g. out-of-fold, as a model's scores on its own training
    rows are over-confident), by default the model's own. `config` holds values
    chosen at training time that the pipeline reads back from the manifest (e.g. an
    operating threshold).
    """

    estimator: Any
    metrics: dict[str, float] = field(default_factory=dict)
    reference: np.ndarray | None = None
    reference_scores: np.ndarray | None = None
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """One model of a pipeline, served on Celery queue `model.<name>`.

    `predict(estimator, X)` takes a float32 array (rows x `n_features`) and returns
    an array (rows x `n_outputs`); `chunk_size` is the most rows one sub-task
    carries, so one predict call is vectorised over that many rows.
    `feature_names` name the input columns (default `x0`, `x1`, ...), `score` maps
    output rows to the one score whose drift is watched (default: the first column),
    and the output columns in `label_columns` must hold one of `labels`.
    """

    name: str
    n_features: int
    n_outputs: int
    train: Callable[[], TrainedModel]
    predict: Callable[[Any, np.ndarray], np.ndarray]
    chunk_size: int = 1000
    max_attempts: int = 3
    # Each output row is a probability distribution (checked by the worker's guardrail).
    probabilities: bool = False
    feature_names: tuple[str, ...] = ()
    score: Callable[[np.ndarray], np.ndarray] | None = None
    label_columns: tuple[int, ...] = ()
    labels: tuple[float, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """The input feature names, in column order."""
        return self.feature_names or tuple(f"x{i}" for i in range(self.n_features))

    def output_score(self, output: np.ndarray) -> np.ndarray:
        """The watched score (one per row) of output rows (rows x n_outputs)."""
        return self.score(output) if self.score is not None else output[:, 0]


@dataclass(frozen=True)
class ModelRows:
    """The rows one model must score for a group of inputs.

    `items[i]` is the index (within the group passed to `split`) of the input
    that row `X[i]` came from; rows must be in non-decreasing item order.
    """

    X: np.ndarray
    items: np.ndarray
    # True when `X` is the page's own `InputPage.X`, one row per input in order: the
    # sub-tasks then carry no copy of the rows; the worker's claim reads them from the
    # stored input pages (a feature-vector pipeline whose models score its inputs as they are).
    of_inputs: bool = False


def joined_rows(parts: Sequence[tuple[int, dict[str, ModelRows]]]) -> dict[str, ModelRows]:
    """One split of consecutive groups of inputs from the splits of each: `parts` are
    (the group's first input within the whole, its split), in input order."""
    joined = {}
    for name in dict.fromkeys(name for _, split in parts for name in split):
        pieces = [(offset, split[name]) for offset, split in parts if name in split and len(split[name].X)]
        if not pieces:
            continue
        joined[name] = ModelRows(
            np.concatenate([rows.X for _, rows in pieces]),
            np.concatenate([np.asarray(rows.items) + offset for offset, rows in pieces]),
            of_inputs=all(rows.of_inputs for _, rows in pieces),
        )
    return joined


@dataclass(frozen=True)
class InputPage:
    """Inputs `first` .. `first + count - 1` of a batch, as stored.

    `X`: the feature rows of a feature-vector pipeline (stored, and read back, as float32),
    else None.
    `data`: per input, the whole item (JSON-able) or, for a feature-vector pipeline,
    its other fields (`extras_model`); None when a feature-vector pipeline's inputs
    set no other field. A page as stored (and as the client stores it) keeps it as its
    JSON text (`JsonArray`), validated from the text by `Pipeline.page_items`.
    `items`: the inputs as objects, while the client validates them (`Pipeline.page_items`
    then gives them as they are); None on a page it stores or reads back.
    `split`: the pipeline's `split_page` of the page, made by the client while it had the
    objects (the split of the stored page would validate every input again); None when
    not made.
    """

    first: int
    count: int
    X: np.ndarray | None
    data: list[Any] | JsonArray | None
    items: list[BaseModel] | None = None
    split: dict[str, ModelRows] | None = None

    def cut(self, start: int, stop: int) -> InputPage:
        """Inputs `start` .. `stop - 1` of this page (the page itself when that is all of it),
        without its `items` and `split`."""
        if start == self.first and stop == self.first + self.count:
            return self
        lo, hi = start - self.first, stop - self.first
        X = None if self.X is None else self.X[lo:hi]
        return InputPage(start, stop - start, X, None if self.data is None else self.data[lo:hi])

    def packed(self) -> InputPage:
        """This page with its features as stored: float32 little-endian, row-major (the split
        of the client's own pages then sees what a split of the stored ones would)."""
        if self.X is None:
            return self
        return replace(self, X=np.ascontiguousarray(self.X, dtype="<f4"))

    @classmethod
    def from_stored(
        cls, first: int, count: int, features: bytes | None, data: str | None, n_features: int
    ) -> InputPage:
        """The page of the stored columns: `features` (float32 little-endian, row-major),
        `data` (the JSON array's text)."""
        X = None if features is None else np.frombuffer(features, dtype="<f4").reshape(count, n_features)
        return cls(first, count, X, None if data is None else JsonArray(data))


@dataclass(frozen=True)
class PageOutputs:
    """One model's output rows for the inputs of one page: `rows` (rows x n_outputs) and,
    per row, the index within the page of the input it belongs to (non-decreasing).
    Only rows of succeeded sub-tasks are here."""

    rows: np.ndarray
    items: np.ndarray

    def of(self, index: int) -> np.ndarray:
        """The rows of the page's input `index` (possibly none)."""
        lo, hi = np.searchsorted(self.items, (index, index + 1))
        return self.rows[lo:hi]

    def bounds(self, count: int) -> np.ndarray:
        """For inputs 0 .. `count` - 1, where each one's rows start, then the end of the last:
        input i's rows are `rows[bounds[i]:bounds[i + 1]]`."""
        return np.searchsorted(self.items, np.arange(count + 1))


class Kpis(ABC):
    """Accumulates a pipeline's business KPIs over one batch, one input at a time."""

    def add(self, item: BaseModel, result: dict[str, Any] | None) -> None:
        """Count one input; `result` is None when the input has no result (failed).
        Called by the default `Pipeline.aggregate_page`; a pipeline that overrides that
        counts its pages its own way."""
        raise NotImplementedError(f"{type(self).__name__} counts pages, not single inputs")

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """Return the KPIs as a JSON-able dict (reports also call it before any `add`,
        to learn the KPIs' order)."""


class MonitoringConfig(BaseModel):
    """What a pipeline's alerts hold it to (docs/monitoring.md, "Alerts").

    `kpi_floors`: per realised KPI (a key of `Pipeline.realised_kpis`), the lowest value
    a window may have before a `realised_kpi` alert opens. `latency_p95_budget_s`: the
    longest p95 of the batches' end-to-end latency a window may have before a `latency`
    alert opens. `min_labelled`: the fewest labelled inputs a window needs before its
    realised KPIs are judged against the floors.
    """

    kpi_floors: dict[str, float] = Field(default_factory=dict)
    latency_p95_budget_s: float = Field(default=60.0, gt=0)
    min_labelled: int = Field(default=100, ge=1)


@dataclass(frozen=True)
class Estimation:
    """What a pipeline's performance without labels (CBPE, docs/monitoring.md) estimates.

    `model`: the model whose version's manifest holds the calibration
    (`config["cbpe_calibration"]`) and whose window contribution carries the estimate.
    `kpis`: per CBPE figure (`accuracy`; `recall` and `false_positive_rate` of a binary
    decision), the realised KPI (a key of `Pipeline.realised_kpis`) it estimates: the
    estimate is shown under that name beside the realised value and held to its floor.
    """

    model: str
    kpis: dict[str, str]


class Pipeline(ABC):
    """A named fan-out / aggregate job. Subclass it, then register the class.

    The per-item hooks (`split`, `aggregate`, `Kpis.add`) are all a pipeline needs.
    The batch is processed a page of inputs at a time through `split_page` and
    `aggregate_page`, whose defaults call the per-item hooks; a pipeline overrides
    them with vectorised code when per-item Python would dominate.

    A pipeline whose input is one feature vector names its features in
    `feature_names` (and the other fields of an input in `extras_model`) and
    implements `item_parts` / `make_item`: `Client.submit` then also takes a 2-D
    array or a DataFrame with those columns, validated and stored without a Python
    object per row. `drift` says how its batches' PSIs are judged; `monitoring`, what its
    windows' alerts hold it to; `label_type`, the ground truth it takes after a batch.
    """

    name: ClassVar[str]
    input_model: ClassVar[type[BaseModel]]
    models: ClassVar[tuple[ModelSpec, ...]]
    feature_names: ClassVar[tuple[str, ...]] = ()
    extras_model: ClassVar[type[BaseModel] | None] = None
    drift: ClassVar[DriftConfig] = DriftConfig()
    monitoring: ClassVar[MonitoringConfig] = MonitoringConfig()
    # The type of one input's ground truth, validated strictly (`true`, "1" and 1.0 are not
    # the label 1); None: the pipeline takes no labels. See `label_counts`.
    label_type: ClassVar[Any] = None
    # What its CBPE estimates (see `estimate_scores`); None: its performance is not estimated.
    estimation: ClassVar[Estimation | None] = None

    def item_parts(self, item: BaseModel) -> tuple[list[float], dict[str, Any]]:
        """A feature-vector pipeline's input as (its features in `feature_names` order,
        its other fields that differ from their defaults, as JSON)."""
        raise NotImplementedError(f"pipeline {self.name!r} has no feature vector")

    def make_item(self, features: list[float], extras: dict[str, Any]) -> BaseModel:
        """The inverse of `item_parts`: the input model object of one stored row."""
        raise NotImplementedError(f"pipeline {self.name!r} has no feature vector")

    @cached_property
    def items_adapter(self) -> TypeAdapter[list[BaseModel]]:
        """Validates a list of this pipeline's inputs."""
        return list_adapter(self.input_model)

    def page_items(self, page: InputPage) -> list[BaseModel]:
        """The page's inputs as input model objects (they were validated on submit)."""
        if page.items is not None:
            return page.items
        if page.X is None:
            if isinstance(page.data, JsonArray):
                # From the text: no Python object per value before validation.
                return self.items_adapter.validate_json(page.data.text)
            return self.items_adapter.validate_python(page.data)
        extras = page.data if page.data is not None else [{}] * page.count
        return [self.make_item(row, extra) for row, extra in zip(page.X.tolist(), extras)]

    def with_features(self, page: InputPage) -> InputPage:
        """The page of a feature-vector pipeline with its features in `X`, also when it holds
        whole items (pages converted from the per-input table of migrations before 0004)."""
        if not self.feature_names or page.X is not None:
            return page
        rows, extras = zip(*(self.item_parts(item) for item in self.page_items(page)))
        return InputPage(page.first, page.count, np.asarray(rows, dtype="<f4"), list(extras) if any(extras) else None)

    def split_page(self, page: InputPage) -> dict[str, ModelRows]:
        """For each model name, the rows it must score for the page's inputs (`items`
        are indices within the page). Default: `split` of the page's items."""
        return self.split(self.page_items(page))

    def aggregate_page(
        self, page: InputPage, outputs: dict[str, PageOutputs], errors: list[str | None], kpis: Kpis
    ) -> list[str | None]:
        """Return, per input of the page, its result as JSON text, or None for an input
        without one; count every input into `kpis`.

        `errors[i]` is set for an input that has no result because a sub-task of it
        failed; the method records there why any other input has none. Default:
        `aggregate` per input, where an error on one input does not lose the others.
        """
        results: list[str | None] = []
        # Each input's rows as one slice per model: the bounds of every input in one search.
        bounds = {name: output.bounds(page.count).tolist() for name, output in outputs.items()}
        for index, item in enumerate(self.page_items(page)):
            result = text = None
            if errors[index] is None:
                rows = {}
                for name, output in outputs.items():
                    lo, hi = bounds[name][index], bounds[name][index + 1]
                    if lo < hi:
                        rows[name] = output.rows[lo:hi]
                try:
                    result = self.aggregate(item, rows)
                    # Strict JSON (no NaN or infinity, which the ledger's json refuses): a result
                    # that is not JSON is this input's error, not the page's.
                    text = None if result is None else json.dumps(result, allow_nan=False)
                except Exception as error:  # noqa: BLE001 - a pipeline bug on one input must not lose the others
                    errors[index] = f"aggregate failed: {type(error).__name__}: {error}"
                    result = None
            kpis.add(item, result)
            results.append(text)
        return results

    def split(self, items: Sequence[BaseModel]) -> dict[str, ModelRows]:
        """Return, for each model name, the rows it must score for `items` (a pipeline
        implements this or `split_page`)."""
        raise NotImplementedError(f"pipeline {self.name!r} implements split_page, not split")

    def aggregate(self, item: BaseModel, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Return one input's JSON-able result from each model's output rows for it (a
        pipeline implements this or `aggregate_page`)."""
        raise NotImplementedError(f"pipeline {self.name!r} implements aggregate_page, not aggregate")

    @abstractmethod
    def kpis(self) -> Kpis:
        """Return a fresh KPI accumulator for one batch."""

    def example_inputs(self, count: int, seed: int = 0) -> list[Any]:
        """Return `count` valid inputs, the same for the same `seed`: what `make bench
        BENCH_ARGS="--pipeline NAME"` submits for a pipeline it has no workload of its own for."""
        raise NotImplementedError(f"pipeline {self.name!r} has no example inputs")

    def estimate_scores(
        self, page: InputPage, outputs: dict[str, PageOutputs], results: list[str | None]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A page's CBPE scores, from its model outputs and results (None: no result): per
        unit the estimate counts (an input, or a row such as a digit) of the inputs with a
        result, the score its `estimation.model`'s calibration maps (a classifier's top
        probability), and, for a binary decision, whether it was decided positive (else
        None). A pipeline with an `estimation` implements this."""
        raise NotImplementedError(f"pipeline {self.name!r} estimates no performance")

    def label_counts(self, outputs: Sequence[dict[str, Any] | None], labels: Sequence[Any]) -> dict[str, int]:
        """Count labelled inputs' outcomes: `outputs[i]` is the stored result of the input
        labelled `labels[i]` (None when it has none). Counts of several batches add up, and
        `realised_kpis` turns any sum of them into KPIs. A pipeline with a `label_type`
        implements this and `realised_kpis`."""
        raise NotImplementedError(f"pipeline {self.name!r} takes no labels")

    def realised_kpis(self, counts: dict[str, int]) -> dict[str, float | None]:
        """The KPIs realised on labelled inputs from (summed) `label_counts`, with
        `accuracy` among them (None where nothing was counted)."""
        raise NotImplementedError(f"pipeline {self.name!r} takes no labels")

    def row_labels(self, model: str) -> RowLabels | None:
        """How a roll-out's gate maps this pipeline's stored labels (of `label_type`, per
        input) to `model`'s rows, for its KPI checks: a `RowLabels` function, or None when
        the model's decisions have no ground truth in the labels. Default: None (the gate
        judges the model without labels)."""
        return None

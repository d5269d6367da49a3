"""What a pipeline is: its input model, how it splits an input into model rows,
the models it needs, how it puts one input's answers back together, and its KPIs.

A pipeline is one module holding a `Pipeline` subclass; see `pipeline/pipelines/digits.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from pipeline.profile import DriftConfig


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


class Kpis(ABC):
    """Accumulates a pipeline's business KPIs over one batch, one input at a time."""

    @abstractmethod
    def add(self, item: BaseModel, result: dict[str, Any] | None) -> None:
        """Count one input; `result` is None when the input has no result (failed)."""

    @abstractmethod
    def summary(self) -> dict[str, Any]:
        """Return the KPIs as a JSON-able dict (reports also call it before any `add`,
        to learn the KPIs' order)."""


class Pipeline(ABC):
    """A named fan-out / aggregate job. Subclass it, then register the class.

    A pipeline whose input is one feature vector names its features in
    `feature_names` and implements `item_from_row`: `Client.submit` then also takes
    a 2-D array or a DataFrame with those columns. `drift` says how its batches'
    PSIs are judged.
    """

    name: ClassVar[str]
    input_model: ClassVar[type[BaseModel]]
    models: ClassVar[tuple[ModelSpec, ...]]
    feature_names: ClassVar[tuple[str, ...]] = ()
    drift: ClassVar[DriftConfig] = DriftConfig()

    def item_from_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Return the input item of one row of a submitted table; `row` maps each column
        name (the `feature_names`, plus any other column of a DataFrame) to its value."""
        raise NotImplementedError(f"pipeline {self.name!r} does not take tables")

    @abstractmethod
    def split(self, items: Sequence[BaseModel]) -> dict[str, ModelRows]:
        """Return, for each model name, the rows it must score for `items`."""

    @abstractmethod
    def aggregate(self, item: BaseModel, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Return one input's JSON-able result from each model's output rows for it."""

    @abstractmethod
    def kpis(self) -> Kpis:
        """Return a fresh KPI accumulator for one batch."""

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


@dataclass(frozen=True)
class TrainedModel:
    """What a model's `train` returns: the fitted estimator and its held-out metrics."""

    estimator: Any
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """One model of a pipeline, served on Celery queue `model.<name>`.

    `predict(estimator, X)` takes a float32 array (rows x `n_features`) and returns
    an array (rows x `n_outputs`); `chunk_size` is the most rows one sub-task
    carries, so one predict call is vectorised over that many rows.
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
        """Return the KPIs as a JSON-able dict."""


class Pipeline(ABC):
    """A named fan-out / aggregate job. Subclass it, then register the class."""

    name: ClassVar[str]
    input_model: ClassVar[type[BaseModel]]
    models: ClassVar[tuple[ModelSpec, ...]]

    @abstractmethod
    def split(self, items: Sequence[BaseModel]) -> dict[str, ModelRows]:
        """Return, for each model name, the rows it must score for `items`."""

    @abstractmethod
    def aggregate(self, item: BaseModel, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Return one input's JSON-able result from each model's output rows for it."""

    @abstractmethod
    def kpis(self) -> Kpis:
        """Return a fresh KPI accumulator for one batch."""

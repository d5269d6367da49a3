"""Test-only pipelines, registered for the whole test run through PIPELINE_PIPELINES
(see conftest.py), so worker and aggregator processes know them too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, StrictFloat
from sklearn.linear_model import LogisticRegression

from pipeline.definition import Kpis, ModelRows, ModelSpec, Pipeline, TrainedModel
from pipeline.errors import SplitError

POISON = -1.0
BAD_OUTPUT = -2.0
UNSPLITTABLE = -3.0


class Point(BaseModel):
    """Four numbers; a first value of -1 makes the model raise on every attempt, -2 makes
    it return NaN (a guardrail violation, which is not retried), -3 makes the split raise."""

    values: list[StrictFloat] = Field(min_length=4, max_length=4)


def _train() -> TrainedModel:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    return TrainedModel(LogisticRegression().fit(X, X[:, 1] > 0))


def _predict(model: Any, X: np.ndarray) -> np.ndarray:
    if (X[:, 0] == POISON).any():
        raise RuntimeError("poison row: this model cannot score it")
    probabilities = model.predict_proba(X)
    probabilities[X[:, 0] == BAD_OUTPUT] = np.nan
    return probabilities


class CountingKpis(Kpis):
    def __init__(self) -> None:
        self.answered = 0

    def add(self, item: BaseModel, result: dict[str, Any] | None) -> None:
        self.answered += result is not None

    def summary(self) -> dict[str, Any]:
        return {"answered": self.answered}


class PoisonPipeline(Pipeline):
    """One row per input on one model, one row per sub-task (chunk size 1)."""

    name = "poison"
    input_model = Point
    models = (ModelSpec("poison-model", 4, 2, _train, _predict, chunk_size=1, max_attempts=3, probabilities=True),)

    def split(self, items: Sequence[BaseModel]) -> dict[str, ModelRows]:
        X = np.array([item.values for item in items], dtype=np.float32)  # type: ignore[attr-defined]
        if (X[:, 0] == UNSPLITTABLE).any():
            raise SplitError("an unsplittable point")
        return {"poison-model": ModelRows(X, np.arange(len(items)))}

    def aggregate(self, item: BaseModel, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"p": float(outputs["poison-model"][0, 1])}

    def kpis(self) -> Kpis:
        return CountingKpis()

"""A test-only pipeline whose model returns invalid probabilities for some rows,
registered for the whole test run through PIPELINE_PIPELINES (see conftest.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from sklearn.linear_model import LogisticRegression

from pipeline.definition import Kpis, ModelRows, ModelSpec, Pipeline, TrainedModel
from tests.pipelines import CountingKpis

MODEL = "guarded-model"


class Values(BaseModel):
    """Four numbers; a first value above 100 makes the model return probabilities outside [0, 1]."""

    values: list[float] = Field(min_length=4, max_length=4)


def _train() -> TrainedModel:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    return TrainedModel(LogisticRegression().fit(X, X[:, 1] > 0), reference=X)


def _predict(model: Any, X: np.ndarray) -> np.ndarray:
    probabilities = model.predict_proba(X)
    probabilities[X[:, 0] > 100] = [1.5, -0.5]
    return probabilities


class BadProbabilityPipeline(Pipeline):
    """One row per input, one row per sub-task (chunk size 1)."""

    # Sorts after "digits": a test matches the start of the list of known pipelines.
    name = "guarded"
    input_model = Values
    models = (ModelSpec(MODEL, 4, 2, _train, _predict, chunk_size=1, probabilities=True),)

    def split(self, items: Sequence[BaseModel]) -> dict[str, ModelRows]:
        X = np.array([item.values for item in items], dtype=np.float32)  # type: ignore[attr-defined]
        return {MODEL: ModelRows(X, np.arange(len(items)))}

    def aggregate(self, item: BaseModel, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"p": float(outputs[MODEL][0, 1])}

    def kpis(self) -> Kpis:
        return CountingKpis()

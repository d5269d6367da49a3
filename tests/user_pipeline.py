"""A pipeline as a user would write it: only the public extension API (`from pipeline
import ...`), the per-input hooks (`split`, `aggregate`, `Kpis.add`) and JSON items, no
vectorised page hooks. Registered for the test run through `PIPELINE_PIPELINES`
(tests/conftest.py); benchmark it with

    PIPELINE_PIPELINES=tests.user_pipeline:ShipmentsPipeline make bench BENCH_ARGS="--pipeline shipments"

A shipment is 1..MAX_PARCELS parcels; every parcel is one row for two models, a cost
regression and a damage-risk classifier; the result is the shipment's total cost, its
riskiest parcel and whether it needs special handling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from sklearn.linear_model import LogisticRegression, Ridge

from pipeline import Kpis, ModelRows, ModelSpec, Pipeline, TrainedModel

COST = "shipment-cost"
RISK = "shipment-risk"
MAX_PARCELS = 12
# A shipment whose riskiest parcel is above this damage probability is handled specially.
HANDLING_RISK = 0.5
FEATURES = ("weight_kg", "length_cm", "width_cm", "height_cm", "fragile")


class Parcel(BaseModel):
    weight_kg: float = Field(gt=0, le=100)
    length_cm: float = Field(gt=0, le=200)
    width_cm: float = Field(gt=0, le=200)
    height_cm: float = Field(gt=0, le=200)
    fragile: bool = False


class Shipment(BaseModel):
    reference: str = Field(min_length=1, max_length=40)
    parcels: list[Parcel] = Field(min_length=1, max_length=MAX_PARCELS)


def _random_parcels(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` parcel rows (FEATURES order), plausible sizes and weights."""
    return np.column_stack(
        [
            rng.uniform(0.1, 30, count),
            rng.uniform(5, 120, count),
            rng.uniform(5, 80, count),
            rng.uniform(2, 60, count),
            rng.random(count) < 0.2,
        ]
    )


def _training_rows() -> np.ndarray:
    return _random_parcels(np.random.default_rng(0), 2000)


def _train_cost() -> TrainedModel:
    X = _training_rows()
    volume_l = X[:, 1] * X[:, 2] * X[:, 3] / 1000
    cost = 4 + 0.8 * X[:, 0] + 0.05 * volume_l + 3 * X[:, 4] + np.random.default_rng(1).normal(0, 0.5, len(X))
    return TrainedModel(Ridge(alpha=1.0).fit(X, cost), reference=X)


def _train_risk() -> TrainedModel:
    X = _training_rows()
    logit = -3 + 0.08 * X[:, 0] + 2.5 * X[:, 4]
    damaged = np.random.default_rng(2).random(len(X)) < 1 / (1 + np.exp(-logit))
    return TrainedModel(LogisticRegression(max_iter=1000).fit(X, damaged), reference=X)


def _predict_cost(model: Any, X: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(X)).reshape(-1, 1)


def _predict_risk(model: Any, X: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict_proba(X))


class ShipmentKpis(Kpis):
    def __init__(self) -> None:
        self.shipments = self.special = 0
        self.total_cost = 0.0

    def add(self, item: BaseModel, result: dict[str, Any] | None) -> None:
        if result is None:
            return
        self.shipments += 1
        self.special += result["special_handling"]
        self.total_cost += result["total_cost"]

    def summary(self) -> dict[str, Any]:
        return {
            "shipments": self.shipments,
            "special_handling_rate": self.special / self.shipments if self.shipments else None,
            "total_cost": round(self.total_cost, 2),
        }


class ShipmentsPipeline(Pipeline):
    name = "shipments"
    input_model = Shipment
    models = (
        ModelSpec(COST, len(FEATURES), 1, _train_cost, _predict_cost, chunk_size=5000, feature_names=FEATURES),
        ModelSpec(
            RISK,
            len(FEATURES),
            2,
            _train_risk,
            _predict_risk,
            chunk_size=5000,
            probabilities=True,
            feature_names=FEATURES,
            score=lambda output: output[:, 1],
        ),
    )

    def split(self, items: Sequence[BaseModel]) -> dict[str, ModelRows]:
        rows = []
        owners = []
        for index, item in enumerate(items):
            assert isinstance(item, Shipment)
            for parcel in item.parcels:
                rows.append([parcel.weight_kg, parcel.length_cm, parcel.width_cm, parcel.height_cm, parcel.fragile])
                owners.append(index)
        parcels = ModelRows(np.asarray(rows, dtype=np.float32), np.asarray(owners, dtype=np.int64))
        return {COST: parcels, RISK: parcels}

    def aggregate(self, item: BaseModel, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        assert isinstance(item, Shipment)
        costs = outputs[COST][:, 0]
        risks = outputs[RISK][:, 1]
        riskiest = int(risks.argmax())
        return {
            "reference": item.reference,
            "total_cost": round(float(costs.sum()), 2),
            "riskiest_parcel": riskiest,
            "damage_risk": round(float(risks[riskiest]), 4),
            "special_handling": bool(risks[riskiest] > HANDLING_RISK),
        }

    def kpis(self) -> Kpis:
        return ShipmentKpis()

    def example_inputs(self, count: int, seed: int = 0) -> list[Any]:
        rng = np.random.default_rng(seed)
        sizes = rng.integers(1, MAX_PARCELS + 1, count)
        rows = _random_parcels(rng, int(sizes.sum())).tolist()
        shipments = []
        start = 0
        for number, size in enumerate(sizes.tolist()):
            parcels = [dict(zip(FEATURES, row, strict=True)) for row in rows[start : start + size]]
            for parcel in parcels:
                parcel["fragile"] = bool(parcel["fragile"])
            shipments.append({"reference": f"S{seed}-{number}", "parcels": parcels})
            start += size
        return shipments

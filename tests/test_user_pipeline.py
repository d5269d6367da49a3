"""A user-style pipeline (tests/user_pipeline.py: public extension API, JSON items, two
models, per-input hooks) runs end to end through the real worker and aggregator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import load_verified
from pipeline.client import Client
from tests.helpers import Processes
from tests.user_pipeline import COST, FEATURES, HANDLING_RISK, RISK, ShipmentsPipeline

pytestmark = pytest.mark.services
SHIPMENTS = 40


def test_user_pipeline_runs_end_to_end(client: Client, models_dir: Path, stack: Processes) -> None:
    shipments = ShipmentsPipeline().example_inputs(SHIPMENTS, seed=3)
    batch = client.submit("shipments", shipments)
    status = batch.wait(timeout=120)
    assert status.state == "succeeded", status.error
    results = [result.output for result in batch.results()]

    # What the models give for every parcel, computed here with the same artifacts.
    cost_model, _ = load_verified(models_dir, COST)
    risk_model, _ = load_verified(models_dir, RISK)
    expected_special = 0
    for shipment, result in zip(shipments, results, strict=True):
        X = np.asarray([[float(parcel[f]) for f in FEATURES] for parcel in shipment["parcels"]], dtype=np.float32)
        risks = risk_model.predict_proba(X)[:, 1]
        assert result is not None and result["reference"] == shipment["reference"]
        assert result["total_cost"] == pytest.approx(float(cost_model.predict(X).sum()), abs=0.01)
        assert result["riskiest_parcel"] == int(risks.argmax())
        assert result["special_handling"] == bool(risks.max() > HANDLING_RISK)
        expected_special += result["special_handling"]
    kpis = status.metrics["kpis"]
    assert kpis["shipments"] == SHIPMENTS
    assert kpis["special_handling_rate"] == pytest.approx(expected_special / SHIPMENTS)

"""CBPE (pipeline/estimation.py): on held-out digits the realised accuracy lies inside the
estimate's band, and a model without calibration is refused with one clear error."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import EstimationError
from pipeline.estimation import binary_sums, estimated_kpis, multiclass_sums
from pipeline.pipelines import digits

BATCHES = 2000
BATCH_INPUTS = 500


def test_realised_accuracy_lies_in_the_estimated_band_on_held_out_batches() -> None:
    trained = digits._train_classifier()
    calibration = trained.config["cbpe_calibration"]
    _, X_test, _, y_test = digits.dataset_split()
    probabilities = trained.estimator.predict_proba(X_test)
    rng = np.random.default_rng(14)
    inside = 0
    for _ in range(BATCHES):
        rows = rng.integers(0, len(X_test), BATCH_INPUTS)
        band = estimated_kpis(multiclass_sums(probabilities[rows], calibration), calibration["rows"])["accuracy"]
        realised = float((probabilities[rows].argmax(axis=1) == y_test[rows]).mean())
        inside += band["low"] <= realised <= band["high"]
    assert inside / BATCHES >= 0.90


def test_binary_estimates_match_known_probabilities() -> None:
    # Decided positive exactly when p >= 0.5; expected recall = sum(p | decided) / sum(p).
    p = np.array([0.9, 0.8, 0.3, 0.1])
    estimated = estimated_kpis(binary_sums(p, p >= 0.5), calibration_rows=1e9)
    assert estimated["recall"]["value"] == pytest.approx(1.7 / 2.1)
    assert estimated["false_positive_rate"]["value"] == pytest.approx(0.3 / 1.9)
    assert estimated["accuracy"]["value"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.9) / 4)
    assert estimated["recall"]["low"] < estimated["recall"]["value"] < estimated["recall"]["high"]


def test_a_model_without_calibration_is_refused() -> None:
    with pytest.raises(EstimationError, match="stores no CBPE calibration"):
        multiclass_sums(np.full((3, 2), 0.5), None)
    with pytest.raises(EstimationError, match="one probability in \\[0, 1\\] and one decision per input"):
        binary_sums(np.array([1.5]), np.array([True]))

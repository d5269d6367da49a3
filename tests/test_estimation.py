"""CBPE (pipeline/estimation.py): on held-out digits and screening records the realised
KPIs lie inside the estimate's band, the aggregator's binned scores give the same sums as
the scores themselves, and a model without calibration is refused with one clear error."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pipeline.definition import Estimation
from pipeline.errors import EstimationError
from pipeline.estimation import (
    ScoreCounts,
    binary_sums,
    calibrated,
    estimated_kpis,
    fit_calibration,
    multiclass_sums,
)
from pipeline.pipelines import digits, screening
from pipeline.registry import check_estimation

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


# Screening has 569 records: 398 train the models (and their calibration), 171 are held out.
SPLITS = 1000


def _screening_votes() -> tuple[np.ndarray, np.ndarray, float]:
    """Every record's soft vote from models that did not train on it (out of fold for the
    training rows, the shipped models for the held-out ones), whether it is malignant, and
    the operating threshold."""
    _, X_test, y_train, y_test = screening.dataset_split()
    threshold = screening._train(screening.LOGREG).config["operating_threshold"]
    shipped = screening._fitted().values()
    held_out = np.mean([model.predict_proba(X_test)[:, screening.MALIGNANT] for model in shipped], axis=0)
    vote = np.concatenate([np.mean(list(screening._out_of_fold().values()), axis=0), held_out])
    return vote, np.concatenate([y_train, y_test]) == screening.MALIGNANT, threshold


def _realised(decided: np.ndarray, malignant: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float((decided == malignant).mean()),
        "recall": float(decided[malignant].mean()),
        "false_positive_rate": float(decided[~malignant].mean()),
    }


def _screening_coverage(batch_inputs: int | None) -> dict[str, float]:
    """Per CBPE figure, the share of simulated batches whose realised value lies in the band:
    each split calibrates (as training does) on 398 records' votes and draws a batch from
    the other 171 (all of them once, or `batch_inputs` with replacement)."""
    vote, malignant, threshold = _screening_votes()
    rng = np.random.default_rng(14)
    inside = dict.fromkeys(("accuracy", "recall", "false_positive_rate"), 0)
    for _ in range(SPLITS):
        order = rng.permutation(len(vote))
        fitted, evaluated = order[:398], order[398:]
        if batch_inputs is not None:
            evaluated = rng.choice(evaluated, batch_inputs)
        calibration = fit_calibration(vote[fitted], malignant[fitted], method="sigmoid")
        decided = vote[evaluated] >= threshold
        band = estimated_kpis(binary_sums(calibrated(vote[evaluated], calibration), decided), calibration["rows"])
        for metric, value in _realised(decided, malignant[evaluated]).items():
            inside[metric] += band[metric]["low"] <= value <= band[metric]["high"]
    return {metric: count / SPLITS for metric, count in inside.items()}


def test_screening_estimates_cover_realised_on_independent_held_out_batches() -> None:
    # Batches of 171 distinct records, none seen by the calibration: what a served batch is.
    coverage = _screening_coverage(None)
    assert min(coverage.values()) >= 0.90, coverage


def test_binned_scores_give_the_sums_of_the_scores() -> None:
    rng = np.random.default_rng(3)
    scores = rng.uniform(0, 1, 5000)
    calibration = fit_calibration(scores, rng.uniform(0, 1, 5000) < scores, method="sigmoid")
    decided = scores >= 0.4
    counts = ScoreCounts()
    counts.add(scores[:2000], decided[:2000])
    counts.add(scores[2000:], decided[2000:])
    exact = binary_sums(calibrated(scores, calibration), decided)
    assert counts.sums(calibration) == pytest.approx(exact, rel=1e-4)
    top_class = ScoreCounts()
    top_class.add(scores, None)
    right = calibrated(scores, calibration)
    assert top_class.sums(calibration) == pytest.approx(
        {"accuracy.n": 5000, "accuracy.right": right.sum(), "accuracy.variance": (right * (1 - right)).sum()}, rel=1e-4
    )


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
    with pytest.raises(EstimationError, match="one score in \\[0, 1\\]"):
        ScoreCounts().add(np.array([1.5]), None)


class _NoProbabilities(digits.DigitsPipeline):
    name = "digits-ood-estimated"
    # The OOD guard gives a score and a flag, not probabilities: it cannot be estimated.
    estimation = Estimation(digits.OOD_GUARD, {"accuracy": "digit_accuracy"})


def test_a_pipeline_asking_cbpe_of_a_model_without_probabilities_is_refused() -> None:
    with pytest.raises(EstimationError) as refused:
        check_estimation(_NoProbabilities())
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        "pipeline 'digits-ood-estimated' asks for CBPE of model 'digit-ood', which is not one of its models"
        " giving probabilities: its performance cannot be estimated"
    )


def test_a_manifest_with_a_calibration_of_another_format_has_none() -> None:
    """A model trained before the calibration's current format is not estimated (the batch
    says why) rather than failing its aggregate."""
    from datetime import UTC, datetime

    from pipeline.artifacts import Manifest
    from pipeline.estimation import calibration_of

    def manifest(config: dict[str, Any]) -> Manifest:
        return Manifest(
            name="m", version="v", sha256="0" * 64, file="m.skops", trained_at=datetime.now(UTC),
            metrics={}, trusted_types=[], config=config,
        )  # fmt: skip

    old = {"cbpe_calibration": {"confidence": [0.1, 0.9], "right": [0.2, 0.8]}}
    assert calibration_of(manifest(old)) is None
    assert calibration_of(manifest({})) is None
    assert calibration_of(None) is None
    current = {"cbpe_calibration": {"score": [0.0, 1.0], "probability": [0.1, 0.9], "rows": 10}}
    assert calibration_of(manifest(current)) == current["cbpe_calibration"]

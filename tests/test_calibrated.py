"""`calibrated_proba` gives scikit-learn's calibrated probabilities (no services)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from pipeline.calibrated import calibrated_proba


@pytest.mark.parametrize("rows", [1, 3, 500])
@pytest.mark.parametrize("ensemble", [True, False])
def test_isotonic_multiclass_probabilities_are_scikit_learns(rows: int, ensemble: bool) -> None:
    X, y = load_digits(return_X_y=True)
    model = CalibratedClassifierCV(SVC(gamma=0.001), method="isotonic", ensemble=ensemble).fit(X[:1000], y[:1000])
    # Rows outside the calibrators' range too: the clip.
    unseen = np.vstack([X[1000:], X[1000:] * 3]).astype(np.float32)[:rows]
    assert np.array_equal(calibrated_proba(model, unseen), model.predict_proba(unseen))


def test_one_row_calls_calibrate_as_scikit_learn_inside_and_outside_the_range() -> None:
    X, y = load_digits(return_X_y=True)
    model = CalibratedClassifierCV(SVC(gamma=0.001), method="isotonic", ensemble=True).fit(X[:1000], y[:1000])
    rows = np.vstack([X[1000:1030], X[1000:1030] * 3, -X[1000:1010]]).astype(np.float32)
    ours = np.concatenate([calibrated_proba(model, row[None, :]) for row in rows])
    assert np.array_equal(ours, model.predict_proba(rows))


@pytest.mark.parametrize("n_classes", [3, 10])
def test_one_vs_rest_of_an_svc_is_scikit_learns(n_classes: int) -> None:
    """Ties, zeros and signs as scikit-learn's loop over class pairs makes them."""
    from sklearn.utils.multiclass import _ovr_decision_function

    from pipeline.calibrated import _ovr_of_ovo

    rng = np.random.default_rng(7)
    pairs = n_classes * (n_classes - 1) // 2
    decisions = np.vstack([rng.normal(size=(200, pairs)), np.zeros((1, pairs)), np.full((1, pairs), -0.0)])
    decisions[:50, : pairs // 2] = 0.0
    expected = _ovr_decision_function(decisions < 0, -decisions, n_classes)
    ours = _ovr_of_ovo(decisions, n_classes)
    assert np.array_equal(ours, expected) and np.array_equal(np.signbit(ours), np.signbit(expected))


@pytest.mark.parametrize("method", ["isotonic", "sigmoid"])
def test_binary_and_other_calibrations_are_scikit_learns(method: str) -> None:
    X, y = load_breast_cancer(return_X_y=True)
    model = CalibratedClassifierCV(LogisticRegression(max_iter=5000), method=method).fit(X[:400], y[:400])
    assert np.array_equal(calibrated_proba(model, X[400:]), model.predict_proba(X[400:]))


@pytest.mark.parametrize("kernel", ["linear", "poly", "sigmoid"])
def test_libsvm_decisions_are_scikit_learns_for_each_kernel(kernel: str) -> None:
    X, y = load_digits(return_X_y=True)
    model = CalibratedClassifierCV(SVC(kernel=kernel, gamma=0.001), method="isotonic").fit(X[:600], y[:600])
    unseen = X[1000:1100].astype(np.float32)
    assert np.array_equal(calibrated_proba(model, unseen), model.predict_proba(unseen))


def test_rows_of_another_feature_count_are_refused() -> None:
    X, y = load_digits(return_X_y=True)
    model = CalibratedClassifierCV(SVC(gamma=0.001), method="isotonic").fit(X[:600], y[:600])
    with pytest.raises(ValueError, match="X has 63 features, but the SVC was fitted on 64"):
        calibrated_proba(model, X[:2, :63])

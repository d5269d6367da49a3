"""`CalibratedClassifierCV` probabilities without scikit-learn's per-call overhead, the same
numbers up to rounding.

An isotonic `CalibratedClassifierCV` with `ensemble=True` holds one calibrated copy of its
estimator per fold; each `predict_proba` call re-fits a label encoder per copy and runs one
`IsotonicRegression.predict` (input checks, a scipy `interp1d`) per class and copy: 50 calls
for 10 classes and 5 folds. On a few rows (a one-input batch) that overhead is most of the
call. Here each calibrator is the `np.interp` of its own thresholds, clipped to its range as
`out_of_bounds="clip"` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.isotonic import IsotonicRegression

# scikit-learn rounds a probability at most this far above 1 down to 1.
_ABOVE_ONE = 1e-5


def _isotonic(calibrator: IsotonicRegression, values: np.ndarray) -> np.ndarray:
    """`calibrator.predict(values)` for a calibrator fitted with `out_of_bounds="clip"`."""
    if len(calibrator.y_thresholds_) == 1:
        return np.repeat(calibrator.y_thresholds_, len(values)).astype(np.float64)
    clipped = np.clip(values, calibrator.X_min_, calibrator.X_max_)
    return np.asarray(np.interp(clipped, calibrator.X_thresholds_, calibrator.y_thresholds_), dtype=np.float64)


def _fast(model: CalibratedClassifierCV) -> bool:
    """Whether `calibrated_proba` computes `model`'s probabilities itself: isotonic
    calibrators that clip, on estimators with a decision function (what scikit-learn uses)."""
    return model.method == "isotonic" and all(
        hasattr(calibrated.estimator, "decision_function")
        and all(
            isinstance(calibrator, IsotonicRegression) and calibrator.out_of_bounds == "clip"
            for calibrator in calibrated.calibrators
        )
        for calibrated in model.calibrated_classifiers_
    )


def calibrated_proba(model: CalibratedClassifierCV, X: np.ndarray) -> Any:
    """`model.predict_proba(X)`: the mean over its calibrated copies of each copy's isotonic
    probabilities per class, normalised per row (uniform where every class is 0). Any other
    calibration is left to scikit-learn's `predict_proba`."""
    if not _fast(model):
        return model.predict_proba(X)
    n_classes = len(model.classes_)
    mean = np.zeros((len(X), n_classes), dtype=np.float64)
    for calibrated in model.calibrated_classifiers_:
        decisions = np.asarray(calibrated.estimator.decision_function(X), dtype=np.float64)
        if decisions.ndim == 1:
            decisions = decisions.reshape(-1, 1)
        proba = np.zeros((len(X), n_classes), dtype=np.float64)
        columns = np.searchsorted(model.classes_, calibrated.estimator.classes_)
        for column, values, calibrator in zip(columns, decisions.T, calibrated.calibrators, strict=False):
            # Binary: the one decision column is the positive class's (classes_[1]).
            proba[:, column + 1 if n_classes == 2 else column] = _isotonic(calibrator, values)
        if n_classes == 2:
            proba[:, 0] = 1.0 - proba[:, 1]
        else:
            total = proba.sum(axis=1, keepdims=True)
            proba = np.divide(proba, total, out=np.full_like(proba, 1 / n_classes), where=total != 0)
        proba[(proba > 1.0) & (proba <= 1.0 + _ABOVE_ONE)] = 1.0
        mean += proba
    return mean / len(model.calibrated_classifiers_)

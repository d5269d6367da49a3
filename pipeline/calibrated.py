"""`CalibratedClassifierCV` probabilities without scikit-learn's per-call overhead, the same
numbers bit for bit.

An isotonic `CalibratedClassifierCV` with `ensemble=True` holds one calibrated copy of its
estimator per fold; each `predict_proba` call re-fits a label encoder per copy and runs one
`IsotonicRegression.predict` (input checks, a scipy `interp1d`) per class and copy: 50 calls
for 10 classes and 5 folds. On a few rows (a one-input batch) that overhead is most of the
call. Here each calibrator is the `np.interp` of its own thresholds, clipped to its range as
`out_of_bounds="clip"` does; on a few rows a copy's calibrators run at once (`Isotonics`:
`timeit` of `digits`' classifier on one row, 482 → 373 µs). A multi-class `SVC` copy's
one-vs-rest decision comes from its one-vs-one decisions by a cumulative sum per class
(`_ovr_of_ovo`) instead of scikit-learn's Python loop over the 45 class pairs of 10
classes, 0.6 ms per copy on one row; and those
decisions come from libsvm directly (`_svc_ovo`), the rows converted to float64 once per
call, instead of through scikit-learn's input checks once per copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.isotonic import IsotonicRegression
from sklearn.svm import SVC, _libsvm
from sklearn.svm._base import LIBSVM_IMPL

from pipeline.forests import made_once

# scikit-learn rounds a probability at most this far above 1 down to 1.
_ABOVE_ONE = 1e-5


# Up to this many rows a calibrated copy's calibrators run at once (`Isotonics`); above, one
# `np.interp` per calibrator, whose cost per row is less than comparing each value with
# every threshold of its calibrator.
ISOTONICS_MAX_ROWS = 32


@dataclass(frozen=True)
class Isotonics:
    """A calibrated copy's isotonic calibrators (one per decision column, each fitted with
    `out_of_bounds="clip"` on strictly increasing thresholds) as padded arrays, so that a
    few rows' decisions are calibrated in a few numpy calls where each calibrator made its
    own: the same arithmetic as `np.interp`, value for value."""

    low: np.ndarray  # (columns,): each calibrator's X_min_
    high: np.ndarray  # X_max_
    xs: np.ndarray  # (columns, most thresholds): X_thresholds_, padded with +inf
    ys: np.ndarray  # y_thresholds_, padded with the last
    last: np.ndarray  # (columns,): each one's last threshold's index

    @classmethod
    def of(cls, calibrators: Sequence[IsotonicRegression]) -> Isotonics | None:
        """The calibrators packed; None when one has thresholds that do not increase strictly."""
        if any(np.any(np.diff(c.X_thresholds_) <= 0) for c in calibrators):
            return None
        width = max(len(c.X_thresholds_) for c in calibrators)
        xs = np.full((len(calibrators), width), np.inf)
        ys = np.empty((len(calibrators), width))
        for row, calibrator in enumerate(calibrators):
            count = len(calibrator.X_thresholds_)
            xs[row, :count] = calibrator.X_thresholds_
            ys[row, :count] = calibrator.y_thresholds_
            ys[row, count:] = calibrator.y_thresholds_[-1]
        return cls(
            low=np.array([c.X_min_ for c in calibrators], dtype=np.float64),
            high=np.array([c.X_max_ for c in calibrators], dtype=np.float64),
            xs=xs,
            ys=ys,
            last=np.array([len(c.X_thresholds_) - 1 for c in calibrators]),
        )

    def predict(self, decisions: np.ndarray) -> np.ndarray:
        """Each column of `decisions` (rows x columns) through its calibrator, as `_isotonic`:
        clipped to its range, then `np.interp`'s value (a threshold's own value at it or
        beyond the last, else the slope to the next times the distance, plus its value)."""
        values = np.clip(decisions, self.low, self.high)
        below = (self.xs <= values[..., None]).sum(axis=-1) - 1
        at = np.maximum(below, 0)
        after = np.minimum(at + 1, self.last)
        columns = np.arange(len(self.last))
        x0, y0 = self.xs[columns, at], self.ys[columns, at]
        x1, y1 = self.xs[columns, after], self.ys[columns, after]
        with np.errstate(invalid="ignore", divide="ignore"):
            interpolated = (y1 - y0) / (x1 - x0) * (values - x0) + y0
        on_threshold = (at >= self.last) | (x0 == values) | (values < self.xs[:, 0])
        return np.asarray(np.where(on_threshold, y0, interpolated))


def _isotonic(calibrator: IsotonicRegression, values: np.ndarray) -> np.ndarray:
    """`calibrator.predict(values)` for a calibrator fitted with `out_of_bounds="clip"`."""
    if len(calibrator.y_thresholds_) == 1:
        return np.repeat(calibrator.y_thresholds_, len(values)).astype(np.float64)
    clipped = np.clip(values, calibrator.X_min_, calibrator.X_max_)
    return np.asarray(np.interp(clipped, calibrator.X_thresholds_, calibrator.y_thresholds_), dtype=np.float64)


@cache
def _pairs_of_classes(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the one-vs-one columns (pairs (i, j), i < j, in scikit-learn's order) that
    involve it, in column order, and whether it is the pair's first class."""
    pairs = [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]
    columns = np.array([[k for k, pair in enumerate(pairs) if c in pair] for c in range(n_classes)])
    first = np.array([[pairs[k][0] == c for k in row] for c, row in enumerate(columns)])
    return columns, first


def _ovr_of_ovo(decisions: np.ndarray, n_classes: int) -> np.ndarray:
    """`sklearn.utils.multiclass._ovr_decision_function(decisions < 0, -decisions, n_classes)`,
    bit for bit: each class's votes, and its confidences summed in the same order from 0 (a
    cumulative sum adds left to right, as the loop's `-=` and `+=` do)."""
    columns, first = _pairs_of_classes(n_classes)
    confidences = -decisions
    signed = np.where(first, -confidences[:, columns], confidences[:, columns])
    zeros = np.zeros((len(decisions), n_classes, 1))
    sums = np.cumsum(np.concatenate([zeros, signed], axis=2), axis=2)[:, :, -1]
    negative = decisions < 0
    votes = np.where(first, ~negative[:, columns], negative[:, columns]).sum(axis=2).astype(np.float64)
    result: np.ndarray = votes + sums / (3 * (np.abs(sums) + 1))
    return result


def _svc_ovo(estimator: SVC, X: np.ndarray) -> np.ndarray:
    """`estimator._decision_function(X)` (its one-vs-one decisions), the same numbers, from
    libsvm without scikit-learn's per-call input checks: for a dense SVC with a named kernel,
    and X float64 in C order (else scikit-learn's own path).

    Raises:
        ValueError: X's feature count is not the one the SVC was fitted on.
    """
    if estimator._sparse or callable(estimator.kernel) or not (X.dtype == np.float64 and X.flags.c_contiguous):
        return np.asarray(estimator._decision_function(X))
    if X.ndim != 2 or X.shape[1] != estimator.shape_fit_[1]:
        raise ValueError(f"X has {X.shape[-1]} features, but the SVC was fitted on {estimator.shape_fit_[1]}")
    return np.asarray(
        _libsvm.decision_function(
            X,
            estimator.support_,
            estimator.support_vectors_,
            estimator._n_support,
            estimator._dual_coef_,
            estimator._intercept_,
            estimator._probA,
            estimator._probB,
            svm_type=LIBSVM_IMPL.index(estimator._impl),
            kernel=estimator.kernel,
            degree=estimator.degree,
            cache_size=estimator.cache_size,
            coef0=estimator.coef0,
            gamma=estimator._gamma,
        )
    )


def _decision(estimator: Any, X: np.ndarray, X64: np.ndarray) -> np.ndarray:
    """`estimator.decision_function(X)` as float64, 2-D; an SVC's one-vs-rest from `_ovr_of_ovo`
    of `X64` (X as float64 in C order, which an SVC computes on anyway)."""
    if isinstance(estimator, SVC) and estimator.decision_function_shape == "ovr" and len(estimator.classes_) > 2:
        decisions = _ovr_of_ovo(_svc_ovo(estimator, X64), len(estimator.classes_))
    else:
        decisions = np.asarray(estimator.decision_function(X), dtype=np.float64)
    return decisions.reshape(-1, 1) if decisions.ndim == 1 else decisions


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
    X64 = np.ascontiguousarray(X, dtype=np.float64)  # once, not once per copy
    mean = np.zeros((len(X), n_classes), dtype=np.float64)
    for calibrated in model.calibrated_classifiers_:
        decisions = _decision(calibrated.estimator, X, X64)
        proba = np.zeros((len(X), n_classes), dtype=np.float64)
        # Binary: the one decision column is the positive class's (classes_[1]).
        columns = np.searchsorted(model.classes_, calibrated.estimator.classes_) + (n_classes == 2)
        columns = columns[: len(calibrated.calibrators)]
        isotonics = (
            made_once(calibrated, partial(Isotonics.of, calibrated.calibrators))
            if len(X) <= ISOTONICS_MAX_ROWS
            else None
        )
        if isotonics is not None:
            proba[:, columns] = isotonics.predict(decisions[:, : len(columns)])
        else:
            for column, values, calibrator in zip(columns, decisions.T, calibrated.calibrators, strict=False):
                proba[:, column] = _isotonic(calibrator, values)
        if n_classes == 2:
            proba[:, 0] = 1.0 - proba[:, 1]
        else:
            total = proba.sum(axis=1, keepdims=True)
            proba = np.divide(proba, total, out=np.full_like(proba, 1 / n_classes), where=total != 0)
        proba[(proba > 1.0) & (proba <= 1.0 + _ABOVE_ONE)] = 1.0
        mean += proba
    return mean / len(model.calibrated_classifiers_)

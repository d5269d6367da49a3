"""Confidence-based performance estimation (CBPE, as NannyML describes it): a classifier's
accuracy (and, for a binary decision, its recall and false-positive rate) expected from
its calibrated probabilities alone, before any label, with a normal band.

Each input's outcome is a Bernoulli draw with the calibrated probability, independent of
the others, so a batch's count of correct answers is Poisson-binomial: mean the sum of the
probabilities, variance the sum of p (1 - p). Recall and false-positive rate are ratios of
two such sums; their variance is the delta method's. Every figure is a sum over inputs, so
a window adds its batches' sums (`estimate_sums`, stored with each contribution and rolled
up per hour) and judges them like one batch. Assumes the probabilities are calibrated on
the data served (what drift monitoring watches) and answers are independent.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.errors import EstimationError

# The band: estimate ± Z sd (95 % two-sided).
Z = 1.959964


def fit_calibration(held_out: npt.NDArray[np.floating[Any]], truth: npt.NDArray[Any]) -> dict[str, Any]:
    """The map from a classifier's top probability to its chance of being right, fitted
    (isotonic) on held-out rows (`held_out`: their class probabilities, `truth`: their class
    indices); JSON-able, stored in the model's manifest (`config["cbpe_calibration"]`)."""
    from sklearn.isotonic import IsotonicRegression

    right = held_out.argmax(axis=1) == truth
    fitted = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(held_out.max(axis=1), right)
    return {
        "confidence": fitted.X_thresholds_.tolist(),
        "right": fitted.y_thresholds_.tolist(),
        "rows": len(truth),
    }


def multiclass_sums(
    probabilities: npt.NDArray[np.floating[Any]], calibration: dict[str, Any] | None
) -> dict[str, float]:
    """The CBPE sums of rows of class probabilities (one row per input, predicted = argmax):
    each input is right with the chance `calibration` (`fit_calibration`) gives its top one.

    Raises:
        EstimationError: no calibration (the model gives no calibrated probabilities), or
            `probabilities` is not a 2-D array of probabilities.
    """
    if calibration is None:
        raise EstimationError("this model stores no CBPE calibration: its performance cannot be estimated")
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim != 2 or not np.all((probabilities >= 0) & (probabilities <= 1)):
        raise EstimationError("CBPE needs a 2-D array of class probabilities in [0, 1], one row per input")
    right = np.interp(probabilities.max(axis=1), calibration["confidence"], calibration["right"])
    return {
        "accuracy.n": float(len(right)),
        "accuracy.right": float(right.sum()),
        "accuracy.variance": float((right * (1 - right)).sum()),
    }


def binary_sums(positive: npt.NDArray[np.floating[Any]], decided: npt.NDArray[np.bool_]) -> dict[str, float]:
    """The CBPE sums of a binary decision: `positive`, each input's calibrated probability of
    the positive class (calibrated on held-out rows, as `fit_calibration` does for a top
    class); `decided`, whether the input was decided positive.

    Raises:
        EstimationError: the arrays differ in length or `positive` is not in [0, 1].
    """
    p = np.asarray(positive, dtype=float)
    d = np.asarray(decided, dtype=bool)
    if p.shape != d.shape or p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise EstimationError("CBPE needs one probability in [0, 1] and one decision per input")
    spread = p * (1 - p)
    return {
        "accuracy.n": float(len(p)),
        "accuracy.right": float(np.where(d, p, 1 - p).sum()),
        "accuracy.variance": float(spread.sum()),
        # recall = TP / P and false-positive rate = FP / N: expected counts, variances and covariances.
        "recall.hits": float(p[d].sum()),
        "recall.of": float(p.sum()),
        "recall.hits_variance": float(spread[d].sum()),
        "recall.of_variance": float(spread.sum()),
        "false_positive_rate.hits": float((1 - p[d]).sum()),
        "false_positive_rate.of": float((1 - p).sum()),
        "false_positive_rate.hits_variance": float(spread[d].sum()),
        "false_positive_rate.of_variance": float(spread.sum()),
    }


def _band(value: float, variance: float) -> dict[str, float]:
    spread = Z * math.sqrt(max(variance, 0.0))
    return {"value": value, "low": max(0.0, value - spread), "high": min(1.0, value + spread)}


def estimated_kpis(sums: dict[str, float], calibration_rows: float) -> dict[str, dict[str, float]]:
    """Each estimated KPI with its 95 % band (`value`, `low`, `high`) from summed CBPE sums
    (a batch's or a window's) of a model calibrated on `calibration_rows` held-out rows;
    empty without any input.

    The calibration is itself an estimate from that many rows, so the band's variance is
    the inputs' Poisson-binomial one times (1 + n / calibration_rows): it stops narrowing
    once the window holds more inputs than the calibration did."""
    estimated = {}
    n = sums.get("accuracy.n", 0.0)
    if not n:
        return {}
    widen = 1 + n / calibration_rows
    estimated["accuracy"] = _band(sums["accuracy.right"] / n, widen * sums["accuracy.variance"] / n**2)
    for metric in ("recall", "false_positive_rate"):
        of = sums.get(f"{metric}.of", 0.0)
        if not of:
            continue
        hits = sums[f"{metric}.hits"]
        ratio = hits / of
        # Var(H / O) ~ (Var H - 2 r Cov(H, O) + r^2 Var O) / O^2; Cov(H, O) = Var H (H is part of O).
        hits_variance, of_variance = sums[f"{metric}.hits_variance"], sums[f"{metric}.of_variance"]
        variance = (hits_variance * (1 - 2 * ratio) + ratio**2 * of_variance) / of**2
        estimated[metric] = _band(ratio, widen * variance)
    return estimated

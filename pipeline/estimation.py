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
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pipeline.errors import EstimationError

if TYPE_CHECKING:
    from pipeline.artifacts import Manifest

# The band: estimate ± Z sd (95 % two-sided).
Z = 1.959964


# Scores are counted in bins this wide while a batch is assembled (a page at a time), then
# calibrated once: at most 5e-5 off each score, far inside any band.
SCORE_BINS = 10_000
BIN_SCORES = np.arange(SCORE_BINS + 1) / SCORE_BINS


def fit_calibration(
    scores: npt.NDArray[np.floating[Any]], events: npt.NDArray[np.bool_], method: str = "isotonic"
) -> dict[str, Any]:
    """The map from a score to the chance of an event, fitted on held-out rows: a
    classifier's top probability to its being right (`top_class_calibration`), or a binary
    decision's score to the input being positive. `method`: `isotonic`, or `sigmoid`
    (Platt: a logistic fit on the score's logit) for a few hundred rows, where isotonic
    puts most rows at exactly 0 or 1 and so claims no uncertainty for them. JSON-able
    (`score` -> `probability` points, interpolated), stored in the model's manifest
    (`config["cbpe_calibration"]`)."""
    if method == "sigmoid":
        from sklearn.linear_model import LogisticRegression

        def logit(p: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
            p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
            return np.asarray(np.log(p / (1 - p)))

        platt = LogisticRegression(C=1e6).fit(logit(scores)[:, None], events)
        points = np.linspace(0, 1, 1001)
        probability = platt.predict_proba(logit(points)[:, None])[:, 1]
        return {"score": points.tolist(), "probability": probability.tolist(), "rows": len(events)}
    from sklearn.isotonic import IsotonicRegression

    fitted = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(scores, events)
    return {"score": fitted.X_thresholds_.tolist(), "probability": fitted.y_thresholds_.tolist(), "rows": len(events)}


def top_class_calibration(held_out: npt.NDArray[np.floating[Any]], truth: npt.NDArray[Any]) -> dict[str, Any]:
    """`fit_calibration` of a classifier's top probability to its being right, on held-out
    rows (`held_out`: their class probabilities, `truth`: their class indices)."""
    return fit_calibration(held_out.max(axis=1), held_out.argmax(axis=1) == truth)


def calibrated(scores: npt.NDArray[np.floating[Any]], calibration: dict[str, Any] | None) -> npt.NDArray[np.float64]:
    """Each score's chance of the event by `calibration` (`fit_calibration`).

    Raises:
        EstimationError: no calibration (the model stores none: its performance cannot be estimated).
    """
    if calibration is None:
        raise EstimationError("this model stores no CBPE calibration: its performance cannot be estimated")
    return np.asarray(np.interp(scores, calibration["score"], calibration["probability"]), dtype=np.float64)


def accuracy_sums(right: npt.NDArray[np.floating[Any]], weights: npt.NDArray[Any] | None = None) -> dict[str, float]:
    """The CBPE accuracy sums of inputs each right with chance `right` (`weights`: how many
    inputs each entry stands for; one each by default)."""
    w = np.ones(len(right)) if weights is None else np.asarray(weights, dtype=float)
    return {
        "accuracy.n": float(w.sum()),
        "accuracy.right": float((w * right).sum()),
        "accuracy.variance": float((w * right * (1 - right)).sum()),
    }


def multiclass_sums(
    probabilities: npt.NDArray[np.floating[Any]], calibration: dict[str, Any] | None
) -> dict[str, float]:
    """The CBPE sums of rows of class probabilities (one row per input, predicted = argmax):
    each input is right with the chance `calibration` (`top_class_calibration`) gives its top one.

    Raises:
        EstimationError: no calibration (the model gives no calibrated probabilities), or
            `probabilities` is not a 2-D array of probabilities.
    """
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim != 2 or not np.all((probabilities >= 0) & (probabilities <= 1)):
        raise EstimationError("CBPE needs a 2-D array of class probabilities in [0, 1], one row per input")
    return accuracy_sums(calibrated(probabilities.max(axis=1), calibration))


def binary_sums(
    positive: npt.NDArray[np.floating[Any]], decided: npt.NDArray[np.bool_], weights: npt.NDArray[Any] | None = None
) -> dict[str, float]:
    """The CBPE sums of a binary decision: `positive`, each input's calibrated probability of
    the positive class (`fit_calibration` of the decision's score); `decided`, whether the
    input was decided positive; `weights`, how many inputs each entry stands for (one each
    by default).

    Raises:
        EstimationError: the arrays differ in length or `positive` is not in [0, 1].
    """
    p = np.asarray(positive, dtype=float)
    d = np.asarray(decided, dtype=bool)
    w = np.ones(len(p)) if weights is None else np.asarray(weights, dtype=float)
    if p.shape != d.shape or p.shape != w.shape or p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise EstimationError("CBPE needs one probability in [0, 1] and one decision per input")
    spread = w * p * (1 - p)
    return {
        **accuracy_sums(np.where(d, p, 1 - p), w),
        # recall = TP / P and false-positive rate = FP / N: expected counts, variances and covariances.
        "recall.hits": float((w * p)[d].sum()),
        "recall.of": float((w * p).sum()),
        "recall.hits_variance": float(spread[d].sum()),
        "recall.of_variance": float(spread.sum()),
        "false_positive_rate.hits": float((w * (1 - p))[d].sum()),
        "false_positive_rate.of": float((w * (1 - p)).sum()),
        "false_positive_rate.hits_variance": float(spread[d].sum()),
        "false_positive_rate.of_variance": float(spread.sum()),
    }


class ScoreCounts:
    """A batch's CBPE scores counted as it is assembled, a page at a time (`SCORE_BINS` bins,
    the inputs decided positive apart), to be calibrated once the batch is done by the
    calibration of the model version that scored it."""

    def __init__(self) -> None:
        self.counts = np.zeros((2, SCORE_BINS + 1), dtype=np.int64)
        # None until a page is counted; then whether its scores came with decisions.
        self.binary: bool | None = None

    def add(self, scores: npt.NDArray[np.floating[Any]], decided: npt.NDArray[np.bool_] | None) -> None:
        """Count one page's `scores` (in [0, 1]) and, for a binary decision, whether each
        input was `decided` positive.

        Raises:
            EstimationError: a score is outside [0, 1] or the decisions do not match the scores.
        """
        scores = np.asarray(scores, dtype=float)
        if not np.all((scores >= 0) & (scores <= 1)) or (decided is not None and len(decided) != len(scores)):
            raise EstimationError("CBPE needs one score in [0, 1] (and one decision, if any) per input")
        self.binary = decided is not None
        bins = np.rint(scores * SCORE_BINS).astype(np.int64)
        positive = np.zeros(len(bins), dtype=bool) if decided is None else np.asarray(decided, dtype=bool)
        for row, chosen in enumerate((~positive, positive)):
            self.counts[row] += np.bincount(bins[chosen], minlength=SCORE_BINS + 1)

    def sums(self, calibration: dict[str, Any] | None) -> dict[str, float]:
        """The counted scores' CBPE sums by `calibration` (accuracy of a top class; also
        recall and false-positive rate of a binary decision).

        Raises:
            EstimationError: no calibration.
        """
        # The bins holding inputs only (a bin without any adds nothing to a sum): a small
        # batch calibrates its few scores, not all 2 x (SCORE_BINS + 1) bins.
        decided, bins = np.nonzero(self.counts)
        probability = calibrated(BIN_SCORES[bins], calibration)
        weights = self.counts[decided, bins]
        if not self.binary:
            return accuracy_sums(probability, weights)
        return binary_sums(probability, decided.astype(bool), weights)


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


CALIBRATION_KEYS = frozenset({"score", "probability", "rows"})


def calibration_of(manifest: Manifest | None) -> dict[str, Any] | None:
    """The CBPE calibration a model version's manifest stores; None without one."""
    calibration = None if manifest is None else manifest.config.get("cbpe_calibration")
    # A manifest trained before this format (other keys) has none usable: retrain the model.
    if not isinstance(calibration, dict) or not CALIBRATION_KEYS <= set(calibration):
        return None
    return calibration


def estimated_as(names: dict[str, str], sums: dict[str, float], calibration_rows: float) -> dict[str, dict[str, float]]:
    """`estimated_kpis` under the names of the realised KPIs they estimate (`names`: CBPE
    figure to realised KPI, `Estimation.kpis`)."""
    estimated = estimated_kpis(sums, calibration_rows)
    return {realised: estimated[figure] for figure, realised in names.items() if figure in estimated}

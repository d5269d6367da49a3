"""Reference profiles for drift: quantile bins of a model's input features and of its
output score, built at training time and stored in the model's manifest, and the
population stability index (PSI) of a batch's bin counts against them."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import numpy as np
from pydantic import BaseModel, Field

REFERENCE_BINS = 10
# Floor of a bin's share in the PSI, so an empty bin gives a large but finite term.
PSI_EPSILON = 1e-4


class Histogram(BaseModel):
    """Quantile bins of one variable over the reference data.

    `edges` are the interior bin edges, ascending: bin 0 is (-inf, edges[0]], bin i is
    (edges[i-1], edges[i]], the last is (edges[-1], inf). `expected` is the reference
    share of each bin (every one is non-empty). `low` / `high` are the reference's
    smallest and largest values.
    """

    name: str
    edges: list[float]
    expected: list[float]
    low: float
    high: float

    def counts(self, values: np.ndarray) -> np.ndarray:
        """Return how many of `values` fall in each bin (int64, len(edges) + 1)."""
        bins = np.searchsorted(np.asarray(self.edges, dtype=np.float64), values.astype(np.float64), side="left")
        return np.bincount(bins, minlength=len(self.edges) + 1)


class ReferenceProfile(BaseModel):
    """A model's reference: one histogram per input feature (in column order) and one of its output score."""

    rows: int
    features: list[Histogram]
    score: Histogram

    def bin_counts(self, X: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The bin counts of rows `X` (n x features) and their `scores`: every feature's
        histogram, then the score's, concatenated (int64). Sums of these vectors over
        sub-tasks are a batch's counts (`psis` reads them)."""
        return np.concatenate(
            [h.counts(X[:, column]) for column, h in enumerate(self.features)] + [self.score.counts(scores)]
        )

    def psis(self, counts: np.ndarray) -> np.ndarray:
        """The population stability index of every histogram (the features in column order,
        then the score) in a vector made by `bin_counts`, against the reference shares, in
        one vectorised pass. Each bin's share is floored at PSI_EPSILON, so an empty bin
        gives a large but finite term.

        Raises:
            ValueError: `counts` does not fit the histograms, or a histogram counts nothing.
        """
        histograms = [*self.features, self.score]
        sizes = np.array([len(h.expected) for h in histograms])
        if len(counts) != sizes.sum():
            raise ValueError(f"{len(counts)} bin counts do not fit {len(histograms)} histograms of {sizes.sum()} bins")
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        totals = np.add.reduceat(counts, starts)
        if not totals.all():
            raise ValueError("cannot compute the PSI of a histogram that counts no value")
        actual = np.maximum(counts / np.repeat(totals, sizes), PSI_EPSILON)
        reference = np.maximum(np.concatenate([h.expected for h in histograms]), PSI_EPSILON)
        return np.add.reduceat((actual - reference) * np.log(actual / reference), starts)


def histogram(name: str, values: np.ndarray, bins: int = REFERENCE_BINS) -> Histogram:
    """Return the quantile histogram of `values` (1-D, finite, not empty).

    Edges are data values (so no bin is empty), duplicates collapse (a feature with
    few distinct values gets fewer bins), and the largest value is never an edge.
    """
    values = np.asarray(values, dtype=np.float64)
    high = float(values.max())
    quantiles = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1], method="inverted_cdf")
    edges = np.unique(quantiles)
    edges = edges[edges < high]
    partial = Histogram(name=name, edges=edges.tolist(), expected=[], low=float(values.min()), high=high)
    counts = partial.counts(values)
    return partial.model_copy(update={"expected": (counts / counts.sum()).tolist()})


def build_profile(feature_names: Sequence[str], X: np.ndarray, scores: np.ndarray) -> ReferenceProfile:
    """Return the reference profile of rows `X` (n x features) and their output `scores` (n)."""
    if X.ndim != 2 or X.shape[1] != len(feature_names) or len(scores) != len(X) or not len(X):
        raise ValueError(
            f"reference rows {X.shape} and {len(scores)} scores do not fit {len(feature_names)} feature names"
        )
    return ReferenceProfile(
        rows=len(X),
        features=[histogram(name, X[:, column]) for column, name in enumerate(feature_names)],
        score=histogram("score", scores),
    )


class Band(StrEnum):
    stable = "stable"
    moderate = "moderate"
    significant = "significant"
    # Scored on fewer rows than the pipeline's `min_rows`: the PSI is mostly sampling noise.
    too_few_rows = "too few rows"


class DriftConfig(BaseModel):
    """How a pipeline judges drift: the conventional PSI bands and the fewest rows
    a model must have scored in a batch before its PSI may flag anything (below
    that, sampling noise alone gives PSIs above the bands)."""

    moderate: float = Field(default=0.1, gt=0)
    significant: float = Field(default=0.2, gt=0)
    min_rows: int = Field(default=100, ge=1)

    def band(self, value: float, rows: int) -> Band:
        """The band of a PSI computed over `rows` rows."""
        if rows < self.min_rows:
            return Band.too_few_rows
        if value >= self.significant:
            return Band.significant
        return Band.moderate if value >= self.moderate else Band.stable


def outside_range(profile: ReferenceProfile, X: np.ndarray, margin: float) -> np.ndarray:
    """Per row of `X` (rows x features), whether any value lies outside the reference range
    widened by `margin` times its width on each side (the rows `range_warnings` speaks of)."""
    low = np.array([feature.low for feature in profile.features])
    high = np.array([feature.high for feature in profile.features])
    slack = margin * (high - low)
    outside: np.ndarray = ((X < low - slack) | (X > high + slack)).any(axis=1)
    return outside


def range_warnings(profile: ReferenceProfile, values: Sequence[float], margin: float) -> list[str]:
    """Warnings for the `values` (one per feature, in column order) that lie outside the
    reference range widened by `margin` times its width on each side."""
    warnings = []
    for feature, value in zip(profile.features, values):
        slack = margin * (feature.high - feature.low)
        if value < feature.low - slack or value > feature.high + slack:
            warnings.append(
                f"{feature.name} = {value:g} is far outside the training range [{feature.low:g}, {feature.high:g}]"
            )
    return warnings

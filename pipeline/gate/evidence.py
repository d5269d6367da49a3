"""The gate's evidence and answers: its configuration, the KPIs it can judge, the rows and
timings it is given (validated), and the result of each check and of the gate."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Verdict = Literal["pass", "fail", "insufficient data"]
PASS: Verdict = "pass"
FAIL: Verdict = "fail"
INSUFFICIENT: Verdict = "insufficient data"

CheckKind = Literal["behaviour", "kpi", "latency"]

# A row's label when it has none (yet).
NO_LABEL = -1


class GateConfig(BaseModel):
    """The gate's levels, margins and sample sizes (docs/rollouts.md justifies the defaults).

    `alpha` is each check's chance of ever failing falsely over the whole roll-out; a look
    tests at `alpha / looks`. A check's milestones are `min * growth**k` rows, k = 0 ..
    looks - 1: paired rows for the shadow behaviour checks, labelled rows for the KPIs
    (of each version in a canary), sub-tasks of each version for latency. A two-sample
    check judges the first m rows of each version, m the latest milestone both reached.
    """

    model_config = ConfigDict(frozen=True)

    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    looks: int = Field(default=8, ge=1, le=30)
    growth: float = Field(default=2.0, ge=1.2)
    min_paired_rows: int = Field(default=500, ge=20)
    min_labelled_rows: int = Field(default=250, ge=20)
    min_timings: int = Field(default=10, ge=3)
    # Shadow without labels: fail below this share of unchanged decisions...
    min_agreement: float = Field(default=0.9, gt=0, lt=1)
    # ... or when changed decisions move a class's share of decisions by more than this ...
    max_class_shift: float = Field(default=0.05, gt=0, lt=1)
    # ... or move the scores by more than this on average (in the score's units).
    max_score_shift: float = Field(default=0.05, gt=0)
    # Fail latency when the challenger's predict CPU time per row is significantly more than this times the champion's.
    max_slowdown: float = Field(default=1.2, gt=1)
    bootstrap_resamples: int = Field(default=2000, ge=200, le=100_000)
    seed: int = 0

    def milestones(self, first: int) -> list[int]:
        """The sample sizes at which a check whose minimum is `first` judges, ascending."""
        return [round(first * self.growth**k) for k in range(self.looks)]


def accuracy(confusion: np.ndarray) -> np.ndarray:
    """Share of rows decided as labelled, per confusion matrix (see `Kpi`)."""
    share: np.ndarray = np.trace(confusion, axis1=-2, axis2=-1) / confusion.sum(axis=(-2, -1))
    return share


def recall(positive: int) -> Callable[[np.ndarray], np.ndarray]:
    """The KPI: share of rows labelled `positive` that are decided `positive`."""

    def recall_of(confusion: np.ndarray) -> np.ndarray:
        share: np.ndarray = confusion[..., positive, positive] / confusion[..., :, positive].sum(axis=-1)
        return share

    return recall_of


def false_positive_rate(positive: int) -> Callable[[np.ndarray], np.ndarray]:
    """The KPI: share of rows not labelled `positive` that are decided `positive`."""

    def false_positive_rate_of(confusion: np.ndarray) -> np.ndarray:
        flagged = confusion[..., positive, :].sum(axis=-1) - confusion[..., positive, positive]
        negatives = confusion.sum(axis=(-2, -1)) - confusion[..., :, positive].sum(axis=-1)
        share: np.ndarray = flagged / negatives
        return share

    return false_positive_rate_of


@dataclass(frozen=True)
class Kpi:
    """A KPI the gate compares: `of_confusion` maps confusion matrices shaped (..., classes,
    classes), where `[d, y]` counts the rows decided `d` and labelled `y`, to the KPI of
    each (shape (...)); vectorised, as the bootstrap calls it once on all resamples. Every
    KPI of decisions against labels is a function of the confusion matrix. The challenger
    is non-inferior when it is at most `margin` (in the KPI's units) worse, where `better`
    says which way is better. A KPI undefined on some rows (e.g. recall without positives)
    returns NaN there.
    """

    of_confusion: Callable[[np.ndarray], np.ndarray]
    better: Literal["higher", "lower"]
    margin: float

    def __post_init__(self) -> None:
        if not self.margin > 0:
            raise ValueError(f"a KPI's non-inferiority margin must be positive, not {self.margin}")


# A classifier's decisions, when the pipeline declares no KPI for its model: lose at most one accuracy point.
DEFAULT_KPIS: Mapping[str, Kpi] = {"accuracy": Kpi(accuracy, better="higher", margin=0.01)}


def _float_array(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected one value per row, got an array of shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise ValueError(f"{name}: {len(bad)} values are NaN or infinite (first at position {bad[0]})")
    return array


def _class_array(name: str, values: Sequence[int] | np.ndarray, classes: int, lowest: int = 0) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected one value per row, got an array of shape {array.shape}")
    if array.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(array) | (array != np.round(array)))
        if len(bad):
            raise ValueError(f"{name}: {len(bad)} values are not class numbers (first at position {bad[0]})")
    elif array.dtype.kind not in "iub" and len(array):
        raise ValueError(f"{name}: class numbers must be integers, got {array.dtype}")
    array = array.astype(np.int64)
    bad = np.flatnonzero(array < lowest)
    if len(bad):
        raise ValueError(f"{name}: {len(bad)} values are below {lowest} (first at position {bad[0]})")
    bad = np.flatnonzero(array >= classes)
    if len(bad):
        raise ValueError(f"{name}: {len(bad)} values are not below the {classes} classes (first at position {bad[0]})")
    return array


def _seconds_array(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = _float_array(name, values)
    bad = np.flatnonzero(array < 0)
    if len(bad):
        raise ValueError(f"{name}: {len(bad)} compute times are negative (first at position {bad[0]})")
    return array


def _checked_classes(classes: int) -> int:
    if not isinstance(classes, int) or classes < 2:
        raise ValueError(f"classes: a decision needs at least 2 classes, not {classes!r}")
    return classes


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"rows of unequal length: {', '.join(f'{name} {n}' for name, n in lengths.items())}")


@dataclass(frozen=True)
class PairedRows:
    """Shadow rows, one per input row scored by both versions, in the order recorded (append-only:
    the gate judges prefixes, so earlier rows must never move).

    Scores are finite floats (the watched score of each output row); decisions are class
    numbers 0 .. `classes` - 1 (0 / 1 for a yes / no decision); `labels` holds each row's
    label, NO_LABEL where none is known, or is None when no row has one. Arrays are
    converted and checked on construction.

    Raises:
        ValueError: unequal lengths, a NaN or infinite score, a decision or label that is not a class number.
    """

    champion_scores: np.ndarray
    challenger_scores: np.ndarray
    champion_decisions: np.ndarray
    challenger_decisions: np.ndarray
    labels: np.ndarray | None = None
    classes: int = 2

    def __post_init__(self) -> None:
        classes = _checked_classes(self.classes)
        arrays = {
            "champion_scores": _float_array("champion_scores", self.champion_scores),
            "challenger_scores": _float_array("challenger_scores", self.challenger_scores),
            "champion_decisions": _class_array("champion_decisions", self.champion_decisions, classes),
            "challenger_decisions": _class_array("challenger_decisions", self.challenger_decisions, classes),
        }
        if self.labels is not None:
            arrays["labels"] = _class_array("labels", self.labels, classes, lowest=NO_LABEL)
        _same_length(**arrays)
        for name, array in arrays.items():
            object.__setattr__(self, name, array)

    def __len__(self) -> int:
        return len(self.champion_scores)


@dataclass(frozen=True)
class VersionRows:
    """Canary rows one version served, in the order recorded: its decisions (class numbers
    0 .. `classes` - 1) and `labels` (NO_LABEL where unknown, or None when none is known).

    Raises:
        ValueError: unequal lengths, a decision or label that is not a class number.
    """

    decisions: np.ndarray
    labels: np.ndarray | None = None
    classes: int = 2

    def __post_init__(self) -> None:
        classes = _checked_classes(self.classes)
        object.__setattr__(self, "decisions", _class_array("decisions", self.decisions, classes))
        if self.labels is not None:
            object.__setattr__(self, "labels", _class_array("labels", self.labels, classes, lowest=NO_LABEL))
            _same_length(decisions=self.decisions, labels=self.labels)


@dataclass(frozen=True)
class Timings:
    """CPU seconds of predict per row of each version, one value per sub-task (its
    `predict_cpu_s` over its rows), in the order recorded. One value per sub-task, not per row: a sub-task's rows
    share one timing, and counting each would pretend to a sample thousands of times larger.

    Raises:
        ValueError: a NaN, infinite or negative time.
    """

    champion: np.ndarray
    challenger: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "champion", _seconds_array("champion seconds per row", self.champion))
        object.__setattr__(self, "challenger", _seconds_array("challenger seconds per row", self.challenger))


class GateCheck(BaseModel):
    """One check's outcome. `n_champion` / `n_challenger` are the rows (sub-tasks for latency)
    it judged: the prefix up to its latest milestone. `alpha` is the level of this look;
    `estimate` is the effect (challenger minus champion, or the agreement rate, or the
    slowdown ratio) and `ci` its confidence interval at that level, where computed;
    `margin` is the practical margin the verdict compares with."""

    name: str
    kind: CheckKind
    verdict: Verdict
    why: str
    n_champion: int
    n_challenger: int
    alpha: float | None = None
    statistic: float | None = None
    p_value: float | None = None
    estimate: float | None = None
    ci: tuple[float, float] | None = None
    margin: float | None = None
    next_look_at: int | None = None


class GateResult(BaseModel):
    """The gate of one roll-out: the overall verdict, why, and every check."""

    mode: Literal["shadow", "canary"]
    verdict: Verdict
    reasons: list[str]
    checks: list[GateCheck]

"""The statistical gate of a model roll-out: is the challenger version safe to promote?

Pure functions of the evidence a roll-out has gathered so far (numpy + scipy, no
database, no broker); the roll-out plumbing recomputes the gate as shadow or canary rows
accumulate and stores the `GateResult` (JSON) per roll-out. docs/rollouts.md explains the
statistics and the error rates measured by `python -m bench.gate_simulation`.

Checks, each with a verdict `pass`, `fail` or `insufficient data`:

* shadow (the same rows scored by both versions, paired per row):
  `agreement` (share of rows whose decision is unchanged), `flips` (McNemar's exact test,
  Bowker's test beyond two classes: do changed decisions move one way?), `scores`
  (Wilcoxon signed-rank on the per-row score differences);
* both modes: `latency` (Mann-Whitney on compute seconds per row, one value per sub-task)
  and, on labelled rows, one `kpi:<name>` check per KPI: the challenger's KPI minus the
  champion's, with a bootstrap confidence interval, against a non-inferiority margin.

Sequential looks: a check judges only at milestones of its sample size (the first
`min * growth**k` rows, k < `looks`) and tests each look at `alpha / looks`, so however
often the gate is recomputed, the chance that a check ever fails falsely is at most
`alpha` (Bonferroni). Rows past the last milestone change nothing: the verdict is final.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import stats

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
    # Fail latency when the challenger's compute time per row is significantly more than this times the champion's.
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
    """Compute seconds per row of each version, one value per sub-task (its compute time over
    its rows), in the order recorded. One value per sub-task, not per row: a sub-task's rows
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


@dataclass(frozen=True)
class _Look:
    """Where a sample stands on a check's milestones: the rows judged (the latest milestone
    reached, 0 before the first) and the next milestone (None after the last)."""

    rows: int
    next_at: int | None

    @property
    def reached(self) -> bool:
        return self.rows > 0


def _look(available: int, first: int, config: GateConfig) -> _Look:
    """The look at a sample of `available` rows for a check whose first milestone is `first`."""
    milestones = config.milestones(first)
    reached = [m for m in milestones if m <= available]
    upcoming = [m for m in milestones if m > available]
    return _Look(reached[-1] if reached else 0, upcoming[0] if upcoming else None)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _insufficient(
    name: str, kind: CheckKind, why: str, n_champion: int, n_challenger: int, next_at: int | None
) -> GateCheck:
    return GateCheck(
        name=name,
        kind=kind,
        verdict=INSUFFICIENT,
        why=why,
        n_champion=n_champion,
        n_challenger=n_challenger,
        next_look_at=next_at,
    )


def check_agreement(champion: np.ndarray, challenger: np.ndarray, alpha: float, config: GateConfig) -> GateCheck:
    """Shadow, on paired decisions: is the share of rows whose decision is unchanged at least
    `min_agreement`? Fails when it is significantly below (exact one-sided binomial test at
    `alpha`); the estimate is the agreement rate with its Wilson score interval."""
    n = len(champion)
    agreed = int(np.count_nonzero(champion == challenger))
    test = stats.binomtest(agreed, n, config.min_agreement, alternative="less")
    # Two one-sided Wilson bounds at 1 - alpha: the (1 - 2 alpha) interval, without the two-sided test's cost.
    low = stats.binomtest(agreed, n, alternative="greater").proportion_ci(1 - alpha, method="wilson").low
    high = test.proportion_ci(1 - alpha, method="wilson").high
    failed = test.pvalue < alpha
    why = (
        f"{agreed} of {n} decisions unchanged ({agreed / n:.1%}), "
        f"{'significantly below' if failed else 'not significantly below'} the {config.min_agreement:.0%} floor"
    )
    return GateCheck(
        name="agreement",
        kind="behaviour",
        verdict=FAIL if failed else PASS,
        why=why,
        n_champion=n,
        n_challenger=n,
        alpha=alpha,
        statistic=agreed,
        p_value=test.pvalue,
        estimate=agreed / n,
        ci=(low, high),
        margin=config.min_agreement,
    )


def _symmetry_test(flips: np.ndarray) -> tuple[float, float, str]:
    """(statistic, p-value, test name) of the symmetry of a flip matrix `flips[a, b]` (rows
    the champion decided `a` and the challenger `b`, a != b): McNemar's exact test for two
    classes (the statistic is the flips from class 0 to 1), Bowker's chi-square test beyond."""
    if flips.shape[0] == 2:
        # Exact McNemar: under symmetry the flips from 0 to 1 are Binomial(flips, 1/2), whose
        # two-sided p-value is twice the smaller tail.
        to_one, to_zero = int(flips[0, 1]), int(flips[1, 0])
        p_value = min(1.0, 2 * float(stats.binom.cdf(min(to_one, to_zero), to_one + to_zero, 0.5)))
        return float(to_one), p_value, "McNemar's exact test"
    upper = np.triu_indices(flips.shape[0], k=1)
    forth, back = flips[upper], flips.T[upper]
    pairs = (forth + back) > 0
    if not pairs.any():
        return 0.0, 1.0, "Bowker's test"
    statistic = float((((forth - back) ** 2)[pairs] / (forth + back)[pairs]).sum())
    return statistic, float(stats.chi2.sf(statistic, int(pairs.sum()))), "Bowker's test"


def check_flips(
    champion: np.ndarray, challenger: np.ndarray, classes: int, alpha: float, config: GateConfig
) -> GateCheck:
    """Shadow, on paired decisions: do the changed decisions move one way (McNemar; Bowker
    beyond two classes)? Fails when the flips are significantly asymmetric (two-sided, at
    `alpha`) and move some class's share of decisions by more than `max_class_shift`;
    symmetric flips pass, however many (the agreement check bounds how many)."""
    n = len(champion)
    flips = np.bincount(champion * classes + challenger, minlength=classes * classes).reshape(classes, classes)
    np.fill_diagonal(flips, 0)
    statistic, p_value, test = _symmetry_test(flips)
    shares = (np.bincount(challenger, minlength=classes) - np.bincount(champion, minlength=classes)) / n
    shifted = int(np.argmax(np.abs(shares)))
    shift = float(shares[shifted])
    failed = p_value < alpha and abs(shift) > config.max_class_shift
    why = (
        f"{int(flips.sum())} of {n} decisions changed; class {shifted}'s share moved {shift:+.1%} "
        f"(margin {config.max_class_shift:.0%}), {test} p = {p_value:.3g}"
    )
    return GateCheck(
        name="flips",
        kind="behaviour",
        verdict=FAIL if failed else PASS,
        why=why,
        n_champion=n,
        n_challenger=n,
        alpha=alpha,
        statistic=statistic,
        p_value=p_value,
        estimate=shift,
        margin=config.max_class_shift,
    )


def check_scores(champion: np.ndarray, challenger: np.ndarray, alpha: float, config: GateConfig) -> GateCheck:
    """Shadow, on paired scores: are the challenger's scores shifted from the champion's?
    Wilcoxon signed-rank test of the per-row differences (challenger minus champion; rows with
    equal scores are left out, as in Wilcoxon's own treatment of zeros). Fails when the shift
    is significant (two-sided, at `alpha`) and the mean difference exceeds `max_score_shift`."""
    n = len(champion)
    differences = challenger - champion
    changed = int(np.count_nonzero(differences))
    mean_shift = float(differences.mean())
    if changed:
        test = stats.wilcoxon(differences, zero_method="wilcox")
        statistic, p_value = float(test.statistic), float(test.pvalue)
    else:
        statistic, p_value = 0.0, 1.0
    failed = p_value < alpha and abs(mean_shift) > config.max_score_shift
    why = (
        f"{changed} of {n} scores changed, by {mean_shift:+.4g} on average "
        f"(margin {config.max_score_shift:g}), Wilcoxon p = {p_value:.3g}"
    )
    return GateCheck(
        name="scores",
        kind="behaviour",
        verdict=FAIL if failed else PASS,
        why=why,
        n_champion=n,
        n_challenger=n,
        alpha=alpha,
        statistic=statistic,
        p_value=p_value,
        estimate=mean_shift,
        margin=config.max_score_shift,
    )


BEHAVIOUR_CHECKS = ("agreement", "flips", "scores")


def check_behaviour(rows: PairedRows, config: GateConfig) -> list[GateCheck]:
    """Shadow: the agreement, flips and scores checks, on the paired rows up to the latest milestone."""
    look = _look(len(rows), config.min_paired_rows, config)
    if not look.reached:
        why = f"{len(rows)} paired rows, the first look is at {look.next_at}"
        return [_insufficient(name, "behaviour", why, len(rows), len(rows), look.next_at) for name in BEHAVIOUR_CHECKS]
    n, alpha = look.rows, config.alpha / config.looks
    decisions = rows.champion_decisions[:n], rows.challenger_decisions[:n]
    checks = [
        check_agreement(*decisions, alpha, config),
        check_flips(*decisions, rows.classes, alpha, config),
        check_scores(rows.champion_scores[:n], rows.challenger_scores[:n], alpha, config),
    ]
    return [check.model_copy(update={"next_look_at": look.next_at}) for check in checks]


def _slowdown(champion_median: float, challenger_median: float) -> float:
    if champion_median > 0:
        return challenger_median / champion_median
    return 1.0 if challenger_median == 0 else float("inf")


def check_latency(timings: Timings, config: GateConfig) -> GateCheck:
    """Both modes: is the challenger more than `max_slowdown` times slower per row? Mann-Whitney
    test (one-sided) of the challenger's compute seconds per row against the champion's times
    `max_slowdown`, one value per sub-task, on the first m of each version's sub-tasks (m the
    latest milestone both reached); fails when significant at `alpha / looks`, passes when not
    and the ratio of the medians (the estimate) is within `max_slowdown`, else waits."""
    look = _look(min(len(timings.champion), len(timings.challenger)), config.min_timings, config)
    if not look.reached:
        why = (
            f"{len(timings.champion)} champion and {len(timings.challenger)} challenger sub-tasks timed, "
            f"the first look needs {look.next_at} of each"
        )
        n_champion, n_challenger = len(timings.champion), len(timings.challenger)
        return _insufficient("latency", "latency", why, n_champion, n_challenger, look.next_at)
    alpha = config.alpha / config.looks
    champion, challenger = timings.champion[: look.rows], timings.challenger[: look.rows]
    p_value = float(stats.mannwhitneyu(challenger, champion * config.max_slowdown, alternative="greater").pvalue)
    ratio = _slowdown(float(np.median(champion)), float(np.median(challenger)))
    verdict: Verdict = FAIL if p_value < alpha else PASS if ratio <= config.max_slowdown else INSUFFICIENT
    finding = {
        FAIL: "significantly more than",
        PASS: "within",
        INSUFFICIENT: "above, though not yet significantly,",
    }[verdict]
    why = (
        f"median compute per row {ratio:.2f}x the champion's, {finding} the {config.max_slowdown:g}x margin "
        f"(Mann-Whitney p = {p_value:.3g} that it is more)"
    )
    return GateCheck(
        name="latency",
        kind="latency",
        verdict=verdict,
        why=why,
        n_champion=len(champion),
        n_challenger=len(challenger),
        alpha=alpha,
        p_value=p_value,
        estimate=_finite(ratio),
        margin=config.max_slowdown,
        next_look_at=look.next_at,
    )


def _bootstrap_rng(config: GateConfig, name: str) -> np.random.Generator:
    """A generator seeded by the config's seed and the KPI's name: the same evidence always gives the same interval."""
    return np.random.default_rng([config.seed, zlib.crc32(name.encode())])


def _resampled_cells(cells: np.ndarray, resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of `cells` and, per resample of `cells` (drawn with replacement),
    how often each occurs: (distinct (U,), counts (resamples + 1, U)), the observed counts
    first. Resampling rows is a multinomial draw over the distinct rows, so this costs the
    same for 200 rows as for 200,000."""
    distinct, observed = np.unique(cells, return_counts=True)
    drawn = rng.multinomial(len(cells), observed / len(cells), size=resamples)
    return distinct, np.vstack([observed, drawn])


def _confusions(counts: np.ndarray, decisions: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Confusion matrices (resamples, classes, classes) from per-resample counts of distinct (decision, label) rows."""
    one_hot = np.zeros((len(decisions), classes * classes))
    one_hot[np.arange(len(decisions)), decisions * classes + labels] = 1
    return (counts @ one_hot).reshape(len(counts), classes, classes)


def _kpi_values(kpi: Kpi, confusions: np.ndarray) -> np.ndarray:
    """The KPI of each confusion matrix; a division by zero gives the NaN that marks it undefined, silently."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(kpi.of_confusion(confusions), dtype=np.float64)


def _kpi_check(
    name: str,
    kpi: Kpi,
    differences: np.ndarray,
    n_champion: int,
    n_challenger: int,
    alpha: float,
    next_at: int | None,
) -> GateCheck:
    """The verdict of one KPI from its differences (challenger minus champion): the observed one
    first, then one per bootstrap resample.

    Passes when the (1 - 2 alpha) percentile interval excludes a loss larger than the margin
    (non-inferior); fails when it excludes no loss at all (significantly worse) and the
    observed loss exceeds the margin; else insufficient data.
    """
    observed, resampled = differences[0], differences[1:]
    undefined = int(np.count_nonzero(~np.isfinite(resampled)))
    if not np.isfinite(observed) or undefined:
        why = f"{name} is undefined on {'these rows' if not np.isfinite(observed) else f'{undefined} resamples'}"
        return _insufficient(
            f"kpi:{name}", "kpi", why + " (too few rows of a class it needs)", n_champion, n_challenger, next_at
        )
    low, high = np.quantile(resampled, [alpha, 1 - alpha])
    # Oriented so that positive is better for the challenger.
    sign = 1.0 if kpi.better == "higher" else -1.0
    worst, best, gain = min(sign * low, sign * high), max(sign * low, sign * high), sign * observed
    if worst > -kpi.margin:
        verdict: Verdict = PASS
        finding = f"non-inferior: the interval excludes a loss of more than {kpi.margin:g}"
    elif best < 0 and gain < -kpi.margin:
        verdict = FAIL
        finding = f"worse: significantly, and by more than the margin {kpi.margin:g}"
    else:
        verdict = INSUFFICIENT
        finding = f"undecided: the interval spans a loss of the margin {kpi.margin:g}"
    why = (
        f"{name} challenger - champion = {observed:+.4f} [{low:+.4f}, {high:+.4f}] ({kpi.better} is better), {finding}"
    )
    return GateCheck(
        name=f"kpi:{name}",
        kind="kpi",
        verdict=verdict,
        why=why,
        n_champion=n_champion,
        n_challenger=n_challenger,
        alpha=alpha,
        estimate=float(observed),
        ci=(float(low), float(high)),
        margin=kpi.margin,
        next_look_at=next_at,
    )


def _known(labels: np.ndarray | None, rows: int) -> np.ndarray:
    """Labels of `rows` rows, NO_LABEL for every row when none is known."""
    return labels if labels is not None else np.full(rows, NO_LABEL, dtype=np.int64)


def check_paired_kpis(rows: PairedRows, kpis: Mapping[str, Kpi], config: GateConfig) -> list[GateCheck]:
    """Shadow: each KPI of the challenger minus the champion's on the same labelled rows, with a
    paired bootstrap interval (rows resampled, each carrying both versions' decisions)."""
    all_labels = _known(rows.labels, len(rows))
    labelled = np.flatnonzero(all_labels != NO_LABEL)
    look = _look(len(labelled), config.min_labelled_rows, config)
    if not look.reached:
        why = f"{len(labelled)} labelled rows, the first look is at {look.next_at}"
        return [_insufficient(f"kpi:{name}", "kpi", why, len(labelled), len(labelled), look.next_at) for name in kpis]
    judged = labelled[: look.rows]
    champion, challenger = rows.champion_decisions[judged], rows.challenger_decisions[judged]
    labels, classes = all_labels[judged], rows.classes
    cells = (champion * classes + challenger) * classes + labels
    alpha = config.alpha / config.looks
    checks = []
    for name, kpi in kpis.items():
        distinct, counts = _resampled_cells(cells, config.bootstrap_resamples, _bootstrap_rng(config, name))
        label_of = distinct % classes
        champion_kpi = _kpi_values(kpi, _confusions(counts, distinct // (classes * classes), label_of, classes))
        challenger_kpi = _kpi_values(kpi, _confusions(counts, distinct // classes % classes, label_of, classes))
        checks.append(_kpi_check(name, kpi, challenger_kpi - champion_kpi, look.rows, look.rows, alpha, look.next_at))
    return checks


def check_unpaired_kpis(
    champion: VersionRows, challenger: VersionRows, kpis: Mapping[str, Kpi], config: GateConfig
) -> list[GateCheck]:
    """Canary: each KPI of the challenger's labelled rows minus the champion's (different rows),
    with an independent bootstrap of each version's rows, on the first m labelled rows of each
    (m the latest milestone both reached).

    Raises:
        ValueError: the versions' rows count different numbers of classes.
    """
    if champion.classes != challenger.classes:
        raise ValueError(f"classes: the champion's rows have {champion.classes}, the challenger's {challenger.classes}")
    samples = []
    for rows in (champion, challenger):
        labels = _known(rows.labels, len(rows.decisions))
        labelled = np.flatnonzero(labels != NO_LABEL)
        samples.append((rows.decisions[labelled], labels[labelled]))
    look = _look(min(len(labels) for _, labels in samples), config.min_labelled_rows, config)
    if not look.reached:
        n_champion, n_challenger = (len(labels) for _, labels in samples)
        why = (
            f"{n_champion} champion and {n_challenger} challenger labelled rows, "
            f"the first look needs {look.next_at} of each"
        )
        return [_insufficient(f"kpi:{name}", "kpi", why, n_champion, n_challenger, look.next_at) for name in kpis]
    judged = [(decisions[: look.rows], labels[: look.rows]) for decisions, labels in samples]
    classes = champion.classes
    alpha = config.alpha / config.looks
    checks = []
    for name, kpi in kpis.items():
        rng = _bootstrap_rng(config, name)
        champion_kpi, challenger_kpi = (
            _kpi_values(kpi, _confusions(counts, distinct // classes, distinct % classes, classes))
            for distinct, counts in (
                _resampled_cells(decisions * classes + labels, config.bootstrap_resamples, rng)
                for decisions, labels in judged
            )
        )
        checks.append(_kpi_check(name, kpi, challenger_kpi - champion_kpi, look.rows, look.rows, alpha, look.next_at))
    return checks


def _combined(checks: Sequence[GateCheck]) -> Verdict:
    """Fail if any check fails, pass if all pass, else insufficient data (also when there are none)."""
    verdicts = {check.verdict for check in checks}
    if FAIL in verdicts:
        return FAIL
    return PASS if checks and verdicts == {PASS} else INSUFFICIENT


CANARY_WITHOUT_LABELS = "quality unknown: a canary without labelled rows cannot show the challenger is not worse"


def _overall(mode: Literal["shadow", "canary"], checks: list[GateCheck], labelled: bool) -> GateResult:
    """Combine the checks. Quality: with labelled rows the KPIs decide it (a behaviour change the
    labels show is not a loss only warns); without labels a shadow roll-out's behaviour checks
    decide it, and a canary's cannot be shown. Overall: fail if quality or latency fails, pass
    if both pass, else insufficient data."""
    kpis = [check for check in checks if check.kind == "kpi"]
    labels_decide = labelled and bool(kpis)
    reasons = [
        f"{check.name}: {check.why}"
        + (" (a warning only: the labels decide quality)" if labels_decide and check.kind == "behaviour" else "")
        for check in checks
        if check.verdict == FAIL
    ]
    if labels_decide:
        quality, basis = _combined(kpis), "the KPIs on labelled rows"
    elif mode == "shadow":
        quality = _combined([check for check in checks if check.kind == "behaviour"])
        basis = "the behaviour checks (no labelled rows)"
    else:
        quality, basis = INSUFFICIENT, ""
    speed = _combined([check for check in checks if check.kind == "latency"])
    if FAIL in (quality, speed):
        verdict: Verdict = FAIL
    elif quality == PASS and speed == PASS:
        verdict = PASS
        reasons.append(f"quality judged by {basis}; latency within the margin")
    else:
        verdict = INSUFFICIENT
        if not basis:
            reasons.append(CANARY_WITHOUT_LABELS)
        reasons.extend(f"{check.name}: {check.why}" for check in checks if check.verdict == INSUFFICIENT)
    return GateResult(mode=mode, verdict=verdict, reasons=reasons, checks=checks)


def judge_shadow(
    rows: PairedRows, timings: Timings, config: GateConfig | None = None, kpis: Mapping[str, Kpi] = DEFAULT_KPIS
) -> GateResult:
    """The gate of a shadow roll-out from its paired rows and the versions' sub-task timings."""
    config = config or GateConfig()
    checks = [*check_behaviour(rows, config), *check_paired_kpis(rows, kpis, config)]
    checks.append(check_latency(timings, config))
    labelled = rows.labels is not None and bool(np.any(rows.labels != NO_LABEL))
    return _overall("shadow", checks, labelled)


def judge_canary(
    champion: VersionRows,
    challenger: VersionRows,
    timings: Timings,
    config: GateConfig | None = None,
    kpis: Mapping[str, Kpi] = DEFAULT_KPIS,
) -> GateResult:
    """The gate of a canary roll-out from each version's rows and sub-task timings.

    Raises:
        ValueError: the versions' rows count different numbers of classes.
    """
    config = config or GateConfig()
    checks = [*check_unpaired_kpis(champion, challenger, kpis, config), check_latency(timings, config)]
    labelled = any(rows.labels is not None and bool(np.any(rows.labels != NO_LABEL)) for rows in (champion, challenger))
    return _overall("canary", checks, labelled)


class SubtaskCounts(BaseModel):
    """One version's finished sub-tasks in a roll-out: how many, how many failed (gave up
    after retries), and how many of those failed on an output guardrail."""

    finished: int = Field(ge=0)
    failed: int = Field(ge=0)
    guardrail_violations: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> SubtaskCounts:
        if not self.guardrail_violations <= self.failed <= self.finished:
            raise ValueError(
                f"sub-task counts must satisfy guardrail violations ({self.guardrail_violations}) "
                f"<= failed ({self.failed}) <= finished ({self.finished})"
            )
        return self


class AbortRule(BaseModel):
    """When a challenger is aborted automatically: on any output guardrail violation, or when its
    sub-task failure rate exceeds the champion's by more than `margin` (absolute), significantly
    (Fisher's exact test, one-sided, at `alpha`), once each version has `min_subtasks` finished."""

    model_config = ConfigDict(frozen=True)

    margin: float = Field(default=0.05, gt=0, lt=1)
    min_subtasks: int = Field(default=10, ge=1)
    alpha: float = Field(default=0.01, gt=0, lt=0.5)


def abort_reason(champion: SubtaskCounts, challenger: SubtaskCounts, rule: AbortRule | None = None) -> str | None:
    """Why the challenger must be aborted now, or None when it may go on."""
    rule = rule or AbortRule()
    if challenger.guardrail_violations:
        return f"{challenger.guardrail_violations} challenger sub-tasks violated the output guardrails"
    if min(champion.finished, challenger.finished) < rule.min_subtasks:
        return None
    champion_rate = champion.failed / champion.finished
    challenger_rate = challenger.failed / challenger.finished
    table = [
        [challenger.failed, challenger.finished - challenger.failed],
        [champion.failed, champion.finished - champion.failed],
    ]
    p_value = float(stats.fisher_exact(table, alternative="greater").pvalue)
    if challenger_rate - champion_rate > rule.margin and p_value < rule.alpha:
        return (
            f"challenger sub-task failure rate {challenger_rate:.1%} ({challenger.failed} of {challenger.finished}) "
            f"exceeds the champion's {champion_rate:.1%} ({champion.failed} of {champion.finished}) by more than "
            f"{rule.margin:.0%} (Fisher's exact test p = {p_value:.2g})"
        )
    return None

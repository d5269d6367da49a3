"""The gate's checks, each of a sample at its milestones (sequential looks): behaviour
(agreement, flips, scores), latency, and KPIs on labelled rows, paired or not."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from pipeline.gate.evidence import (
    FAIL,
    INSUFFICIENT,
    NO_LABEL,
    PASS,
    CheckKind,
    GateCheck,
    GateConfig,
    Kpi,
    PairedRows,
    Timings,
    Verdict,
    VersionRows,
)


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


def _behaviour(name: str, failed: bool, why: str, n: int, alpha: float, margin: float, **figures: Any) -> GateCheck:
    """A shadow behaviour check on `n` paired rows: `fail` when `failed`, else `pass`;
    `figures` are its statistic, p-value, estimate and interval."""
    return GateCheck(
        name=name,
        kind="behaviour",
        verdict=FAIL if failed else PASS,
        why=why,
        n_champion=n,
        n_challenger=n,
        alpha=alpha,
        margin=margin,
        **figures,
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
    return _behaviour(
        "agreement",
        failed,
        why,
        n,
        alpha,
        config.min_agreement,
        statistic=agreed,
        p_value=test.pvalue,
        estimate=agreed / n,
        ci=(low, high),
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
    return _behaviour(
        "flips", failed, why, n, alpha, config.max_class_shift, statistic=statistic, p_value=p_value, estimate=shift
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
    return _behaviour(
        "scores",
        failed,
        why,
        n,
        alpha,
        config.max_score_shift,
        statistic=statistic,
        p_value=p_value,
        estimate=mean_shift,
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
    test (one-sided) of the challenger's CPU seconds of predict per row against the champion's times
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
        f"median predict CPU per row {ratio:.2f}x the champion's, {finding} the {config.max_slowdown:g}x margin "
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

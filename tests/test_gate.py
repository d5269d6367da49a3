"""The roll-out gate (`pipeline.gate`): each check's verdict logic and edge cases, the overall
verdict, the abort rule, and the simulated error rates issue 13 asks for. No services."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from bench.gate_simulation import Scenario, failed_within, passed_at, simulate_verdicts
from pipeline import gate
from pipeline.gate import (
    FAIL,
    INSUFFICIENT,
    NO_LABEL,
    PASS,
    GateConfig,
    GateResult,
    Kpi,
    PairedRows,
    SubtaskCounts,
    Timings,
    VersionRows,
    abort_reason,
    accuracy,
    false_positive_rate,
    judge_canary,
    judge_shadow,
    recall,
)

CONFIG = GateConfig()
ALPHA = CONFIG.alpha / CONFIG.looks
NO_TIMINGS = Timings(np.empty(0), np.empty(0))


def paired(
    champion_decisions: np.ndarray,
    challenger_decisions: np.ndarray,
    labels: np.ndarray | None = None,
    champion_scores: np.ndarray | None = None,
    challenger_scores: np.ndarray | None = None,
) -> PairedRows:
    """Paired rows whose scores default to the decisions themselves."""
    return PairedRows(
        champion_decisions.astype(float) if champion_scores is None else champion_scores,
        challenger_decisions.astype(float) if challenger_scores is None else challenger_scores,
        champion_decisions,
        challenger_decisions,
        labels,
    )


def flipped(decisions: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`decisions` (0/1) with those of `rows` flipped."""
    changed = decisions.copy()
    changed[rows] = 1 - changed[rows]
    return changed


def same_timings(count: int, seed: int = 0) -> Timings:
    rng = np.random.default_rng(seed)
    return Timings(rng.lognormal(-10, 0.2, count), rng.lognormal(-10, 0.2, count))


def check(result: GateResult, name: str) -> gate.GateCheck:
    return next(found for found in result.checks if found.name == name)


# --- input validation ---


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("champion_scores", [0.1, float("nan"), 0.3], "champion_scores: 1 values are NaN or infinite"),
        ("challenger_scores", [0.1, float("inf"), 0.3], "challenger_scores: 1 values are NaN or infinite"),
        ("champion_decisions", [0, 0.5, 1], "champion_decisions: 1 values are not class numbers"),
        ("challenger_decisions", [0, -1, 1], "challenger_decisions: 1 values are below 0"),
        ("labels", [0, -2, 1], "labels: 1 values are below -1"),
        ("labels", [0, float("nan"), 1], "labels: 1 values are not class numbers"),
        ("challenger_scores", [0.1, 0.2], "rows of unequal length"),
        ("champion_decisions", ["a", "b", "c"], "champion_decisions: class numbers must be integers"),
        ("challenger_decisions", [0, 2, 1], "challenger_decisions: 1 values are not below the 2 classes"),
        ("classes", 1, "classes: a decision needs at least 2 classes, not 1"),
    ],
)
def test_paired_rows_refuse_bad_values_with_one_clear_error(field: str, value: list[object], message: str) -> None:
    values: dict[str, object] = {
        "champion_scores": [0.1, 0.2, 0.3],
        "challenger_scores": [0.1, 0.2, 0.3],
        "champion_decisions": [0, 1, 1],
        "challenger_decisions": [0, 1, 0],
        "labels": [0, NO_LABEL, 1],
    }
    values[field] = value
    with pytest.raises(ValueError, match=message):
        PairedRows(**values)  # type: ignore[arg-type]


def test_timings_and_version_rows_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="challenger seconds per row: 1 compute times are negative"):
        Timings(np.array([0.1, 0.2]), np.array([0.1, -0.2]))
    with pytest.raises(ValueError, match="champion seconds per row: 1 values are NaN"):
        Timings(np.array([0.1, np.nan]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="rows of unequal length: decisions 3, labels 2"):
        VersionRows(np.array([0, 1, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="expected one value per row"):
        VersionRows(np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="classes: the champion's rows have 2, the challenger's 3"):
        judge_canary(VersionRows(np.array([0, 1])), VersionRows(np.array([0, 2]), classes=3), NO_TIMINGS)
    with pytest.raises(ValueError, match="margin must be positive"):
        Kpi(accuracy, better="higher", margin=0)
    with pytest.raises(ValidationError, match="guardrail violations"):
        SubtaskCounts(finished=5, failed=6)


# --- milestones and sequential looks ---


def test_milestones_double_from_the_minimum() -> None:
    assert CONFIG.milestones(500) == [500, 1000, 2000, 4000, 8000, 16000, 32000, 64000]
    assert GateConfig(looks=3, growth=1.5).milestones(200) == [200, 300, 450]


def test_no_data_gives_insufficient_data_everywhere() -> None:
    empty = np.empty(0, dtype=np.int64)
    result = judge_shadow(paired(empty, empty), NO_TIMINGS)
    assert result.verdict == INSUFFICIENT
    assert {found.verdict for found in result.checks} == {INSUFFICIENT}
    assert check(result, "agreement").next_look_at == CONFIG.min_paired_rows
    assert check(result, "kpi:accuracy").why == f"0 labelled rows, the first look is at {CONFIG.min_labelled_rows}"
    canary = judge_canary(VersionRows(empty), VersionRows(empty), NO_TIMINGS)
    assert canary.verdict == INSUFFICIENT


def test_a_recompute_between_milestones_returns_the_same_result_and_the_next_milestone_moves_it() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 2100)
    champion = np.where(rng.random(2100) < 0.9, labels, 1 - labels)
    challenger = np.where(rng.random(2100) < 0.9, labels, 1 - labels)
    scores = rng.random((2, 2100))
    seconds = rng.lognormal(-10, 0.2, (2, 21))

    def at(rows: int) -> GateResult:
        evidence = PairedRows(scores[0, :rows], scores[1, :rows], champion[:rows], challenger[:rows], labels[:rows])
        return judge_shadow(evidence, Timings(seconds[0, : rows // 100], seconds[1, : rows // 100]))

    assert at(1000).model_dump() == at(1500).model_dump() == at(1999).model_dump()
    moved = at(2000)
    assert check(moved, "agreement").n_champion == 2000
    assert check(moved, "kpi:accuracy").n_champion == 2000
    assert check(moved, "latency").n_champion == 20
    # Past the last milestone nothing changes: the verdict is final.
    final = judge_shadow(
        PairedRows(scores[0], scores[1], champion, challenger, labels), same_timings(21), GateConfig(looks=2)
    )
    assert check(final, "agreement").n_champion == 1000
    assert check(final, "agreement").next_look_at is None


# --- agreement ---


def test_agreement_fails_only_when_significantly_below_the_floor() -> None:
    decisions = np.zeros(2000, dtype=np.int64)
    decisions[::2] = 1
    low = gate.check_agreement(decisions, flipped(decisions, np.arange(0, 2000, 7)), ALPHA, CONFIG)  # 85.7 % agree
    assert (low.verdict, round(low.estimate or 0, 3)) == (FAIL, 0.857)
    assert low.ci is not None and low.ci[1] < CONFIG.min_agreement
    high = gate.check_agreement(decisions, flipped(decisions, np.arange(0, 2000, 20)), ALPHA, CONFIG)  # 95 % agree
    assert high.verdict == PASS
    borderline = gate.check_agreement(decisions, flipped(decisions, np.arange(0, 2000, 11)), ALPHA, CONFIG)  # 90.9 %
    assert borderline.verdict == PASS


# --- flips: McNemar (Bowker beyond two classes) ---


def test_zero_discordant_pairs_pass_with_p_one() -> None:
    decisions = np.tile([0, 1], 500)
    result = gate.check_flips(decisions, decisions.copy(), 2, ALPHA, CONFIG)
    assert (result.verdict, result.p_value, result.estimate) == (PASS, 1.0, 0.0)


def test_flips_all_one_way_fail_only_beyond_the_class_shift_margin() -> None:
    decisions = np.zeros(1000, dtype=np.int64)
    decisions[:500] = 1
    # 100 rows move from 1 to 0: significant, and class 0's share moves +10 % > 5 %.
    many = gate.check_flips(decisions, flipped(decisions, np.arange(100)), 2, ALPHA, CONFIG)
    assert (many.verdict, many.statistic) == (FAIL, 0.0)
    assert many.estimate == pytest.approx(0.1)
    assert many.p_value is not None and many.p_value < 1e-25
    # 30 rows, all one way: significant, but a 3 % shift is within the margin.
    few = gate.check_flips(decisions, flipped(decisions, np.arange(30)), 2, ALPHA, CONFIG)
    assert few.p_value is not None and few.p_value < ALPHA
    assert few.verdict == PASS


def test_symmetric_flips_pass_however_many() -> None:
    decisions = np.zeros(1000, dtype=np.int64)
    decisions[:500] = 1
    result = gate.check_flips(decisions, flipped(decisions, np.r_[0:100, 500:600]), 2, ALPHA, CONFIG)
    assert (result.verdict, result.p_value, result.estimate) == (PASS, 1.0, 0.0)


def test_bowker_test_for_more_than_two_classes() -> None:
    champion = np.repeat([0, 1, 2], 400)
    symmetric = champion.copy()
    symmetric[:40], symmetric[400:440] = 1, 0  # 40 flips 0 -> 1 and 40 flips 1 -> 0
    result = gate.check_flips(champion, symmetric, 3, ALPHA, CONFIG)
    assert (result.verdict, result.statistic, result.p_value) == (PASS, 0.0, 1.0)
    one_way = champion.copy()
    one_way[:100] = 2  # class 0 loses 100 of 1,200 rows to class 2
    shifted = gate.check_flips(champion, one_way, 3, ALPHA, CONFIG)
    assert shifted.verdict == FAIL
    assert shifted.statistic == pytest.approx(100.0)
    assert "Bowker" in shifted.why


# --- scores: Wilcoxon signed-rank ---


def test_identical_scores_pass_without_a_test() -> None:
    scores = np.linspace(0, 1, 600)
    result = gate.check_scores(scores, scores.copy(), ALPHA, CONFIG)
    assert (result.verdict, result.p_value, result.estimate) == (PASS, 1.0, 0.0)
    assert result.why.startswith("0 of 600 scores changed")


def test_ties_and_zeros_in_score_differences() -> None:
    champion = np.full(1000, 0.5)
    # 400 rows unchanged, 600 raised by exactly 0.1 (all tied): a shift of 0.06 on average.
    challenger = champion.copy()
    challenger[400:] += 0.1
    shifted = gate.check_scores(champion, challenger, ALPHA, CONFIG)
    assert shifted.verdict == FAIL
    assert shifted.estimate == pytest.approx(0.06)
    assert shifted.p_value is not None and np.isfinite(shifted.p_value) and shifted.p_value < ALPHA
    # The same rows raised by 0.05: as significant, but a 0.03 shift is within the margin.
    challenger[400:] = 0.55
    within = gate.check_scores(champion, challenger, ALPHA, CONFIG)
    assert within.p_value is not None and within.p_value < ALPHA
    assert within.verdict == PASS


def test_symmetric_score_noise_passes() -> None:
    rng = np.random.default_rng(1)
    champion = rng.random(2000)
    result = gate.check_scores(champion, champion + rng.normal(0, 0.2, 2000), ALPHA, CONFIG)
    assert result.verdict == PASS


# --- latency: Mann-Whitney ---


def test_latency_fails_when_significantly_more_than_the_margin_slower() -> None:
    rng = np.random.default_rng(2)
    base = rng.lognormal(-10, 0.1, 20)
    slower = gate.check_latency(Timings(base, base * 1.5), CONFIG)
    assert slower.verdict == FAIL
    assert slower.estimate == pytest.approx(1.5)
    # 10 % slower: within the 1.2x margin.
    slightly = gate.check_latency(Timings(base, base * 1.1), CONFIG)
    assert slightly.verdict == PASS
    assert slightly.estimate == pytest.approx(1.1)
    # 30 % slower, but too noisy to say it is more than 1.2x: wait for more sub-tasks.
    noisy = np.random.default_rng(3).lognormal(-10, 1.0, (2, 20))
    waiting = gate.check_latency(Timings(noisy[0], np.median(noisy[0]) / np.median(noisy[1]) * 1.3 * noisy[1]), CONFIG)
    assert waiting.verdict == INSUFFICIENT
    assert waiting.estimate == pytest.approx(1.3)
    faster = gate.check_latency(Timings(base, base * 0.5), CONFIG)
    assert faster.verdict == PASS


def test_latency_waits_for_the_minimum_of_each_version_and_judges_equal_prefixes() -> None:
    few = gate.check_latency(Timings(np.ones(50), np.ones(9)), CONFIG)
    assert few.verdict == INSUFFICIENT
    assert few.next_look_at == CONFIG.min_timings
    judged = gate.check_latency(Timings(np.ones(50), np.ones(25)), CONFIG)
    assert (judged.n_champion, judged.n_challenger, judged.next_look_at) == (20, 20, 40)


def test_latency_with_a_zero_champion_median() -> None:
    zero = gate.check_latency(Timings(np.zeros(10), np.full(10, 1e-6)), CONFIG)
    assert zero.verdict == FAIL
    assert zero.estimate is None  # an infinite ratio is not stored as a number
    both_zero = gate.check_latency(Timings(np.zeros(10), np.zeros(10)), CONFIG)
    assert (both_zero.verdict, both_zero.estimate) == (PASS, 1.0)


# --- KPIs: bootstrap against a non-inferiority margin ---


def labelled_pair(rows: int, champion_right: float, challenger_right: float, seed: int) -> PairedRows:
    """Labelled rows whose champion is right on exactly a `champion_right` share of them and the
    challenger on a `challenger_right` share, the less accurate one right only where the other is."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, rows)
    rank = rng.permutation(rows)
    champion = np.where(rank < champion_right * rows, labels, 1 - labels)
    challenger = np.where(rank < challenger_right * rows, labels, 1 - labels)
    return paired(champion, challenger, labels)


def test_kpi_verdicts_pass_fail_and_undecided() -> None:
    same = gate.check_paired_kpis(labelled_pair(2000, 0.9, 0.9, 0), gate.DEFAULT_KPIS, CONFIG)[0]
    assert (same.verdict, same.estimate, same.ci) == (PASS, 0.0, (0.0, 0.0))
    worse = gate.check_paired_kpis(labelled_pair(2000, 0.9, 0.85, 0), gate.DEFAULT_KPIS, CONFIG)[0]
    assert worse.verdict == FAIL
    assert worse.estimate == pytest.approx(-0.05)
    assert worse.ci is not None and worse.ci[1] < 0
    # 1.5 points worse on 1,000 rows, each version wrong on rows of its own: the interval holds
    # both "within the margin" and "no loss".
    labels = np.tile([0, 1], 500)
    champion, challenger = flipped(labels, np.arange(100)), flipped(labels, np.arange(100, 215))
    unsure = gate.check_paired_kpis(paired(champion, challenger, labels), gate.DEFAULT_KPIS, CONFIG)[0]
    assert unsure.estimate == pytest.approx(-0.015)
    assert unsure.verdict == INSUFFICIENT
    assert "undecided" in unsure.why


def test_kpi_direction_lower_is_better() -> None:
    labels = np.tile([0, 1], 1000)
    champion = labels.copy()
    challenger = labels.copy()
    challenger[np.flatnonzero(labels == 0)[:300]] = 1  # 300 of 1,000 negatives flagged
    kpis = {"false positives": Kpi(false_positive_rate(positive=1), better="lower", margin=0.02)}
    worse = gate.check_paired_kpis(paired(champion, challenger, labels), kpis, CONFIG)[0]
    assert worse.verdict == FAIL
    assert worse.estimate == pytest.approx(0.3)
    better = gate.check_paired_kpis(paired(challenger, champion, labels), kpis, CONFIG)[0]
    assert better.verdict == PASS
    assert better.estimate == pytest.approx(-0.3)


def test_kpi_undefined_on_the_rows_is_insufficient_data() -> None:
    labels = np.zeros(400, dtype=np.int64)  # no row labelled 1: recall of class 1 is undefined
    kpis = {"recall": Kpi(recall(positive=1), better="higher", margin=0.02)}
    result = gate.check_paired_kpis(paired(labels, labels, labels), kpis, CONFIG)[0]
    assert result.verdict == INSUFFICIENT
    assert "recall is undefined on these rows" in result.why


def test_kpi_of_a_rare_class_undefined_in_some_resamples_is_insufficient_data() -> None:
    labels = np.zeros(400, dtype=np.int64)
    labels[0] = 1  # one positive: most resamples hold it, some do not
    kpis = {"recall": Kpi(recall(positive=1), better="higher", margin=0.02)}
    result = gate.check_paired_kpis(paired(labels, labels, labels), kpis, CONFIG)[0]
    assert result.verdict == INSUFFICIENT
    assert "resamples" in result.why


def test_a_kpi_of_a_class_no_row_has_yet_is_insufficient_data() -> None:
    decisions = np.tile([0, 1], 200)  # digits 0 and 1 only, so far
    kpis = {"recall of 9": Kpi(recall(positive=9), better="higher", margin=0.02)}
    rows = PairedRows(decisions.astype(float), decisions.astype(float), decisions, decisions, decisions, classes=10)
    result = gate.check_paired_kpis(rows, kpis, CONFIG)[0]
    assert result.verdict == INSUFFICIENT


def test_kpi_functions_on_a_confusion_matrix() -> None:
    # decided (rows) x labelled (columns): 40 true 0, 10 false 1, 5 false 0, 45 true 1
    confusion = np.array([[40, 5], [10, 45]])
    assert accuracy(confusion) == pytest.approx(0.85)
    assert recall(1)(confusion) == pytest.approx(45 / 50)
    assert recall(0)(confusion) == pytest.approx(40 / 50)
    assert false_positive_rate(1)(confusion) == pytest.approx(10 / 50)
    stacked = accuracy(np.stack([confusion, np.eye(2) * 10]))
    assert stacked.tolist() == pytest.approx([0.85, 1.0])


def test_the_multinomial_bootstrap_matches_resampling_rows() -> None:
    rng = np.random.default_rng(4)
    rows = labelled_pair(1000, 0.9, 0.87, 5)
    result = gate.check_paired_kpis(rows, gate.DEFAULT_KPIS, CONFIG)[0]
    assert rows.labels is not None
    right = (rows.challenger_decisions == rows.labels).astype(float) - (rows.champion_decisions == rows.labels)
    resampled = right[rng.integers(0, 1000, (4000, 1000))].mean(axis=1)
    expected = np.quantile(resampled, [ALPHA, 1 - ALPHA])
    assert result.ci is not None
    assert result.ci == pytest.approx(tuple(expected), abs=0.004)


def test_the_bootstrap_is_seeded() -> None:
    rows = labelled_pair(1000, 0.9, 0.87, 5)
    first = gate.check_paired_kpis(rows, gate.DEFAULT_KPIS, CONFIG)[0]
    assert first == gate.check_paired_kpis(rows, gate.DEFAULT_KPIS, CONFIG)[0]
    assert first.ci != gate.check_paired_kpis(rows, gate.DEFAULT_KPIS, GateConfig(seed=1))[0].ci


def test_canary_kpis_use_independent_samples_of_equal_size() -> None:
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 5000)
    champion = VersionRows(np.where(rng.random(5000) < 0.9, labels, 1 - labels), labels)
    worse_labels = labels[:900]
    challenger = VersionRows(np.where(rng.random(900) < 0.7, worse_labels, 1 - worse_labels), worse_labels)
    result = judge_canary(champion, challenger, same_timings(10))
    kpi = check(result, "kpi:accuracy")
    assert (kpi.n_champion, kpi.n_challenger, kpi.verdict) == (500, 500, FAIL)
    assert result.verdict == FAIL


# --- the overall verdict ---


def test_with_labels_the_kpis_decide_and_a_behaviour_change_only_warns() -> None:
    # The challenger changes 20 % of the decisions, all to the right answer.
    labels = np.tile([0, 1], 1000)
    champion = np.where(np.arange(2000) < 400, 1 - labels, labels)
    result = judge_shadow(paired(champion, labels.copy(), labels), same_timings(10))
    assert check(result, "agreement").verdict == FAIL
    assert check(result, "kpi:accuracy").verdict == PASS
    assert result.verdict == PASS
    assert any(reason.startswith("agreement:") and "warning only" in reason for reason in result.reasons)


def test_without_labels_a_behaviour_change_fails() -> None:
    labels = np.tile([0, 1], 1000)
    champion = np.where(np.arange(2000) < 400, 1 - labels, labels)
    result = judge_shadow(paired(champion, labels.copy()), same_timings(10))
    assert result.verdict == FAIL
    assert result.reasons[0].startswith("agreement:")
    assert "warning" not in result.reasons[0]


def test_labels_that_are_still_too_few_make_the_gate_wait() -> None:
    labels = np.full(2000, NO_LABEL)
    labels[:50] = 1
    decisions = np.tile([0, 1], 1000)
    result = judge_shadow(paired(decisions, decisions.copy(), labels), same_timings(10))
    assert result.verdict == INSUFFICIENT
    assert any(reason.startswith("kpi:accuracy: 50 labelled rows") for reason in result.reasons)


def test_a_canary_without_labels_cannot_pass() -> None:
    decisions = np.tile([0, 1], 1000)
    result = judge_canary(VersionRows(decisions), VersionRows(decisions), same_timings(10))
    assert result.verdict == INSUFFICIENT
    assert result.reasons[0] == gate.CANARY_WITHOUT_LABELS


def test_a_slower_challenger_fails_even_when_its_decisions_are_the_same() -> None:
    decisions = np.tile([0, 1], 1000)
    base = np.random.default_rng(7).lognormal(-10, 0.1, 10)
    result = judge_shadow(paired(decisions, decisions.copy(), decisions), Timings(base, base * 2))
    assert result.verdict == FAIL
    assert result.reasons[0].startswith("latency:")


def test_the_gate_result_is_json_and_reads_back() -> None:
    rows = labelled_pair(2000, 0.9, 0.88, 8)
    result = judge_shadow(rows, Timings(np.zeros(10), np.full(10, 1e-6)))
    text = result.model_dump_json()
    assert "NaN" not in text and "Infinity" not in text
    assert GateResult.model_validate_json(text) == result
    assert {found.verdict for found in result.checks} <= {PASS, FAIL, INSUFFICIENT}


# --- the abort rule ---


def test_abort_on_any_guardrail_violation() -> None:
    reason = abort_reason(
        SubtaskCounts(finished=0, failed=0), SubtaskCounts(finished=1, failed=1, guardrail_violations=1)
    )
    assert reason == "1 challenger sub-tasks violated the output guardrails"


def test_abort_on_a_failure_rate_beyond_the_margin() -> None:
    healthy = SubtaskCounts(finished=10, failed=0)
    assert abort_reason(healthy, SubtaskCounts(finished=9, failed=9)) is None  # fewer than 10 finished
    reason = abort_reason(healthy, SubtaskCounts(finished=10, failed=10))
    assert reason is not None and reason.startswith("challenger sub-task failure rate 100.0% (10 of 10)")
    # 3 of 20 against 0 of 20: 15 points worse, but not significant at 0.01.
    assert abort_reason(SubtaskCounts(finished=20, failed=0), SubtaskCounts(finished=20, failed=3)) is None
    # Significant, but within the 5-point margin.
    many = SubtaskCounts(finished=100_000, failed=1000)
    assert abort_reason(many, SubtaskCounts(finished=100_000, failed=2000)) is None


# --- simulations (issue 13): 200 roll-outs each, the gate recomputed after every batch of 1,000 rows ---

ROLLOUTS = 200


def test_simulated_identical_scorers_fail_in_at_most_5_percent() -> None:
    scenario = Scenario("identical scorers, labelled (rho 0.9)", batches=10)
    verdicts = simulate_verdicts(scenario, ROLLOUTS, seed=1)
    rate = failed_within(verdicts, 10)
    print(f"\nidentical scorers: fail at any of 10 looks in {rate}")
    assert rate.count <= 0.05 * ROLLOUTS


def test_simulated_3_point_accuracy_drop_fails_within_5_batches_in_at_least_90_percent() -> None:
    scenario = Scenario("3-point accuracy drop, labelled (rho 0)", challenger_accuracy=0.87, correlation=0.0, batches=5)
    verdicts = simulate_verdicts(scenario, ROLLOUTS, seed=2)
    rate = failed_within(verdicts, 5)
    print(f"\n3-point accuracy drop, independent errors: fail within 5 batches in {rate}")
    assert rate.count >= 0.9 * ROLLOUTS


def test_simulated_different_seeds_of_one_recipe_pass_once_the_minimum_sample_is_reached() -> None:
    # Every check's first look is reached with batch 2 (10 sub-tasks timed per version); where the
    # latency look is still undecided there (a median ratio above 1.2x by chance), batch 4 decides.
    scenario = Scenario("different seeds", correlation=0.95, challenger_accuracy=0.899, labelled=False, batches=4)
    verdicts = simulate_verdicts(scenario, ROLLOUTS, seed=3)
    assert (verdicts[:, 0] == INSUFFICIENT).all()
    first, later = passed_at(verdicts, 2), passed_at(verdicts, 4)
    print(f"\ndifferent seeds, unlabelled: pass after batch 2 in {first}, after batch 4 in {later}")
    assert first.count >= 0.85 * ROLLOUTS
    assert later.count >= 0.95 * ROLLOUTS
    assert failed_within(verdicts, 4).count == 0

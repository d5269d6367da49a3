"""The roll-out gate's error rates, measured by simulation (no services): the figures of
docs/rollouts.md.

    python -m bench.gate_simulation [--rollouts 200] [--seed 0] [--json]

Each simulated roll-out feeds the gate (`pipeline.gate`, default config and KPIs) batches
of labelled (or unlabelled) rows and recomputes it after every batch, as the roll-out
plumbing does; a roll-out "fails" when any of those looks says `fail`.

The scorers: a row's label y is 0 or 1 (even odds); each version's latent value is
mu * (+1 if y else -1) + sqrt(rho) * z + sqrt(1 - rho) * e, with z shared by both
versions (a hard row is hard for both) and e its own noise; its score is the normal CDF
of the latent value and its decision is score >= 0.5, so its accuracy is Phi(mu) and
`correlation` (rho) sets how often the two versions err on the same rows. Compute time
per row of each sub-task is log-normal (sigma 0.25), `subtasks_per_batch` per version and
batch, the challenger's median `slowdown` times the champion's.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import special, stats

from pipeline.gate import (
    FAIL,
    NO_LABEL,
    PASS,
    AbortRule,
    GateConfig,
    PairedRows,
    SubtaskCounts,
    Timings,
    Verdict,
    VersionRows,
    abort_reason,
    judge_canary,
    judge_shadow,
)

ROWS_PER_BATCH = 1000
SECONDS_PER_ROW = 2e-5
TIMING_SIGMA = 0.25


@dataclass(frozen=True)
class Scenario:
    """One kind of roll-out: two scorers (see the module's docstring) and how batches arrive."""

    name: str
    champion_accuracy: float = 0.90
    challenger_accuracy: float = 0.90
    correlation: float = 0.9
    labelled: bool = True
    mode: Literal["shadow", "canary"] = "shadow"
    # Canary: the share of each batch's rows the challenger serves.
    canary_share: float = 0.5
    batches: int = 10
    subtasks_per_batch: int = 5
    slowdown: float = 1.0


@dataclass(frozen=True)
class Batch:
    """One simulated batch: both versions' scores and decisions of the same rows, their labels, timings."""

    champion_scores: np.ndarray
    challenger_scores: np.ndarray
    labels: np.ndarray
    champion_seconds: np.ndarray
    challenger_seconds: np.ndarray


def simulate_batch(scenario: Scenario, rng: np.random.Generator) -> Batch:
    """A batch of ROWS_PER_BATCH rows scored by both versions."""
    labels = rng.integers(0, 2, ROWS_PER_BATCH)
    sign = 2.0 * labels - 1.0
    shared = np.sqrt(scenario.correlation) * rng.standard_normal(ROWS_PER_BATCH)
    own = np.sqrt(1 - scenario.correlation)

    def scores(accuracy: float) -> np.ndarray:
        latent = special.ndtri(accuracy) * sign + shared + own * rng.standard_normal(ROWS_PER_BATCH)
        return np.asarray(special.ndtr(latent))

    def seconds(median: float) -> np.ndarray:
        return median * rng.lognormal(0.0, TIMING_SIGMA, scenario.subtasks_per_batch)

    return Batch(
        scores(scenario.champion_accuracy),
        scores(scenario.challenger_accuracy),
        labels,
        seconds(SECONDS_PER_ROW),
        seconds(SECONDS_PER_ROW * scenario.slowdown),
    )


@dataclass
class Rollout:
    """The rows a roll-out has gathered so far, batch after batch."""

    scenario: Scenario
    batches: list[Batch] = field(default_factory=list)
    # Canary: per row, whether the challenger served it.
    served_by_challenger: list[np.ndarray] = field(default_factory=list)

    def add(self, batch: Batch, rng: np.random.Generator) -> None:
        self.batches.append(batch)
        self.served_by_challenger.append(rng.random(ROWS_PER_BATCH) < self.scenario.canary_share)

    def _joined(self, name: str) -> np.ndarray:
        return np.concatenate([getattr(batch, name) for batch in self.batches])

    def judge(self, config: GateConfig) -> Verdict:
        """The gate's overall verdict on every row so far."""
        labels = self._joined("labels") if self.scenario.labelled else np.full(len(self._joined("labels")), NO_LABEL)
        champion_scores, challenger_scores = self._joined("champion_scores"), self._joined("challenger_scores")
        timings = Timings(self._joined("champion_seconds"), self._joined("challenger_seconds"))
        champion_decisions = (champion_scores >= 0.5).astype(np.int64)
        challenger_decisions = (challenger_scores >= 0.5).astype(np.int64)
        if self.scenario.mode == "shadow":
            rows = PairedRows(champion_scores, challenger_scores, champion_decisions, challenger_decisions, labels)
            return judge_shadow(rows, timings, config).verdict
        canary = np.concatenate(self.served_by_challenger)
        champion = VersionRows(champion_decisions[~canary], labels[~canary])
        challenger = VersionRows(challenger_decisions[canary], labels[canary])
        return judge_canary(champion, challenger, timings, config).verdict


def _judged_sizes(rollout: Rollout, config: GateConfig) -> tuple[int, ...]:
    """The prefix sizes the gate would judge now, per sample; the gate's result is a function
    of these prefixes only, so while they stay the same, a recompute returns the same result."""

    def reached(available: int, first: int) -> int:
        return max((m for m in config.milestones(first) if m <= available), default=0)

    rows = len(rollout.batches) * ROWS_PER_BATCH
    champion_rows = challenger_rows = rows
    if rollout.scenario.mode == "canary":
        challenger_rows = int(np.concatenate(rollout.served_by_challenger).sum())
        champion_rows = rows - challenger_rows
    timed = len(rollout.batches) * rollout.scenario.subtasks_per_batch
    labelled = min(champion_rows, challenger_rows)
    return (
        reached(rows, config.min_paired_rows),
        reached(labelled, config.min_labelled_rows),
        reached(timed, config.min_timings),
    )


def simulate_verdicts(scenario: Scenario, rollouts: int, seed: int, config: GateConfig | None = None) -> np.ndarray:
    """The gate's verdict after every batch of every roll-out: an array (rollouts, batches) of
    verdict strings. The gate is recomputed after every batch; a recompute that would judge
    exactly the same prefixes as the previous one reuses its result (the gate is a
    deterministic function of them: tests/test_gate.py checks it), which saves time only."""
    config = config or GateConfig()
    rng = np.random.default_rng(seed)
    verdicts = np.empty((rollouts, scenario.batches), dtype=object)
    for index in range(rollouts):
        rollout, judged, verdict = Rollout(scenario), None, None
        for batch in range(scenario.batches):
            rollout.add(simulate_batch(scenario, rng), rng)
            sizes = _judged_sizes(rollout, config)
            if sizes != judged:
                judged, verdict = sizes, rollout.judge(config)
            verdicts[index, batch] = verdict
    return verdicts


@dataclass(frozen=True)
class Rate:
    """A share of simulated roll-outs, with its exact (Clopper-Pearson) 95 % interval."""

    count: int
    of: int
    low: float
    high: float

    @classmethod
    def of_mask(cls, mask: np.ndarray) -> Rate:
        count, total = int(mask.sum()), len(mask)
        interval = stats.binomtest(count, total).proportion_ci(0.95)
        return cls(count, total, float(interval.low), float(interval.high))

    def __str__(self) -> str:
        return f"{self.count}/{self.of} = {self.count / self.of:.1%} [{self.low:.1%}, {self.high:.1%}]"


def failed_within(verdicts: np.ndarray, batches: int) -> Rate:
    """The roll-outs whose gate said `fail` at any look within the first `batches` batches."""
    return Rate.of_mask((verdicts[:, :batches] == FAIL).any(axis=1))


def passed_within(verdicts: np.ndarray, batches: int) -> Rate:
    """The roll-outs whose gate said `pass` at any look within the first `batches` batches."""
    return Rate.of_mask((verdicts[:, :batches] == PASS).any(axis=1))


def passed_at(verdicts: np.ndarray, batch: int) -> Rate:
    """The roll-outs whose gate says `pass` after batch number `batch` (1-based)."""
    return Rate.of_mask(verdicts[:, batch - 1] == PASS)


def first_pass(verdicts: np.ndarray) -> list[int | None]:
    """Per roll-out, the first batch (1-based) after which the gate said `pass`, None if never."""
    return [int(np.argmax(row == PASS)) + 1 if (row == PASS).any() else None for row in verdicts]


SCENARIOS = (
    Scenario("identical scorers, labelled (rho 0.9)"),
    Scenario("identical scorers, labelled (rho 0)", correlation=0.0),
    Scenario("identical scorers, unlabelled (rho 0.9)", labelled=False),
    Scenario("identical scorers, unlabelled (rho 0: 18 % of decisions differ)", correlation=0.0, labelled=False),
    Scenario("different seeds of one recipe, labelled (rho 0.95)", correlation=0.95, challenger_accuracy=0.899),
    Scenario(
        "different seeds of one recipe, unlabelled (rho 0.95)",
        correlation=0.95,
        challenger_accuracy=0.899,
        labelled=False,
    ),
    Scenario("3-point accuracy drop, labelled (rho 0.9)", challenger_accuracy=0.87),
    Scenario("3-point accuracy drop, labelled (rho 0.5)", challenger_accuracy=0.87, correlation=0.5),
    Scenario("3-point accuracy drop, labelled (rho 0)", challenger_accuracy=0.87, correlation=0.0),
    Scenario("3-point accuracy drop, unlabelled (rho 0.9)", challenger_accuracy=0.87, labelled=False),
    Scenario(
        "much worse (accuracy 0.6), unlabelled (rho 0.5)", challenger_accuracy=0.6, correlation=0.5, labelled=False
    ),
    Scenario("identical scorers, 1.5x slower per row", slowdown=1.5),
    Scenario("canary 50 %, identical scorers, labelled", mode="canary", batches=20),
    Scenario("canary 50 %, 3-point accuracy drop, labelled", mode="canary", challenger_accuracy=0.87, batches=20),
)


def summarise(scenario: Scenario, verdicts: np.ndarray) -> dict[str, object]:
    """The figures of one scenario."""
    passes = [batch for batch in first_pass(verdicts) if batch is not None]
    last = scenario.batches
    return {
        "scenario": scenario.name,
        "fail within 5 batches": str(failed_within(verdicts, 5)),
        f"fail within {last} batches": str(failed_within(verdicts, last)),
        "pass after batch 5": str(passed_at(verdicts, 5)),
        f"pass after batch {last}": str(passed_at(verdicts, last)),
        f"pass at any look within {last} batches": str(passed_within(verdicts, last)),
        "median first pass (batch)": float(np.median(passes)) if passes else None,
    }


ABORT_CASES = (
    # (what, champion's and challenger's sub-task failure rates, batches watched)
    ("equal 1 % failure rates", 0.01, 0.01, 100),
    ("equal 5 % failure rates", 0.05, 0.05, 100),
    ("challenger fails 30 %, champion 1 %", 0.01, 0.3, 10),
    ("challenger fails every sub-task", 0.01, 1.0, 2),
)


def abort_rates(rollouts: int, seed: int, rule: AbortRule | None = None) -> dict[str, str]:
    """The failure-rate abort rule, checked after every batch (5 sub-tasks per version), per
    case of ABORT_CASES: the share of roll-outs aborted within the batches watched."""
    rng = np.random.default_rng(seed)
    figures = {}
    for name, champion_rate, challenger_rate, batches in ABORT_CASES:
        aborted = np.zeros(rollouts, dtype=bool)
        for index in range(rollouts):
            failed = rng.binomial(5, [[champion_rate, challenger_rate]] * batches).cumsum(axis=0)
            for batch in range(batches):
                finished = 5 * (batch + 1)
                champion = SubtaskCounts(finished=finished, failed=int(failed[batch, 0]))
                challenger = SubtaskCounts(finished=finished, failed=int(failed[batch, 1]))
                if abort_reason(champion, challenger, rule) is not None:
                    aborted[index] = True
                    break
        figures[f"{name}: aborted within {batches} batches"] = str(Rate.of_mask(aborted))
    return figures


LADDER_STARTS = (200, 250)


def ladder_start_rates(rollouts: int, seed: int) -> dict[str, str]:
    """The 3-point accuracy drop with independent errors (the hardest case for the paired KPI
    check), failed within 5 batches, for each first labelled milestone of LADDER_STARTS on the
    same simulated roll-outs: why `min_labelled_rows` is 250."""
    scenario = Scenario("3-point accuracy drop, labelled (rho 0)", challenger_accuracy=0.87, correlation=0.0, batches=5)
    return {
        f"min_labelled_rows {first}: fail within 5 batches": str(
            failed_within(simulate_verdicts(scenario, rollouts, seed, GateConfig(min_labelled_rows=first)), 5)
        )
        for first in LADDER_STARTS
    }


def recompute_cpu_ms(seed: int, repeats: int = 10) -> float:
    """Median CPU milliseconds of one shadow gate recompute at the caps (the last milestones:
    every paired, labelled and timed row the gate can read), process time so that other load
    on the machine does not count."""
    config = GateConfig()
    rng = np.random.default_rng(seed)
    rows = config.milestones(config.min_paired_rows)[-1]
    timed = config.milestones(config.min_timings)[-1]
    labels = rng.integers(0, 2, rows)
    labels[config.milestones(config.min_labelled_rows)[-1] :] = NO_LABEL
    decisions = rng.integers(0, 2, (2, rows))
    evidence = PairedRows(rng.random(rows), rng.random(rows), decisions[0], decisions[1], labels)
    timings = Timings(rng.lognormal(size=timed), rng.lognormal(size=timed))
    costs = []
    for _ in range(repeats):
        started = time.process_time()
        judge_shadow(evidence, timings, config)
        costs.append(1000 * (time.process_time() - started))
    return float(np.median(costs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=200, help="simulated roll-outs per scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    results = [
        summarise(scenario, simulate_verdicts(scenario, args.rollouts, args.seed + index))
        for index, scenario in enumerate(SCENARIOS)
    ]
    aborts = abort_rates(args.rollouts, args.seed)
    ladder = ladder_start_rates(args.rollouts, args.seed)
    cost = recompute_cpu_ms(args.seed)
    if args.json:
        report = {
            "config": GateConfig().model_dump(),
            "gate": results,
            "abort": aborts,
            "ladder": ladder,
            "recompute_cpu_ms": cost,
        }
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.rollouts} simulated roll-outs per scenario, batches of {ROWS_PER_BATCH} rows, seed {args.seed}")
    print(f"gate config: {GateConfig().model_dump()}")
    for result in results:
        print(f"\n{result.pop('scenario')}")
        for key, value in result.items():
            print(f"  {key}: {value}")
    print("\nabort rule")
    for key, value in aborts.items():
        print(f"  {key}: {value}")
    print("\nfirst labelled milestone")
    for key, value in ladder.items():
        print(f"  {key}: {value}")
    print(f"\none shadow recompute at the caps: {cost:.0f} ms of CPU (median of 10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

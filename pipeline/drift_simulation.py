"""Seeded simulation of the batch drift verdict: how often a batch with no drift is
flagged, and how often a shift is detected, per batch size n.

It runs the aggregator's own code (`ReferenceProfile.psis` / `p_values`,
`DriftConfig.judge`). Every simulated batch gets its own reference: m rows drawn from
the population and profiled by `build_profile` as training does, so its bins and
shares are as random as a real reference's. The batch's bin counts are then drawn
from a multinomial over the population's probabilities of those bins (exact for
independent rows), so a batch of 100,000 rows costs as little as one of 50. The
features are independent in the simulation; the real-pipeline test
(tests/test_screening.py) covers correlated features.

`python -m pipeline.drift_simulation` prints the table in docs/monitoring.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np
from scipy import special, stats
from sklearn.datasets import load_digits

from pipeline.profile import DriftConfig, ReferenceProfile, build_profile

BATCH_ROWS = (50, 100, 200, 500, 2000, 10_000, 100_000)
# The screening pipeline's training rows: its reference profiles' m.
SCREENING_REFERENCE_ROWS = 398
# The digits pipeline's training rows (half of load_digits).
DIGITS_REFERENCE_ROWS = 898
CONFIDENCE = 0.95


class Population(Protocol):
    """Where rows come from: `columns` values per row, the features then the model's score (last)."""

    @property
    def columns(self) -> int: ...

    def rows(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """`count` independent rows (count x columns)."""
        ...

    def bin_probabilities(self, profile: ReferenceProfile, shifts: np.ndarray) -> np.ndarray:
        """The probability of every bin of `profile` (concatenated as `bin_counts` orders
        them) for a row whose columns are moved by `shifts` (one per column) standard deviations."""
        ...


@dataclass(frozen=True)
class NormalPopulation:
    """Independent standard normal features, and a standard normal score."""

    features: int = 30

    @property
    def columns(self) -> int:
        return self.features + 1

    def rows(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return rng.standard_normal((count, self.columns))

    def bin_probabilities(self, profile: ReferenceProfile, shifts: np.ndarray) -> np.ndarray:
        layout = profile.layout
        # Each histogram's edges in a row, padded with +inf (the CDF at a bin's upper end), shifted.
        edges = np.full(layout.used.shape, np.inf)
        edges[layout.used & (np.arange(layout.used.shape[1]) < layout.sizes[:, None] - 1)] = np.concatenate(
            [h.edges for h in profile.histograms]
        )
        padded = np.diff(special.ndtr(edges - shifts[:, None]), axis=1, prepend=0.0)
        probabilities: np.ndarray = padded[layout.used]
        return probabilities


@dataclass(frozen=True)
class EmpiricalPopulation:
    """Rows drawn uniformly, with replacement, from a table of `values` (rows x columns)."""

    values: np.ndarray

    @property
    def columns(self) -> int:
        return int(self.values.shape[1])

    @cached_property
    def _distinct(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per column: its distinct values and the share of rows holding each."""
        distinct = [np.unique(column, return_counts=True) for column in self.values.T]
        return [(values, counts / len(self.values)) for values, counts in distinct]

    def rows(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return self.values[rng.integers(0, len(self.values), count)]

    def bin_probabilities(self, profile: ReferenceProfile, shifts: np.ndarray) -> np.ndarray:
        spread = self.values.std(axis=0)
        return np.concatenate(
            [
                np.bincount(
                    np.searchsorted(h.edges, values + shift * sd, side="left"),
                    weights=shares,
                    minlength=len(h.expected),
                )
                for h, (values, shares), shift, sd in zip(profile.histograms, self._distinct, shifts, spread)
            ]
        )


def digits_population() -> EmpiricalPopulation:
    """The 64 pixels of every `load_digits` image (integers 0..16: ties, few distinct
    values, constant pixels), with the image's mean pixel as the score."""
    pixels = load_digits().data
    return EmpiricalPopulation(np.column_stack([pixels, pixels.mean(axis=1)]))


def reference_profile(population: Population, rng: np.random.Generator, rows: int) -> ReferenceProfile:
    """The profile of `rows` rows drawn from `population`, built as training builds one."""
    X = population.rows(rng, rows)
    names = [f"x{column}" for column in range(population.columns - 1)]
    return build_profile(names, X[:, :-1], X[:, -1])


def draw_counts(
    rng: np.random.Generator, profile: ReferenceProfile, probabilities: np.ndarray, batch_rows: Sequence[int]
) -> np.ndarray:
    """The bin counts (len(batch_rows) x bins, as `bin_counts` makes them) of one batch of
    each size in `batch_rows`, every histogram's counts multinomial over its bins' `probabilities`."""
    sizes = np.array([len(h.expected) for h in profile.histograms])
    padded = np.zeros((len(sizes), sizes.max()))
    used = np.arange(sizes.max()) < sizes[:, None]
    padded[used] = probabilities
    padded /= padded.sum(axis=1, keepdims=True)  # the normal CDF's rounding
    counts = rng.multinomial(np.asarray(batch_rows)[:, None], padded)
    return counts[:, used]


@dataclass(frozen=True)
class FlagRate:
    """How many of `batches` simulated batches of `rows` rows were flagged as drifted."""

    rows: int
    flagged: int
    batches: int

    @property
    def rate(self) -> float:
        return self.flagged / self.batches

    @property
    def bounds(self) -> tuple[float, float]:
        """The exact (Clopper-Pearson) two-sided CONFIDENCE interval of the true rate."""
        interval = stats.binomtest(self.flagged, self.batches).proportion_ci(CONFIDENCE, method="exact")
        return float(interval.low), float(interval.high)


def flag_rates(
    population: Population,
    *,
    reference_rows: int,
    batch_rows: Sequence[int],
    shifts: Sequence[np.ndarray],
    references: int,
    config: DriftConfig,
    seed: int,
) -> list[list[FlagRate]]:
    """Per scenario in `shifts` (standard deviations to move each column by; zeros: no
    drift), per size in `batch_rows`: how many of `references` batches the verdict flags.
    Each reference of `reference_rows` rows gets one batch of every size in every scenario."""
    rng = np.random.default_rng(seed)
    flagged = np.zeros((len(shifts), len(batch_rows)), dtype=np.int64)
    for _ in range(references):
        profile = reference_profile(population, rng, reference_rows)
        for scenario, shift in enumerate(shifts):
            counts = draw_counts(rng, profile, population.bin_probabilities(profile, shift), batch_rows)
            flagged[scenario] += config.judge(profile.psis(counts), profile.p_values(counts)).drifted.any(axis=-1)
    return [[FlagRate(rows, int(count), references) for rows, count in zip(batch_rows, row)] for row in flagged]


def shifted_columns(population: Population, columns: int, shift: float) -> np.ndarray:
    """Shifts that move the first `columns` features by `shift` standard deviations and nothing else."""
    shifts = np.zeros(population.columns)
    shifts[:columns] = shift
    return shifts


STATISTIC_ROWS = (10, 20, 50, 100, 200, 500, 2000)


def statistic_sizes(
    batch_rows: Sequence[int], *, reference_rows: int, batches: int, seed: int, level: float = 0.05
) -> dict[str, list[float]]:
    """How the candidate tests of one histogram hold their level: per candidate (the PSI
    scaled by nm / (n + m), Pearson's X², the likelihood-ratio G), per size in
    `batch_rows`, the share of `batches` no-drift batches whose p-value against
    χ²(k - 1) is at most `level`. One standard normal feature with decile bins of
    `reference_rows` rows, a new reference per batch, no bins merged."""
    population = NormalPopulation(features=1)
    rng = np.random.default_rng(seed)
    m = reference_rows
    rejected = {"PSI · nm/(n+m)": np.zeros(len(batch_rows)), "Pearson X²": np.zeros(len(batch_rows))}
    rejected["G-test"] = np.zeros(len(batch_rows))
    for _ in range(batches):
        profile = reference_profile(population, rng, m)
        bins = profile.layout.sizes[0]
        all_counts = draw_counts(rng, profile, population.bin_probabilities(profile, np.zeros(2)), batch_rows)
        reference = np.rint(profile.layout.shares[:bins] * m)
        for index, (n, counts) in enumerate(zip(batch_rows, all_counts)):
            table = np.array([counts[:bins], reference])
            scaled = profile.psis(counts)[0] * n * m / (n + m)
            p_values = (
                stats.chi2.sf(scaled, bins - 1),
                stats.chi2_contingency(table, correction=False).pvalue,
                stats.chi2_contingency(table, correction=False, lambda_="log-likelihood").pvalue,
            )
            for name, p_value in zip(rejected, p_values):
                rejected[name][index] += p_value <= level
    return {name: (count / batches).tolist() for name, count in rejected.items()}


def _cell(rate: FlagRate) -> str:
    low, high = rate.bounds
    return f"{rate.rate:.1%} ({low:.1%} – {high:.1%})"


def _print_statistic_sizes(batches: int, seed: int) -> None:
    sizes = statistic_sizes(STATISTIC_ROWS, reference_rows=SCREENING_REFERENCE_ROWS, batches=batches, seed=seed)
    print(f"no-drift batches with p <= 0.05, one normal feature, decile bins, m = 398; {batches} per n, seed {seed}\n")
    print("| n | " + " | ".join(sizes) + " |\n|---:|" + "---:|" * len(sizes))
    for index, rows in enumerate(STATISTIC_ROWS):
        print(f"| {rows:,} | " + " | ".join(f"{shares[index]:.1%}" for shares in sizes.values()) + " |")


def main(argv: Sequence[str] | None = None) -> None:
    """Print the share of simulated batches the drift verdict flags, per batch size n, as a
    markdown table: no drift and a +0.5 sd shift of 3 of 30 normal features (against
    references of the screening pipeline's m = 398 rows), and no drift of the digits
    pixels (m = 898), each with its exact 95 % interval. With --statistics, instead: how
    the candidate tests of one histogram hold a 5 % level."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.drift_simulation", description=main.__doc__)
    parser.add_argument("--references", type=int, default=2000, help="simulated batches per n and scenario")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--false-alarm-rate", type=float, default=DriftConfig().false_alarm_rate)
    parser.add_argument("--statistics", action="store_true", help="compare the candidate tests instead")
    args = parser.parse_args(argv)
    if args.statistics:
        _print_statistic_sizes(args.references, args.seed)
        return
    config = DriftConfig(false_alarm_rate=args.false_alarm_rate)
    normal, digits = NormalPopulation(), digits_population()
    no_drift, shifted = flag_rates(
        normal,
        reference_rows=SCREENING_REFERENCE_ROWS,
        batch_rows=BATCH_ROWS,
        shifts=[shifted_columns(normal, 3, 0.0), shifted_columns(normal, 3, 0.5)],
        references=args.references,
        config=config,
        seed=args.seed,
    )
    (pixels,) = flag_rates(
        digits,
        reference_rows=DIGITS_REFERENCE_ROWS,
        batch_rows=BATCH_ROWS,
        shifts=[shifted_columns(digits, 3, 0.0)],
        references=args.references,
        config=config,
        seed=args.seed,
    )
    print(f"{config!r}; {args.references} simulated batches per cell, seed {args.seed}\n")
    print(
        "| n | no drift, 30 normal features + score, m = 398 | +0.5 sd on 3 of the 30 | "
        "no drift, 64 digits pixels + score, m = 898 |"
    )
    print("|---:|---:|---:|---:|")
    for row in zip(no_drift, shifted, pixels):
        print(f"| {row[0].rows:,} | " + " | ".join(_cell(rate) for rate in row) + " |")


if __name__ == "__main__":
    main()

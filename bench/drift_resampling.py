"""Issue 14's "no drift" experiment, measured: screening batches of held-out records
resampled with replacement (how the issue tried it) against batches drawn without
replacement, judged by the aggregator's drift code. No services: the models are trained
in-process, and each batch's bin counts are made as the workers make them.

    python -m bench.drift_resampling [--batches 100] [--seed 0]

A batch of n records resampled from the 171 held-out ones is a sample of those 171
records, not of the population they came from: once n is comparable to 171 their own
sampling noise counts n times as evidence (docs/monitoring.md, "Drift, calibrated to
sample size").
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from aggregator.drift import ModelCounts, judge_counts
from pipeline.artifacts import reference_profile
from pipeline.definition import ModelSpec
from pipeline.pipelines.screening import dataset_split
from pipeline.profile import ReferenceProfile
from pipeline.registry import get_pipeline

RESAMPLED_ROWS = (50, 100, 200, 500, 2000)
UNSEEN_ROWS = (50, 100, 150)

Trained = list[tuple[ModelSpec, Any, ReferenceProfile]]


def trained_models() -> Trained:
    """Each screening model's spec, fitted estimator and reference profile, as training stores them."""
    trained = []
    for spec in get_pipeline("screening").models:
        model = spec.train()
        profile = reference_profile(spec, model)
        if profile is None:
            raise RuntimeError(f"model {spec.name!r} was trained without reference rows")
        trained.append((spec, model.estimator, profile))
    return trained


def judge_rows(trained: Trained, X: np.ndarray) -> dict[str, Any]:
    """The drift figures (`judge_counts`) of a batch of rows `X`, every model scoring every row."""
    rows = np.asarray(X, dtype="<f4")
    models = []
    for spec, estimator, profile in trained:
        scores = spec.output_score(np.asarray(spec.predict(estimator, rows), dtype="<f4"))
        models.append(ModelCounts(spec.name, len(rows), "bench", profile, profile.bin_counts(rows, scores)))
    return judge_counts(get_pipeline("screening").drift, models)


def flagged(trained: Trained, pool: np.ndarray, rows: int, replace: bool, batches: int, seed: int) -> int:
    """How many of `batches` batches of `rows` rows drawn from `pool` are flagged as drifted."""
    rng = np.random.default_rng(seed)
    count = 0
    for _ in range(batches):
        figures = judge_rows(trained, pool[rng.choice(len(pool), rows, replace=replace)])
        count += bool(figures["drifted_features"] or figures["drifted_scores"])
    return count


def main(argv: Sequence[str] | None = None) -> None:
    """Print the held-out rows' largest PSIs and the flag rates of resampled and unseen batches."""
    parser = argparse.ArgumentParser(prog="python -m bench.drift_resampling", description=main.__doc__)
    parser.add_argument("--batches", type=int, default=100, help="batches per n (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    trained = trained_models()
    held_out = dataset_split()[1]
    whole = judge_rows(trained, held_out)
    largest = sorted(whole["features"].items(), key=lambda kv: -kv[1]["psi"])[:3]
    print(f"all {len(held_out)} held-out records once: drifted = {bool(whole['drifted_features'])};", end=" ")
    print(
        "largest PSIs " + ", ".join(f"{name} {entry['psi']:.3f} (p {entry['p_value']:.2g})" for name, entry in largest)
    )
    print("\n| drawn from the held-out records | n | flagged |\n|---|---:|---:|")
    for replace, sizes in ((True, RESAMPLED_ROWS), (False, UNSEEN_ROWS)):
        for rows in sizes:
            count = flagged(trained, held_out, rows, replace, args.batches, args.seed + rows)
            how = "with replacement (resampled)" if replace else "without replacement"
            print(f"| {how} | {rows:,} | {count} / {args.batches} |")


if __name__ == "__main__":
    main()

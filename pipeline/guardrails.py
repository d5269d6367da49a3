"""Checks on what a model returns, before it can reach the ledger (a worker runs them on
every output; the model registry on an artifact before accepting it)."""

from __future__ import annotations

import numpy as np

from pipeline.definition import ModelSpec
from pipeline.errors import GuardrailViolation

PROBABILITY_TOLERANCE = 1e-4


def check_output(spec: ModelSpec, output: np.ndarray, rows: int) -> np.ndarray:
    """Return `output` as float32 (rows x n_outputs) after checking it.

    Raises:
        GuardrailViolation: wrong shape, NaN or infinity, (for probability
        models) values outside [0, 1] or rows not summing to 1, or a label column
        holding a value outside the model's known labels.
    """
    output = np.asarray(output)
    if output.shape != (rows, spec.n_outputs):
        raise GuardrailViolation(
            f"model {spec.name!r} returned shape {output.shape}, expected ({rows}, {spec.n_outputs})"
        )
    output = output.astype("<f4")
    bad_rows = np.flatnonzero(~np.isfinite(output).all(axis=1))
    if bad_rows.size:
        raise GuardrailViolation(f"model {spec.name!r} returned NaN or infinity in rows {bad_rows[:10].tolist()}")
    if spec.probabilities:
        out_of_range = np.flatnonzero(((output < 0) | (output > 1)).any(axis=1))
        if out_of_range.size:
            raise GuardrailViolation(
                f"model {spec.name!r} returned probabilities outside [0, 1] in rows {out_of_range[:10].tolist()}"
            )
        unnormalised = np.flatnonzero(np.abs(output.sum(axis=1) - 1) > PROBABILITY_TOLERANCE * spec.n_outputs)
        if unnormalised.size:
            raise GuardrailViolation(
                f"model {spec.name!r} returned probabilities not summing to 1 in rows {unnormalised[:10].tolist()}"
            )
    if spec.label_columns:
        labels = output[:, list(spec.label_columns)]
        unknown = np.flatnonzero(~np.isin(labels, np.asarray(spec.labels, dtype="<f4")).all(axis=1))
        if unknown.size:
            raise GuardrailViolation(
                f"model {spec.name!r} returned labels outside {list(spec.labels)} in rows {unknown[:10].tolist()}"
            )
    return output

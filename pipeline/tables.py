"""Inputs given as a table: a 2-D numpy array (columns in the pipeline's
`feature_names` order) or a DataFrame (anything with `to_numpy()` and `columns`),
turned into the items of a feature-vector pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.definition import Pipeline


def is_table(inputs: Any) -> bool:
    """True for a numpy array or a DataFrame-like object."""
    return isinstance(inputs, np.ndarray) or (hasattr(inputs, "to_numpy") and hasattr(inputs, "columns"))


def table_items(pipeline: Pipeline, table: Any) -> tuple[list[dict[str, Any]], str | None]:
    """Return (the table's rows as input items, None), or ([], why the table as a whole
    cannot be read). The items still go through the input model's validation."""
    names = pipeline.feature_names
    if not names:
        return [], f"pipeline {pipeline.name!r} takes a list of items, not an array or a DataFrame"
    if isinstance(table, np.ndarray):
        columns = list(names)
        values = table
    else:
        columns = [str(column) for column in table.columns]
        values = table.to_numpy()
        missing = [name for name in names if name not in columns]
        if missing:
            return [], f"the DataFrame lacks the feature columns {missing}"
    if values.ndim != 2 or values.shape[1] != len(columns):
        return [], f"the array has shape {values.shape}; expected (rows, {len(columns)}) with columns {list(names)}"
    # tolist() turns numpy scalars into Python numbers in one vectorised pass.
    return [pipeline.item_from_row(dict(zip(columns, row))) for row in values.tolist()], None

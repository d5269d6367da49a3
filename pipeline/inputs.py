"""A batch's inputs: validated once by the client, stored in pages, read back page by page.

A page holds consecutive inputs. For a feature-vector pipeline (one with
`feature_names`) it stores their features as one packed float32 matrix and the
other fields (the pipeline's `extras_model`) as JSON; for any other pipeline it
stores the validated items as one JSON array. Validation and packing of a 2-D
array or a DataFrame are vectorised: no Python object per row on that path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Sized
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from pipeline.definition import InputPage, Pipeline, list_adapter
from pipeline.errors import InvalidInputError

# Inputs per stored page: big enough that per-row costs vanish, small enough to stream.
PAGE_ITEMS = 10_000


def _problems_of(error: ValidationError, offset: int = 0) -> list[tuple[int, str]]:
    reasons: dict[int, list[str]] = {}
    for detail in error.errors(include_url=False, include_input=False):
        index, *path = detail["loc"]
        where = ".".join(str(part) for part in path)
        reasons.setdefault(int(index) + offset, []).append(f"{where}: {detail['msg']}" if where else detail["msg"])
    return [(i, "; ".join(r)) for i, r in sorted(reasons.items())]


def is_table(inputs: Any) -> bool:
    """True for a numpy array or a DataFrame-like object (anything with `to_numpy()` and `columns`)."""
    return isinstance(inputs, np.ndarray) or (hasattr(inputs, "to_numpy") and hasattr(inputs, "columns"))


def _table_columns(pipeline: Pipeline, table: Any) -> tuple[np.ndarray, dict[str, list[Any]]]:
    """(feature matrix as float64, other known columns by name) of a 2-D array or DataFrame.

    Raises:
        InvalidInputError: the table as a whole cannot be read.
    """
    names = pipeline.feature_names

    def bad(reason: str) -> InvalidInputError:
        return InvalidInputError(pipeline.name, [(0, reason)])

    if not names:
        raise bad(f"pipeline {pipeline.name!r} takes a list of items, not an array or a DataFrame")
    if isinstance(table, np.ndarray):
        if table.ndim != 2 or table.shape[1] != len(names):
            raise bad(f"the array has shape {table.shape}; expected (rows, {len(names)}) with columns {list(names)}")
        try:
            return np.asarray(table, dtype=np.float64), {}
        except (TypeError, ValueError) as error:
            raise bad(f"the array is not numeric: {error}") from None
    columns = [str(column) for column in table.columns]
    missing = [name for name in names if name not in columns]
    if missing:
        raise bad(f"the DataFrame lacks the feature columns {missing}")
    try:
        X = table[list(names)].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise bad(f"a feature column is not numeric: {error}") from None
    extra_fields = pipeline.extras_model.model_fields if pipeline.extras_model is not None else {}
    extras = {}
    for name in columns:
        if name in extra_fields:
            # A DataFrame holds a missing value as NaN (or pandas NA): both mean "not given".
            values = table[name].astype(object).to_numpy().tolist()
            # pandas NA first: comparing it gives NA, whose truth value raises.
            extras[name] = [None if _is_na(value) or value is None or value != value else value for value in values]
    return X, extras


def _is_na(value: Any) -> bool:
    return type(value).__name__ in ("NAType", "NaTType")


def _finite_problems(pipeline: Pipeline, X: np.ndarray, offset: int) -> list[tuple[int, str]]:
    """One problem per row with a feature that is not a finite float32 number."""
    with np.errstate(over="ignore"):
        finite = np.isfinite(X.astype(np.float32))
    names = pipeline.feature_names
    return [
        (offset + int(row), "; ".join(f"{names[c]}: not a finite float32 number" for c in np.flatnonzero(~finite[row])))
        for row in np.flatnonzero(~finite.all(axis=1))
    ]


class _Validator:
    """Turns submitted inputs into pages, collecting every problem before raising."""

    def __init__(self, pipeline: Pipeline, max_items: int, max_item_bytes: int) -> None:
        self.pipeline = pipeline
        self.max_items = max_items
        self.max_item_bytes = max_item_bytes
        self.problems: list[tuple[int, str]] = []
        self._extras = list_adapter(pipeline.extras_model) if pipeline.extras_model is not None else None

    def _check_count(self, count: int) -> None:
        if count > self.max_items:
            raise InvalidInputError(
                self.pipeline.name,
                [(self.max_items, f"the batch has {count} inputs; at most {self.max_items} allowed")],
            )

    def table_pages(self, table: Any) -> list[InputPage]:
        X, extras = _table_columns(self.pipeline, table)
        self._check_count(len(X))
        pages = []
        for first in range(0, len(X), PAGE_ITEMS):
            rows = X[first : first + PAGE_ITEMS]
            self.problems += _finite_problems(self.pipeline, rows, first)
            data = None
            if extras and self._extras is not None:
                records = [
                    dict(zip(extras, values))
                    for values in zip(*(v[first : first + PAGE_ITEMS] for v in extras.values()))
                ]
                try:
                    data = self._json_extras(self._extras.validate_python(records))
                except ValidationError as error:
                    self.problems += _problems_of(error, first)
            # A view of the caller's array: converted to float32 as it is written, page by page.
            pages.append(InputPage(first, len(rows), rows, data))
        return pages

    def _json_extras(self, extras: Sequence[BaseModel]) -> list[Any] | None:
        dumped = [extra.model_dump(mode="json", exclude_defaults=True) for extra in extras]
        return dumped if any(dumped) else None

    def item_pages(self, inputs: Iterable[Any]) -> list[InputPage]:
        if isinstance(inputs, Sized):
            self._check_count(len(inputs))
        pages = []
        page: list[Any] = []
        first = 0
        for raw in inputs:
            # A pydantic object of another model is read by its fields.
            page.append(
                raw.model_dump()
                if isinstance(raw, BaseModel) and not isinstance(raw, self.pipeline.input_model)
                else raw
            )
            if len(page) == PAGE_ITEMS:
                pages.append(self._item_page(first, page))
                first += len(page)
                page = []
                self._check_count(first)
        if page:
            pages.append(self._item_page(first, page))
        return pages

    def _item_page(self, first: int, raw: list[Any]) -> InputPage:
        try:
            items = self.pipeline.items_adapter.validate_python(raw)
        except ValidationError as error:
            self.problems += _problems_of(error, first)
            return InputPage(first, len(raw), None, None)
        if self.pipeline.feature_names:
            rows, extras = zip(*(self.pipeline.item_parts(item) for item in items))
            X = np.asarray(rows, dtype=np.float64)
            self.problems += _finite_problems(self.pipeline, X, first)
            data = list(extras) if any(extras) else None
            return InputPage(first, len(items), X, data)
        # One serializer call per page for the stored data; each item's size as its compact
        # JSON, made by pydantic's serializer (no Python object per value).
        data = self.pipeline.items_adapter.dump_python(items, mode="json")
        for index, item in enumerate(items):
            size = len(item.__pydantic_serializer__.to_json(item))
            if size > self.max_item_bytes:
                self.problems.append((first + index, f"{size} bytes of JSON; at most {self.max_item_bytes} allowed"))
        return InputPage(first, len(items), None, data)


def encode_inputs(pipeline: Pipeline, inputs: Any, max_items: int, max_item_bytes: int) -> list[InputPage]:
    """Validate `inputs` (a list of items, or for a feature-vector pipeline a 2-D array
    or a DataFrame) and return them as pages of `PAGE_ITEMS` inputs.

    Raises:
        InvalidInputError: naming every bad item by index and why; also for no inputs
            and for more than `max_items`.
    """
    validator = _Validator(pipeline, max_items, max_item_bytes)
    pages = validator.table_pages(inputs) if is_table(inputs) else validator.item_pages(inputs)
    if validator.problems:
        raise InvalidInputError(pipeline.name, sorted(validator.problems))
    if not pages:
        raise InvalidInputError(pipeline.name, [(0, "the batch has no inputs")])
    return pages

"""A batch's inputs: validated once by the client, stored in pages, read back page by page.

A page holds consecutive inputs. For a feature-vector pipeline (one with
`feature_names`) it stores their features as one packed float32 matrix and the
other fields (the pipeline's `extras_model`) as JSON; for any other pipeline it
stores the validated items as one JSON array. Validation and packing of a 2-D
array or a DataFrame are vectorised: no Python object per row on that path. An
iterable of items (a JSON-lines file's included, `JsonLinesFile`) is read, validated
and stored a page at a time, so the client's memory does not grow with the batch.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from pipeline.definition import InputPage, ModelRows, Pipeline, joined_rows, list_adapter
from pipeline.errors import InputFileError, InvalidInputError, SplitError
from pipeline.garbage import collection_paused
from pipeline.json_array import JsonArray

# Inputs per stored page: big enough that per-row costs vanish, small enough to stream.
PAGE_ITEMS = 10_000
# A page of items is also cut once its stored form reaches this many bytes.
PAGE_BYTES = 8_000_000
# Items are validated (and serialized) this many at a time: the client holds that many as
# Python objects, and the rest of a page as its stored bytes.
VALIDATE_ITEMS = 500
# numpy dtype kinds taken as features: signed and unsigned integers, floats (not bool, complex, str, object).
NUMERIC_KINDS = "iuf"


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

    Features must be integer or float numbers (no bool, complex, string or object values,
    which would be converted silently); a DataFrame's columns are the features and the
    fields of the pipeline's `extras_model`, each once, as a JSON input's keys are.

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
        if table.dtype.kind not in NUMERIC_KINDS:
            raise bad(f"the array holds {table.dtype} values; expected integer or float numbers")
        return np.asarray(table, dtype=np.float64), {}
    columns = [str(column) for column in table.columns]
    repeated = sorted(name for name, count in Counter(columns).items() if count > 1)
    if repeated:
        raise bad(f"the DataFrame has the columns {repeated} more than once")
    missing = [name for name in names if name not in columns]
    if missing:
        raise bad(f"the DataFrame lacks the feature columns {missing}")
    extra_fields = pipeline.extras_model.model_fields if pipeline.extras_model is not None else {}
    known = set(names) | set(extra_fields)
    unknown = [name for name in columns if name not in known]
    if unknown:
        raise bad(
            f"the DataFrame has columns pipeline {pipeline.name!r} does not take: {unknown}"
            f" (it takes its feature columns and {sorted(extra_fields)})"
        )
    # By column position: `table[name]` needs the column's own label, which may not be a str.
    dtypes = {name: dtype for name, dtype in zip(columns, table.dtypes)}
    not_numbers = [f"{name!r} is {dtypes[name]}" for name in names if dtypes[name].kind not in NUMERIC_KINDS]
    if not_numbers:
        raise bad(f"feature columns must hold integer or float numbers: {', '.join(not_numbers)}")
    by_name = dict(zip(columns, table.columns))
    # A missing value (NaN, pandas NA) becomes NaN: refused row by row as not finite.
    X = table[[by_name[name] for name in names]].to_numpy(dtype=np.float64, na_value=np.nan)
    extras = {}
    for name in columns:
        if name in extra_fields:
            column = table[by_name[name]]
            # A DataFrame holds a missing value as NaN (or pandas NA): both mean "not given".
            values = column.astype(object).to_numpy().tolist()
            # pandas NA first: comparing it gives NA, whose truth value raises.
            values = [None if _is_na(value) or value is None or value != value else value for value in values]
            if column.dtype.kind == "f":
                # pandas holds integers with a missing value as floats: a whole float is read as
                # the integer it stands for (a strict integer field still refuses 1.5).
                values = [int(value) if value is not None and value.is_integer() else value for value in values]
            extras[name] = values
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

    def __init__(self, pipeline: Pipeline, max_items: int, max_item_bytes: int, page_items: int, split: bool) -> None:
        self.pipeline = pipeline
        self.split = split
        self.max_items = max_items
        self.max_item_bytes = max_item_bytes
        self.page_items = page_items
        self.problems: list[tuple[int, str]] = []
        self._extras = list_adapter(pipeline.extras_model) if pipeline.extras_model is not None else None

    def _check_count(self, count: int) -> None:
        if count > self.max_items:
            raise InvalidInputError(
                self.pipeline.name,
                [(self.max_items, f"the batch has {count} inputs; at most {self.max_items} allowed")],
            )

    def table_pages(self, table: Any) -> Iterator[InputPage]:
        X, extras = _table_columns(self.pipeline, table)
        self._check_count(len(X))
        for first in range(0, len(X), self.page_items):
            rows = X[first : first + self.page_items]
            self.problems += _finite_problems(self.pipeline, rows, first)
            data = None
            if extras and self._extras is not None:
                records = [
                    dict(zip(extras, values))
                    for values in zip(*(v[first : first + self.page_items] for v in extras.values()))
                ]
                try:
                    data = self._json_extras(self._extras.validate_python(records))
                except ValidationError as error:
                    self.problems += _problems_of(error, first)
            # A view of the caller's array: converted to float32 as it is written, page by page.
            yield InputPage(first, len(rows), rows, data)

    def _json_extras(self, extras: Sequence[BaseModel]) -> list[Any] | None:
        dumped = [extra.model_dump(mode="json", exclude_defaults=True) for extra in extras]
        return dumped if any(dumped) else None

    def item_pages(self, inputs: Iterable[Any]) -> Iterator[InputPage]:
        if isinstance(inputs, Sized):
            self._check_count(len(inputs))
        raw: list[Any] = []
        parts: list[InputPage] = []
        # The first input of the page being gathered, and how many of it are validated.
        first = count = 0
        for item in inputs:
            # A pydantic object of another model is read by its fields.
            raw.append(
                item.model_dump()
                if isinstance(item, BaseModel) and not isinstance(item, self.pipeline.input_model)
                else item
            )
            if len(raw) < VALIDATE_ITEMS and count + len(raw) < self.page_items:
                continue
            parts.append(self._item_page(first + count, raw))
            count += len(raw)
            raw = []
            if count == self.page_items or sum(map(_stored_bytes, parts)) >= PAGE_BYTES:
                yield _joined(first, parts)
                first += count
                count = 0
                parts = []
                self._check_count(first)
        if raw:
            parts.append(self._item_page(first + count, raw))
        if parts:
            yield _joined(first, parts)

    def _item_page(self, first: int, raw: list[Any]) -> InputPage:
        with collection_paused():
            return self._validated_page(first, raw)

    def _validated_page(self, first: int, raw: list[Any]) -> InputPage:
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
        # The page as stored: each item's compact JSON made by pydantic's serializer (no
        # Python object per value), which also gives its size; joined into one array.
        serialized = [item.__pydantic_serializer__.to_json(item) for item in items]
        for index, text in enumerate(serialized):
            if len(text) > self.max_item_bytes:
                self.problems.append(
                    (first + index, f"{len(text)} bytes of JSON; at most {self.max_item_bytes} allowed")
                )
        page = InputPage(first, len(items), None, JsonArray.of_values(serialized))
        if not self.split or self.problems:
            return page
        return replace(page, split=self._split_of(replace(page, items=items)))

    def _split_of(self, page: InputPage) -> dict[str, ModelRows] | None:
        """The pipeline's split of `page` (holding its `items`); None when the pipeline cannot
        split it: the split of the stored page then fails the batch with the reason."""
        try:
            return self.pipeline.split_page(page)
        except SplitError:
            return None


def _stored_bytes(page: InputPage) -> int:
    """About the bytes `page` takes stored."""
    features = 0 if page.X is None else page.X.size * 4
    return features + (len(page.data.text) if isinstance(page.data, JsonArray) else 0)


def _joined(first: int, parts: list[InputPage]) -> InputPage:
    """The consecutive pages `parts` (from input `first` on) as one; a part without
    features or data (its inputs were refused) leaves the page without them: such a page
    is never stored."""
    count = sum(part.count for part in parts)
    if len(parts) == 1:
        return parts[0]
    X = None if any(part.X is None for part in parts) else np.concatenate([part.X for part in parts])
    data: list[Any] | JsonArray | None = None
    if all(isinstance(part.data, JsonArray) for part in parts):
        data = JsonArray.joined([part.data for part in parts if isinstance(part.data, JsonArray)])
    elif any(part.data is not None for part in parts):
        data = [extra for part in parts for extra in (part.data if part.data is not None else [{}] * part.count)]
    split = None
    if all(part.split is not None for part in parts):
        split = joined_rows([(part.first - first, part.split) for part in parts if part.split is not None])
    return InputPage(first, count, X, data, split=split)


def _refuse_non_collection(pipeline: Pipeline, inputs: Any) -> None:
    """Raise InvalidInputError unless `inputs` is an iterable of items: None, one item (a
    dict, a pydantic object) or text would otherwise be refused item by item, or read as
    its keys, fields or characters."""
    if isinstance(inputs, Iterable) and not isinstance(inputs, str | bytes | dict | BaseModel):
        return
    expected = "a list (or an iterable) of items"
    if pipeline.feature_names:
        expected += ", a 2-D array or a DataFrame"
    raise InvalidInputError(pipeline.name, [(0, f"the inputs must be {expected}, not {type(inputs).__name__}")])


def iter_input_pages(
    pipeline: Pipeline,
    inputs: Any,
    max_items: int,
    max_item_bytes: int,
    page_items: int | None = None,
    split: bool = False,
) -> Iterator[InputPage]:
    """Validate `inputs` (an iterable of items, or for a feature-vector pipeline a 2-D
    array or a DataFrame) a page of `page_items` (default `PAGE_ITEMS`) at a time, yielding each page while
    every input so far is valid: an iterable is read once, page by page, never whole.
    With `split`, a page of JSON items carries its `split` too, made from each few hundred
    objects as they are validated (the objects are then dropped).

    Raises:
        InvalidInputError: once every input is read, naming every bad item by index and
            why (no page is yielded after the first bad one); also for no inputs, for more
            than `max_items`, and for inputs that are not a collection of items (at once).
    """
    validator = _Validator(pipeline, max_items, max_item_bytes, page_items or PAGE_ITEMS, split)
    if is_table(inputs):
        pages = validator.table_pages(inputs)
    else:
        _refuse_non_collection(pipeline, inputs)
        pages = validator.item_pages(inputs)
    count = 0
    for page in pages:
        count += page.count
        if not validator.problems:
            yield page
    if validator.problems:
        raise InvalidInputError(pipeline.name, sorted(validator.problems))
    if not count:
        raise InvalidInputError(pipeline.name, [(0, "the batch has no inputs")])


def encode_inputs(
    pipeline: Pipeline, inputs: Any, max_items: int, max_item_bytes: int, page_items: int | None = None
) -> list[InputPage]:
    """Every page of `iter_input_pages`, as a list.

    Raises:
        InvalidInputError: as `iter_input_pages`.
    """
    return list(iter_input_pages(pipeline, inputs, max_items, max_item_bytes, page_items))


# How often a read-ahead thread waiting to hand over a page looks whether it was stopped.
READ_AHEAD_POLL_S = 0.1


def read_ahead(pages: Iterator[InputPage]) -> Iterator[InputPage]:
    """Yield `pages`, each next one made by a thread while the caller stores the current one:
    PostgreSQL writes page k (the COPY's wait releases the GIL) while page k + 1 is validated
    and split. One page is held ahead, so memory stays bounded. An exception of `pages` is
    raised here after the pages before it; once the caller stops iterating, the thread ends
    after the page it is making (not waited for: an iterable that blocks must not hold up
    the caller's error).

    Raises:
        what `pages` raises (e.g. InvalidInputError).
    """
    handed: queue.Queue[tuple[InputPage | None, BaseException | None]] = queue.Queue(maxsize=1)
    stopped = threading.Event()

    def hand(page: InputPage | None, error: BaseException | None = None) -> bool:
        while not stopped.is_set():
            try:
                handed.put((page, error), timeout=READ_AHEAD_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def make() -> None:
        try:
            for page in pages:
                if not hand(page):
                    return
            hand(None)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread, which raises it
            hand(None, error)

    maker = threading.Thread(target=make, name="read-ahead", daemon=True)
    maker.start()
    try:
        while True:
            page, error = handed.get()
            if error is not None:
                raise error
            if page is None:
                return
            yield page
    finally:
        stopped.set()


class JsonLinesFile:
    """The inputs of a JSON-lines file, one per non-blank line, parsed as they are read: a
    context manager (closing the file) to iterate once. A line is read with a bounded read
    and refused by its size before it is parsed, so memory stays bounded by
    `max_item_bytes` whatever the file holds.

    `bytes_read` of `size` tells how far the reading is; `line_of(index)` is the line of
    input `index`, `count` the inputs read so far.

    Raises:
        InputFileError: the file cannot be opened (here), or while iterating: a line is
            not UTF-8, not JSON (also: nested too deeply, an integer of too many digits) or
            longer than `max_item_bytes`; the message names `FILE:LINE`.
    """

    def __init__(self, path: Path, max_item_bytes: int) -> None:
        self.path = path
        self.max_item_bytes = max_item_bytes
        try:
            self._file = path.open("rb")
            self.size = os.fstat(self._file.fileno()).st_size
        except OSError as error:
            raise InputFileError(f"cannot read {path}: {error.strerror}") from None
        self.bytes_read = 0
        self.count = 0
        # Input `index` is on line `index + shift` for the last (first input, shift) at or before
        # it: a new entry after each run of blank lines, so this stays small whatever the file.
        self._shifts: list[tuple[int, int]] = [(0, 1)]

    def __enter__(self) -> JsonLinesFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._file.close()

    def line_of(self, index: int) -> int:
        """The line number (from 1) of input `index` (< `count`)."""
        shift = next(shift for first, shift in reversed(self._shifts) if first <= index)
        return index + shift

    def _error(self, number: int, reason: str) -> InputFileError:
        return InputFileError(f"{self.path}:{number}: {reason}")

    def __iter__(self) -> Iterator[Any]:
        number = 0
        limit = self.max_item_bytes
        while line := self._file.readline(limit + 2):  # at most the limit and a CR LF
            number += 1
            self.bytes_read += len(line)
            content = line.rstrip(b"\r\n")
            if len(content) > limit:
                raise self._error(number, f"longer than {limit} bytes, the largest input (PIPELINE_MAX_ITEM_BYTES)")
            if not content.strip():
                first, shift = self._shifts[-1]
                if first == self.count:
                    self._shifts[-1] = (first, shift + 1)
                else:
                    self._shifts.append((self.count, shift + 1))
                continue
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputFileError(f"{self.path}: not UTF-8 text (line {number}): {error}") from None
            try:
                item = json.loads(text)
            except json.JSONDecodeError as error:
                raise self._error(number, f"not JSON: {error}") from None
            except ValueError:
                # int() refuses to read more digits than this (CPython's guard against quadratic time).
                raise self._error(number, f"an integer of more than {sys.get_int_max_str_digits()} digits") from None
            except RecursionError:
                raise self._error(number, "nested too deeply to read") from None
            self.count += 1
            yield item

"""A batch's input pages (as stored on submit) and result pages (as the aggregate writes
them): consecutive inputs per row, read one page per query."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Text, bindparam, cast, select

from pipeline.definition import InputPage
from pipeline.garbage import collection_paused
from pipeline.ledger import queries
from pipeline.ledger.connection import BINARY_RESULTS, autocommit
from pipeline.schema import Batch, ResultPage, StoredInputPage

# The stored input page holding input `position` or, past a gap, the next one: found by
# its key first, then read by it. With the wide columns in the ordered query, PostgreSQL
# sorted every later page of the batch with its columns detoasted (measured: reading page k
# of n detoasted n - k pages, the sort spilling to disk; 1.2 s for the 12 pages of 100,000
# `shipments`, quadratic in the pages).
INPUT_PAGE_START = (
    select(StoredInputPage.first_item)
    .where(
        StoredInputPage.batch_id == bindparam("batch_id"),
        StoredInputPage.first_item + StoredInputPage.items > bindparam("position"),
    )
    .order_by(StoredInputPage.first_item)
    .limit(1)
    .scalar_subquery()
)
INPUT_PAGE = (
    select(
        StoredInputPage.first_item,
        StoredInputPage.items,
        StoredInputPage.features,
        # As its text: validated from it (`Pipeline.page_items`), never parsed twice.
        cast(StoredInputPage.data, Text).label("data"),
    )
    .where(StoredInputPage.batch_id == bindparam("batch_id"), StoredInputPage.first_item == INPUT_PAGE_START)
    # The features are a `bytea`: read in binary format.
    .execution_options(**BINARY_RESULTS)
)


def input_pages(
    conn: Connection, batch_id: uuid.UUID, n_features: int, first_item: int = 0, min_items: int | None = None
) -> Iterator[InputPage]:
    """Yield a batch's inputs from `first_item` on as stored pages, in item order, one page
    per query: every page when `min_items` is None, else pages until at least `min_items`
    inputs are yielded. Only a page holding inputs before `first_item` is cut (a step of a
    split made before steps took whole pages): cutting a page of JSON items parses it."""
    position = first_item
    end = None if min_items is None else first_item + min_items
    while end is None or position < end:
        row = conn.execute(INPUT_PAGE, {"batch_id": batch_id, "position": position}).first()
        if row is None:
            return
        page = InputPage.from_stored(row.first_item, row.items, row.features, row.data, n_features)
        stop = page.first + page.count
        yield page.cut(max(position, page.first), stop)
        position = stop


@dataclass(frozen=True)
class StoredResult:
    """One input's row of the `results` view; `model_versions` may be shared by the results
    of a page (read-only)."""

    item: int
    output: dict[str, Any] | None
    error: str | None
    model_versions: Mapping[str, str]


# A batch's next result page after an item, its pinned versions, and whether it holds the
# batch's last input: found by its key first, as `INPUT_PAGE`.
RESULT_PAGE_START = (
    select(ResultPage.first_item)
    .where(ResultPage.batch_id == bindparam("batch_id"), ResultPage.first_item > bindparam("after"))
    .order_by(ResultPage.first_item)
    .limit(1)
    .scalar_subquery()
)
RESULT_PAGE = (
    select(
        ResultPage.first_item,
        ResultPage.outputs,
        ResultPage.errors,
        ResultPage.versions,
        Batch.model_versions.label("pinned"),
        (ResultPage.first_item + ResultPage.items >= Batch.items).label("last"),
    )
    .join(Batch, Batch.id == ResultPage.batch_id)
    .where(ResultPage.batch_id == bindparam("batch_id"), ResultPage.first_item == RESULT_PAGE_START)
)


def input_versions(
    pinned: Mapping[str, str], versions: list[dict[str, str | None] | None] | None, count: int
) -> list[Mapping[str, str]]:
    """Per input of a result page, the versions that scored it, as the `results` view's
    `model_versions`: `pinned` (one shared mapping) merged with the input's entry of the
    page's `versions`, nulls dropped."""
    if versions is None:
        return [pinned] * count
    return [
        pinned
        if override is None
        else {model: version for model, version in {**pinned, **override}.items() if version is not None}
        for override in versions
    ]


@dataclass(frozen=True)
class ResultsPage:
    """A result page as read, with whether it holds the batch's last input."""

    first_item: int
    results: list[StoredResult]
    last: bool


def results_page(
    first_item: int,
    outputs: list[Any],
    errors: list[str | None] | None,
    versions: list[dict[str, str | None] | None] | None,
    pinned: Mapping[str, str] | None,
    last: bool,
) -> ResultsPage:
    """The results of a stored result page: its columns as `RESULT_PAGE` reads them."""
    count = len(outputs)
    used = input_versions(pinned or {}, versions, count)
    results = [
        StoredResult(first_item + index, output, error, scored)
        for index, (output, error, scored) in enumerate(zip(outputs, errors or [None] * count, used, strict=True))
    ]
    return ResultsPage(first_item, results, last)


def iter_results(engine: Engine, batch_id: uuid.UUID, ahead: ResultsPage | None = None) -> Iterator[StoredResult]:
    """Yield a batch's results in item order, one page per query (no query after the last
    page); from `ahead`, its first page already read (`batch_status_read_ahead`), on."""
    if ahead is not None:
        yield from ahead.results
        if ahead.last:
            return
    after = -1 if ahead is None else ahead.first_item
    while True:
        with autocommit(engine) as conn, collection_paused():
            row = conn.execute(RESULT_PAGE, {"batch_id": batch_id, "after": after}).first()
        if row is None:
            return
        page = results_page(row.first_item, row.outputs, row.errors, row.versions, row.pinned, row.last)
        yield from page.results
        if page.last:
            return
        after = page.first_item


def result_page_row(
    batch_id: uuid.UUID,
    first: int,
    outputs: Sequence[str | None],
    errors: Sequence[str | None],
    versions: str | None,
) -> dict[str, Any]:
    """The parameters of the row storing the results of inputs `first` .. `first +
    len(outputs) - 1` (`insert_result_page`, or the statement finishing the batch): per
    input its output as JSON text, or None and in `errors` why it has none; `versions`: the
    page's `result_pages.versions` as JSON text (None: every input has the batch's pinned
    versions)."""
    return {
        "batch_id": batch_id,
        "page_first": first,
        "page_items": len(outputs),
        "page_outputs": "[" + ",".join("null" if output is None else output for output in outputs) + "]",
        "page_errors": json.dumps(list(errors)) if any(error is not None for error in errors) else None,
        "page_versions": versions,
    }


def insert_result_page(conn: Connection, page: dict[str, Any]) -> None:
    """Store a result page (`result_page_row`): a row, so one INSERT."""
    conn.execute(queries.INSERT_RESULT_PAGE, page)

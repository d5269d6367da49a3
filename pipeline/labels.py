"""Ground truth that arrives after a batch: validating labels against a pipeline's
`label_type` before anything is stored (`pipeline.ledger.store_labels` stores them)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from pipeline.definition import Pipeline
from pipeline.errors import InvalidLabelError

# Problems spelled out in the one line of an InvalidLabelError.
SHOWN_PROBLEMS = 5


def refuse(batch_id: str, problems: list[str]) -> InvalidLabelError:
    """The one-line error refusing a batch's labels for `problems` (at least one)."""
    shown = "; ".join(problems[:SHOWN_PROBLEMS])
    more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    return InvalidLabelError(f"labels for batch {batch_id} refused, nothing stored: {shown}{more}")


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    return str(first["msg"])


def validated_labels(
    pipeline: Pipeline, batch_id: str, items: int, labels: Iterable[tuple[Any, Any]]
) -> dict[int, str]:
    """Each label of `labels` ((input index, label) pairs) as JSON text, by input index, once
    every index is an int in 0 .. `items` - 1 given once and every label is valid for the
    pipeline's `label_type` (strictly: `true`, "1" and 1.0 are not the label 1).

    Raises:
        InvalidLabelError: the pipeline takes no labels, no label is given, or any index or
            label is bad (naming the first few).
    """
    if pipeline.label_type is None:
        raise refuse(batch_id, [f"pipeline {pipeline.name!r} takes no labels (it declares no label_type)"])
    adapter: TypeAdapter[Any] = TypeAdapter(pipeline.label_type)
    stored: dict[int, str] = {}
    problems = []
    for item, label in labels:
        if isinstance(item, bool) or not isinstance(item, int):
            problems.append(f"item {json.dumps(item, default=repr)[:40]}: not an input index (an integer)")
            continue
        if not 0 <= item < items:
            problems.append(f"item {item}: out of range (the batch has {items} inputs)")
            continue
        if item in stored:
            problems.append(f"item {item}: labelled twice")
            continue
        try:
            value = adapter.validate_python(label, strict=True)
        except ValidationError as error:
            problems.append(f"item {item}: label {json.dumps(label, default=repr)[:80]}: {_first_error(error)}")
            continue
        stored[item] = json.dumps(adapter.dump_python(value, mode="json"))
    if not stored and not problems:
        problems.append("no label given")
    if problems:
        raise refuse(batch_id, problems)
    return stored


def labels_from_lines(batch_id: str, lines: Iterable[tuple[int, Any]]) -> list[tuple[Any, Any]]:
    """(item, label) pairs from parsed JSON lines `(line number, object)`, each
    `{"item": i, "label": ...}`.

    Raises:
        InvalidLabelError: a line is not such an object.
    """
    pairs = []
    problems = []
    for number, line in lines:
        if not isinstance(line, dict) or set(line) != {"item", "label"}:
            problems.append(f'line {number}: not {{"item": INDEX, "label": LABEL}}')
            continue
        pairs.append((line["item"], line["label"]))
    if problems:
        raise refuse(batch_id, problems)
    return pairs

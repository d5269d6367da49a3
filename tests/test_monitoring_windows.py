"""Monitoring over time on real services: labels stored after a batch (validated strictly,
refused whole, idempotent, history kept) and the realised KPIs they give; windows pooling
many batches' contributions; alerts that fire once per episode and clear; `pipeline monitor`."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from pipeline import ledger
from pipeline.client import BatchHandle, Client
from pipeline.errors import BatchNotFoundError, InvalidLabelError
from pipeline.pipelines.screening import held_out_records
from tests.helpers import Processes, RunServices
from tests.test_cli import _assert_one_line_error, _cli, _env

RECORDS = 40


def _unlabelled(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """The records without their labels, and the labels apart (ground truth that comes later)."""
    return [{"features": record["features"]} for record in records], [record["label"] for record in records]


@pytest.fixture(scope="module")
def screened(stack: Processes, client: Client) -> tuple[BatchHandle, list[int]]:
    """A finished screening batch of held-out records submitted without labels, and their labels."""
    inputs, truth = _unlabelled(held_out_records(RECORDS, seed=14))
    batch = client.submit("screening", inputs)
    status = batch.wait(timeout=300)
    assert status.state == "succeeded", status.error
    return batch, truth


def _label_rows(engine: Engine, batch_id: str) -> list[tuple[int, Any, bool]]:
    """The batch's label rows: (item, label, current), oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT item, label, replaced_at IS NULL FROM labels WHERE batch_id = :id ORDER BY id"),
            {"id": batch_id},
        ).all()
    return [(row[0], row[1], row[2]) for row in rows]


def _expected_recall(batch: BatchHandle, truth: dict[int, int]) -> float | None:
    decisions = {result.item: result.output["decision"] for result in batch.results() if result.output}
    malignant = [item for item, label in truth.items() if label == 0]
    return sum(decisions[item] == "malignant" for item in malignant) / len(malignant) if malignant else None


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        ({0: True}, "item 0: label true: Input should be a valid integer"),
        ({0: "1"}, 'item 0: label "1": Input should be a valid integer'),
        ({0: 1.0}, "item 0: label 1.0: Input should be a valid integer"),
        ({0: 2}, "item 0: label 2: Input should be less than or equal to 1"),
        ({1: 0, RECORDS: 1}, f"item {RECORDS}: out of range (the batch has {RECORDS} inputs)"),
        ({-1: 0}, "item -1: out of range"),
        ({"3": 0}, 'item "3": not an input index'),
        ({}, "no label given"),
    ],
)
def test_bad_labels_are_refused_whole(
    screened: tuple[BatchHandle, list[int]], engine: Engine, labels: dict[Any, Any], reason: str
) -> None:
    batch, _ = screened
    with pytest.raises(InvalidLabelError) as refused:
        batch.add_labels({**labels})
    message = str(refused.value)
    assert "\n" not in message
    assert f"labels for batch {batch.id} refused, nothing stored: " in message
    assert reason in message
    assert _label_rows(engine, batch.id) == []


def test_labels_of_an_unknown_or_unfinished_batch_are_refused(
    client: Client, isolated: tuple[Client, str], engine: Engine
) -> None:
    with pytest.raises(BatchNotFoundError, match="no batch"):
        ledger.store_labels(client.engine, uuid.uuid4(), [(0, 1)])
    # Published where no worker listens: it stays unfinished.
    waiting = isolated[0].submit("screening", _unlabelled(held_out_records(3))[0])
    with pytest.raises(InvalidLabelError, match="the batch is (pending|running): labels are taken once"):
        waiting.add_labels({0: 1})
    assert _label_rows(engine, waiting.id) == []


def test_labels_are_idempotent_keep_their_history_and_give_realised_kpis(
    screened: tuple[BatchHandle, list[int]], engine: Engine
) -> None:
    batch, truth = screened
    first = {item: truth[item] for item in range(0, RECORDS, 2)}
    stored = batch.add_labels(first)
    assert (stored.added, stored.changed, stored.unchanged) == (len(first), 0, 0)
    assert stored.realised["labelled_items"] == len(first)
    assert stored.realised["kpis"]["recall_malignant"] == _expected_recall(batch, first)

    again = batch.add_labels(first)
    assert (again.added, again.changed, again.unchanged) == (0, 0, len(first))
    assert len(_label_rows(engine, batch.id)) == len(first)

    flipped = {0: 1 - truth[0], 1: truth[1]}
    changed = batch.add_labels(flipped)
    assert (changed.added, changed.changed, changed.unchanged) == (1, 1, 0)
    history = [(label, current) for item, label, current in _label_rows(engine, batch.id) if item == 0]
    assert history == [(truth[0], False), (1 - truth[0], True)]

    current = {**first, **flipped}
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT labelled_share, realised_kpis FROM batch_metrics WHERE id = :id"), {"id": batch.id}
        ).one()
    assert row.labelled_share == pytest.approx(len(current) / RECORDS)
    assert row.realised_kpis["recall_malignant"] == _expected_recall(batch, current)
    assert batch.status().metrics["realised"]["counts"]["labelled"] == len(current)


def test_labels_command(
    screened: tuple[BatchHandle, list[int]], services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    batch, truth = screened
    env = _env(services, models_dir)
    good = tmp_path / "labels.jsonl"
    good.write_text("".join(json.dumps({"item": item, "label": label}) + "\n" for item, label in enumerate(truth)))
    run = _cli(env, "labels", batch.id, str(good), "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["realised"]["labelled_items"] == RECORDS

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item": 0, "label": 1}\n{"item": 0, "label": 0}\n{"label": 1}\n')
    _assert_one_line_error(_cli(env, "labels", batch.id, str(bad)), "line 3: not", "refused, nothing stored")
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"item": 0, "label": 1}\n{"item": 0, "label": 0}\n')
    _assert_one_line_error(_cli(env, "labels", batch.id, str(twice)), "item 0: labelled twice")
    _assert_one_line_error(_cli(env, "labels", str(uuid.uuid4()), str(good)), "no batch")

"""Bad input and bad settings are refused before a batch exists, each with one clear error;
a batch that still cannot be split answers every input with the error; inputs are read,
validated and stored a page at a time."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
from sqlalchemy import Engine, text

from pipeline import inputs, ledger
from pipeline.client import Client
from pipeline.errors import IdempotencyKeyError, InvalidArgumentError, InvalidInputError, SettingsError
from pipeline.inputs import PAGE_ITEMS, encode_inputs
from pipeline.pipelines.digits import held_out_strips
from pipeline.pipelines.screening import FEATURES, held_out_records
from pipeline.pipelines.screening import dataset_split as screening_split
from pipeline.registry import UnknownPipelineError
from pipeline.scratch import delete_keys
from pipeline.splitter import run_split
from tests.helpers import RunServices
from tests.pipelines import UNSPLITTABLE, PoisonPipeline
from tests.test_cli import _assert_one_line_error as assert_one_line_error
from tests.test_cli import _cli as run_cli
from tests.test_cli import _env as cli_env
from tests.test_cli import _jsonl as write_jsonl


def _counts(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return (
            conn.execute(text("SELECT count(*) FROM batches")).scalar(),
            conn.execute(text("SELECT count(*) FROM input_pages")).scalar(),
        )


def test_each_bad_item_is_named_and_nothing_is_stored_or_queued(
    isolated: tuple[Client, str], quiet_engine: Engine, services: RunServices
) -> None:
    client, prefix = isolated
    good = held_out_strips(8, seed=2)
    bad = list(good)
    bad[1] = {"image": good[1]["image"][:7]}  # 7 rows
    bad[2] = {"image": [[17.0] * 8 for _ in range(8)]}  # out of range
    bad[3] = {"image": [[math.nan] * 8 for _ in range(8)]}  # NaN
    bad[4] = {"image": [[] for _ in range(8)]}  # k = 0
    bad[5] = {"image": [[0.0] * (8 * 33) for _ in range(8)]}  # k = 33
    bad[6] = {"image": [[0.0] * 12 for _ in range(8)]}  # not a multiple of 8
    bad[7] = "not an object"
    before = _counts(quiet_engine)
    with pytest.raises(InvalidInputError) as caught:
        client.submit("digits", bad)
    assert [index for index, _ in caught.value.problems] == [1, 2, 3, 4, 5, 6, 7]
    reasons = dict(caught.value.problems)
    assert "8 rows" in reasons[1]
    assert "less than or equal to 16" in reasons[2]
    assert "finite" in reasons[3]
    assert "k in 1..32, got 0" in reasons[4]
    assert "got 264" in reasons[5]
    assert "item 7:" in str(caught.value)
    assert _counts(quiet_engine) == before
    broker = redis.Redis.from_url(services.broker_url)
    assert list(broker.scan_iter(match=f"{prefix}*")) == []

    # The same checks see a valid submission (so they can fail).
    batch = client.submit("digits", good)
    assert _counts(quiet_engine)[0] == before[0] + 1
    # A batch this small is split by the client itself: its sub-tasks' messages are queued.
    assert broker.llen(f"{prefix}model.digit-classifier") >= 1
    batch.cancel()


def test_no_inputs_and_unknown_pipeline_are_refused(isolated: tuple[Client, str]) -> None:
    client, _ = isolated
    with pytest.raises(InvalidInputError, match="no inputs"):
        client.submit("digits", [])
    with pytest.raises(UnknownPipelineError, match="known: digits"):
        client.submit("nope", held_out_strips(1))


def _stored_with_key(engine: Engine, key: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM batches WHERE idempotency_key = :k"), {"k": key}).scalar_one()


# --- point 2: nothing that cannot be split is stored; a split failure answers every input ---


def test_a_dataframe_with_a_repeated_feature_column_is_refused_by_submit(
    isolated: tuple[Client, str], quiet_engine: Engine
) -> None:
    client, _ = isolated
    frame = pd.DataFrame(np.resize(screening_split()[1], (5, len(FEATURES))), columns=FEATURES)
    before = _counts(quiet_engine)
    with pytest.raises(InvalidInputError, match=r"the DataFrame has the columns \['mean area'\] more than once"):
        client.submit("screening", pd.concat([frame, frame[["mean area"]]], axis=1))
    assert _counts(quiet_engine) == before


def test_chunk_sizes_of_an_unknown_model_are_refused_by_submit(
    services: RunServices, models_dir: Path, engine: Engine
) -> None:
    with Client(services.settings(models_dir, chunk_sizes={"digit-clasifier": 500})) as client:
        before = _counts(engine)
        with pytest.raises(SettingsError, match="PIPELINE_CHUNK_SIZES names models no pipeline has: digit-clasifier"):
            client.submit("digits", held_out_strips(2))
        assert _counts(engine) == before


def _unsplittable_points(count: int, bad: int) -> list[dict[str, list[float]]]:
    return [{"values": [UNSPLITTABLE if i == bad else 0.5, 1.0, 2.0, 3.0]} for i in range(count)]


def _assert_every_input_has_the_split_error(client: Client, batch_id: str, count: int) -> None:
    status = client.batch(batch_id).wait(timeout=60)
    assert status.state == "failed" and status.error == "split failed: an unsplittable point"
    results = list(client.batch(batch_id).results())
    assert [result.item for result in results] == list(range(count))
    assert all(result.output is None and result.error == status.error for result in results)


def test_a_batch_the_client_cannot_split_has_an_error_row_per_input(isolated: tuple[Client, str]) -> None:
    client, _ = isolated
    batch = client.submit("poison", _unsplittable_points(12, bad=5))
    _assert_every_input_has_the_split_error(client, batch.id, 12)


@pytest.mark.parametrize("splitter", ["client", "aggregator"])
def test_a_batch_whose_third_page_fails_to_split_has_an_error_row_per_input(
    services: RunServices, models_dir: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch, splitter: str
) -> None:
    """Pages of 10 inputs, split by the client as it stores them, or by an aggregator (here
    in-process) a step of 10 inputs at a time: the sub-tasks of the first two pages are
    counted and cancelled, and all 30 inputs get the error."""
    monkeypatch.setattr(inputs, "PAGE_ITEMS", 10)  # a step takes whole stored pages
    prefix = f"isolated-{uuid.uuid4().hex[:8]}:"
    settings = services.settings(models_dir, broker_prefix=prefix, small_batch_items=0, split_step_items=10)
    with Client(settings) as client:
        try:
            points = _unsplittable_points(30, bad=25)
            if splitter == "client":
                batch_id = client.submit("poison", points).id
            else:
                with engine.begin() as conn:
                    stored, _ = ledger.insert_batch(
                        conn, "poison", encode_inputs(PoisonPipeline(), points, 100, 10_000), None
                    )
                run_split(client.engine, settings, stored, client.publisher())
                batch_id = str(stored)
            _assert_every_input_has_the_split_error(client, batch_id, 30)
            status = client.batch(batch_id).status()
            assert status.total == 20 and status.cancelled == 20
        finally:
            delete_keys(services.broker_url, prefix)


def test_submit_wait_exits_non_zero_on_a_batch_that_cannot_be_split(
    services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    env = cli_env(services, models_dir)
    run = run_cli(env, "submit", "poison", str(write_jsonl(tmp_path / "p.jsonl", _unsplittable_points(4, 2))), "--wait")
    assert run.returncode == 2, run.stderr
    batch_id = run.stdout.splitlines()[0]
    results = [json.loads(line) for line in run_cli(env, "results", batch_id).stdout.splitlines()]
    expected = [(i, "split failed: an unsplittable point") for i in range(4)]
    assert [(row["item"], row["error"]) for row in results] == expected


# --- point 6: one clear error, nothing written ----------------------------------------------


@pytest.mark.parametrize("deadline", [math.inf, 1e300, 1e13, math.nan, 0.0])
def test_a_deadline_out_of_range_is_refused(
    isolated: tuple[Client, str], quiet_engine: Engine, deadline: float
) -> None:
    client, _ = isolated
    key = f"deadline-{uuid.uuid4().hex}"
    with pytest.raises(InvalidArgumentError, match=r"invalid SubmitOptions: deadline_s: Input should be"):
        client.submit("digits", held_out_strips(1), deadline_s=deadline, idempotency_key=key)
    assert _stored_with_key(quiet_engine, key) == 0


def test_submit_of_none_is_refused(isolated: tuple[Client, str], quiet_engine: Engine) -> None:
    client, _ = isolated
    before = _counts(quiet_engine)
    with pytest.raises(InvalidInputError, match="the inputs must be a list .* not NoneType"):
        client.submit("digits", None)  # type: ignore[arg-type]
    assert _counts(quiet_engine) == before


def test_an_idempotency_key_of_another_pipeline_is_refused(isolated: tuple[Client, str], quiet_engine: Engine) -> None:
    client, _ = isolated
    key = f"other-{uuid.uuid4().hex}"
    first = client.submit("digits", held_out_strips(1), idempotency_key=key)
    with pytest.raises(IdempotencyKeyError, match=f"already names batch {first.id} of pipeline 'digits'"):
        client.submit("poison", _unsplittable_points(1, bad=-1), idempotency_key=key)
    assert _stored_with_key(quiet_engine, key) == 1
    first.cancel()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("[" * 100_000 + "]" * 100_000, ":1: nested too deeply to read"),
        ('{"values": [' + "1" * 5_000 + ", 1, 2, 3]}", ":1: an integer of more than 4300 digits"),
        ('{"values": [' + "1," * 600_000 + "1]}", ":1: longer than 1000000 bytes, the largest input"),
    ],
)
def test_an_input_line_that_cannot_be_read_is_one_line_and_stores_nothing(
    line: str, reason: str, services: RunServices, models_dir: Path, tmp_path: Path, engine: Engine
) -> None:
    path = tmp_path / "inputs.jsonl"
    path.write_text(line + "\n")
    key = f"line-{uuid.uuid4().hex}"
    run = run_cli(cli_env(services, models_dir), "submit", "poison", str(path), "--idempotency-key", key)
    assert_one_line_error(run, f"{path}{reason}")
    assert _stored_with_key(engine, key) == 0


def test_a_deadline_of_inf_on_the_command_line_is_one_line(
    services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", _unsplittable_points(1, bad=-1))
    run = run_cli(cli_env(services, models_dir), "submit", "poison", str(path), "--deadline", "inf")
    assert_one_line_error(run, "invalid SubmitOptions: deadline_s: Input should be less than or equal to 31536000")


# --- point 8: strict types, one rule for extra fields -----------------------------------------


def test_a_label_that_is_not_an_integer_is_refused_by_submit(
    isolated: tuple[Client, str], quiet_engine: Engine
) -> None:
    client, _ = isolated
    records = held_out_records(4)
    records[1]["label"], records[2]["label"], records[3]["label"] = True, "1", 1.0
    before = _counts(quiet_engine)
    with pytest.raises(InvalidInputError) as caught:
        client.submit("screening", records)
    assert [index for index, _ in caught.value.problems] == [1, 2, 3]
    assert all("label: Input should be a valid integer" in reason for _, reason in caught.value.problems)
    assert _counts(quiet_engine) == before


# --- point 9: inputs streamed in pages, files read with bounded reads and a progress bar -------


def test_a_generator_of_inputs_is_stored_page_by_page(isolated: tuple[Client, str], quiet_engine: Engine) -> None:
    client, _ = isolated
    count = PAGE_ITEMS * 2 + 3
    batch = client.submit("poison", ({"values": [0.5, 1.0, 2.0, float(i)]} for i in range(count)))
    assert batch.status().items == count
    with quiet_engine.connect() as conn:
        pages = conn.execute(
            text("SELECT first_item, items FROM input_pages WHERE batch_id = :b ORDER BY 1"), {"b": batch.id}
        ).all()
    assert [tuple(page) for page in pages] == [(0, PAGE_ITEMS), (PAGE_ITEMS, PAGE_ITEMS), (2 * PAGE_ITEMS, 3)]
    batch.cancel()


def test_a_bad_input_on_a_later_page_leaves_nothing_stored(isolated: tuple[Client, str], quiet_engine: Engine) -> None:
    """The first pages are stored as they are validated, in the transaction that a bad
    input on the last page rolls back."""
    client, _ = isolated
    key = f"late-{uuid.uuid4().hex}"
    count = PAGE_ITEMS * 2 + 3
    points = ({"values": [0.5, 1.0, 2.0] + ([] if i == count - 1 else [3.0])} for i in range(count))
    before = _counts(quiet_engine)
    with pytest.raises(InvalidInputError, match=f"item {count - 1}: values: List should have at least 4 items"):
        client.submit("poison", points, idempotency_key=key)
    assert _counts(quiet_engine) == before and _stored_with_key(quiet_engine, key) == 0


def test_submit_shows_its_progress_reading_a_file(services: RunServices, models_dir: Path, tmp_path: Path) -> None:
    """On a terminal (TTY_COMPATIBLE=1 makes rich draw as on one) the bar names the file; the
    batch id alone goes to stdout."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"values": [0.5, 1.0, 2.0, 3.0]}] * 3_000)
    run = run_cli(cli_env(services, models_dir, TTY_COMPATIBLE="1"), "submit", "poison", str(path))
    assert run.returncode == 0, run.stderr
    assert f"reading {path}" in run.stderr
    uuid.UUID(run.stdout.strip())
    run = run_cli(cli_env(services, models_dir), "submit", "poison", str(path))
    assert run.returncode == 0 and run.stderr == ""


@pytest.mark.parametrize(
    ("chunk_sizes", "reason"),
    [
        ("digit-classifier=500", "PIPELINE_CHUNK_SIZES is not JSON"),
        ('{"digit-classifier": 0}', "chunk_sizes.digit-classifier: Input should be greater than 0"),
        ('{"digit-clasifier": 500}', "PIPELINE_CHUNK_SIZES names models no pipeline has: digit-clasifier;"),
    ],
)
def test_bad_chunk_sizes_stop_a_worker_and_an_aggregator_at_start_up(
    chunk_sizes: str, reason: str, services: RunServices, models_dir: Path
) -> None:
    env = cli_env(services, models_dir, PIPELINE_CHUNK_SIZES=chunk_sizes)
    for role in ("workers", "aggregator"):
        run = subprocess.run([sys.executable, "-m", role], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        (line,) = run.stderr.strip().splitlines()
        assert line.startswith(f"pipeline {role.removesuffix('s')}: ") and reason in line
    if "names models" not in reason:  # read by every command with a client: one line from the CLI too
        run = run_cli(env, "status", str(uuid.UUID(int=0)))
        assert_one_line_error(run, "invalid Settings: chunk_sizes", reason)

"""Monitoring over time on real services: labels stored after a batch (validated strictly,
refused whole, idempotent, history kept) and the realised KPIs they give; windows pooling
many batches' contributions; alerts that fire once per episode and clear; `pipeline monitor`."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sqlalchemy import Engine, text

from aggregator.exporter import _window_families
from pipeline import ledger
from pipeline.artifacts import read_manifest
from pipeline.batch_handle import BatchHandle
from pipeline.client import Client
from pipeline.errors import BatchNotFoundError, InvalidLabelError
from pipeline.estimation import binary_sums
from pipeline.monitor import evaluate_alerts, judge_window
from pipeline.pipelines.screening import FEATURES, held_out_records
from pipeline.registry import get_pipeline
from pipeline.windows import parse_window
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
    client: Client, isolated: tuple[Client, str], quiet_engine: Engine
) -> None:
    with pytest.raises(BatchNotFoundError, match="no batch"):
        ledger.store_labels(client.engine, uuid.uuid4(), [(0, 1)])
    # Published where no worker listens: it stays unfinished.
    waiting = isolated[0].submit("screening", _unlabelled(held_out_records(3))[0])
    with pytest.raises(InvalidLabelError, match="the batch is (pending|running): labels are taken once"):
        waiting.add_labels({0: 1})
    assert _label_rows(quiet_engine, waiting.id) == []


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


def test_a_batch_contributes_to_its_windows_and_monitor_shows_them(
    screened: tuple[BatchHandle, list[int]], engine: Engine, services: RunServices, models_dir: Path
) -> None:
    batch, _ = screened
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT model, model_version, rows, label_counts FROM monitor_contributions WHERE batch_id = :id"),
            {"id": batch.id},
        ).all()
    versions = {spec.name: read_manifest(models_dir, spec.name).sha256 for spec in get_pipeline("screening").models}
    assert {(row.model, row.model_version) for row in rows} == set(versions.items())
    assert all(row.rows == RECORDS and row.label_counts["labelled"] == RECORDS for row in rows)

    env = _env(services, models_dir)
    run = _cli(env, "monitor", "screening", "--window", "24h", "--json")
    assert run.returncode == 0, run.stderr
    shown = {version["model"]: version for version in json.loads(run.stdout)["versions"]}
    assert set(shown) == set(versions)
    logreg = shown["screen-logreg"]
    assert logreg["model_version"] == versions["screen-logreg"] and logreg["batches"] >= 1
    assert logreg["labelled_items"] >= RECORDS and logreg["realised_kpis"]["accuracy"] is not None
    assert "score" in logreg["drift"] and logreg["latency_p95_s"] is not None
    # CBPE of the soft vote is carried by the first model's versions only.
    recall = logreg["estimated_kpis"]["recall_malignant"]
    assert recall["low"] <= recall["value"] <= recall["high"]
    assert set(logreg["estimated_kpis"]) == {"accuracy", "recall_malignant", "false_positive_rate"}
    assert shown["screen-forest"]["estimated_kpis"] == {}
    table = _cli(env, "monitor", "--window", "30m")
    assert table.returncode == 0, table.stderr
    assert "screen-forest" in table.stdout and "window 30m" in table.stdout
    for spec in ("1x", "0h", "h", "5 days", "400d"):
        _assert_one_line_error(_cli(env, "monitor", "--window", spec), f"window {spec!r}")


def _batches(engine: Engine, count: int) -> list[uuid.UUID]:
    """`count` batch rows of the screening pipeline (the contributions' owners), stored in one statement."""
    ids = [uuid.uuid4() for _ in range(count)]
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO batches (id, pipeline, items) SELECT unnest(CAST(:ids AS uuid[])), 'screening', 30"),
            {"ids": ids},
        )
    return ids


def _stream(
    engine: Engine,
    models_dir: Path,
    start: datetime,
    count: int,
    rows: int,
    shifted: int,
    seed: int,
    estimate_sums: dict[str, float] | None = None,
) -> datetime:
    """Contribute `count` batches of `rows` rows each of the logistic model, one a minute from
    `start`: bin counts drawn from its reference shares (no drift), with the first `shifted`
    features' shares moved towards their upper bins (drift), and `estimate_sums` (CBPE) each;
    return the last one's time."""
    spec = next(spec for spec in get_pipeline("screening").models if spec.name == "screen-logreg")
    manifest = read_manifest(models_dir, spec.name)
    profile = manifest.reference
    assert profile is not None
    rng = np.random.default_rng(seed)
    contributions = []
    for index, batch_id in enumerate(_batches(engine, count)):
        counts = []
        for number, histogram in enumerate(profile.histograms):
            shares = np.asarray(histogram.expected)
            if number < shifted:
                # Half the lower bins' share moves to the upper bins (a PSI near 0.27 on deciles).
                shares = shares * np.where(np.arange(len(shares)) < len(shares) / 2, 0.5, 1.5)
            counts.append(rng.multinomial(rows, shares / shares.sum()))
        contributions.append(
            ledger.Contribution(
                batch_id,
                "screening",
                spec.name,
                manifest.sha256,
                start + timedelta(minutes=index),
                30,
                rows,
                np.concatenate(counts).astype(np.int64),
                {"review_rate": 0.1},
                0.5,
                estimate_sums,
            )  # fmt: skip
        )
    with engine.begin() as conn:
        ledger.record_contributions(conn, contributions)
    return start + timedelta(minutes=count - 1)


@pytest.fixture
def monitored(quiet_engine: Engine) -> Engine:
    """The quiet database without alerts or judged windows (they outlive its batches)."""
    with quiet_engine.begin() as conn:
        conn.execute(text("TRUNCATE alerts, monitor_evaluations"))
    return quiet_engine


def _alerts(engine: Engine) -> list[tuple[str, str, bool]]:
    with engine.connect() as conn:
        rows = conn.execute(text('SELECT kind, "window", cleared_at IS NULL FROM alerts ORDER BY id')).all()
    return [(row[0], row[1], row[2]) for row in rows]


def _evaluate(engine: Engine, models_dir: Path, now: datetime, *specs: str) -> tuple[int, int]:
    with engine.begin() as conn:
        return evaluate_alerts(conn, get_pipeline("screening"), [parse_window(s) for s in specs], now)


def test_small_batches_pool_into_a_judged_window_and_a_shift_alarms_once_then_clears(
    monitored: Engine, models_dir: Path
) -> None:
    quiet_engine = monitored
    start = datetime(2030, 1, 1, tzinfo=UTC)
    # 40 batches of 20 rows (4 merged bins a test each alone), 800 rows together.
    now = _stream(quiet_engine, models_dir, start, 40, 20, shifted=0, seed=1)
    with quiet_engine.connect() as conn:
        (window,) = judge_window(conn, "screening", parse_window("1h"), now)
        (single,) = judge_window(conn, "screening", parse_window("20rows"), now)
    assert window["batches"] == 40 and window["rows"] == 800
    assert not window["drift"]["drifted"]
    assert any(entry["p_value"] is not None for entry in window["drift"]["top_features"].values())
    assert (single["batches"], single["rows"]) == (1, 20)
    assert _evaluate(quiet_engine, models_dir, now, "1h", "600rows") == (0, 0)
    assert _alerts(quiet_engine) == []

    # The shifted stream: one episode, however often the window is judged while it lasts.
    for step in range(3):
        now = _stream(quiet_engine, models_dir, now + timedelta(minutes=1), 10, 20, shifted=3, seed=10 + step)
        _evaluate(quiet_engine, models_dir, now, "600rows")
    assert _alerts(quiet_engine) == [("drift", "600rows", True)]
    with quiet_engine.connect() as conn:
        evidence = conn.execute(text("SELECT evidence FROM alerts")).scalar_one()
    assert set(evidence["drifted_features"]) <= set(FEATURES[:3]) and evidence["drifted_features"]

    # Back to no drift: once the shifted rows have left the window, the episode is cleared.
    now = _stream(quiet_engine, models_dir, now + timedelta(minutes=1), 30, 20, shifted=0, seed=99)
    assert _evaluate(quiet_engine, models_dir, now, "600rows") == (0, 1)
    assert _alerts(quiet_engine) == [("drift", "600rows", False)]


def test_an_estimated_kpi_below_its_floor_alarms_once_then_clears(monitored: Engine, models_dir: Path) -> None:
    quiet_engine = monitored
    # Each input malignant with chance 0.6; a screen that flags 30 % of them (expected recall
    # 0.3, below the 0.9 floor), then one that flags them all (1.0).
    p = np.full(20, 0.6)
    missing = binary_sums(p, np.arange(20) < 6)
    flagging = binary_sums(p, np.ones(20, dtype=bool))
    now = _stream(quiet_engine, models_dir, datetime(2032, 1, 1, tzinfo=UTC), 40, 20, 0, 3, missing)
    assert _evaluate(quiet_engine, models_dir, now, "1h") == (1, 0)
    now = _stream(quiet_engine, models_dir, now + timedelta(minutes=1), 5, 20, 0, 4, missing)
    assert _evaluate(quiet_engine, models_dir, now, "1h") == (0, 0)
    assert _alerts(quiet_engine) == [("estimated_performance", "1h", True)]
    with quiet_engine.connect() as conn:
        evidence = conn.execute(text("SELECT evidence FROM alerts")).scalar_one()
    below = evidence["below"]["recall_malignant"]
    assert below["floor"] == 0.9 and below["high"] < 0.9 and below["value"] == pytest.approx(0.3)

    now = _stream(quiet_engine, models_dir, now + timedelta(minutes=61), 40, 20, 0, 5, flagging)
    assert _evaluate(quiet_engine, models_dir, now, "1h") == (0, 1)
    assert _alerts(quiet_engine) == [("estimated_performance", "1h", False)]


def test_prometheus_alerting_rules_parse_and_name_exported_metrics(monitored: Engine, models_dir: Path) -> None:
    quiet_engine = monitored
    rules_path = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"
    rules = yaml.safe_load(rules_path.read_text())
    (group,) = rules["groups"]
    kinds = {rule["expr"].split('kind="')[1].split('"')[0] for rule in group["rules"] if "kind=" in rule["expr"]}
    assert kinds == {"drift", "realised_kpi", "latency", "estimated_performance"}
    assert all({"alert", "expr", "labels", "annotations"} <= set(rule) for rule in group["rules"])
    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run([promtool, "check", "rules", str(rules_path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

    # An open alert and a judged window reach /metrics' collector.
    now = _stream(quiet_engine, models_dir, datetime(2031, 1, 1, tzinfo=UTC), 40, 20, shifted=3, seed=7)
    assert _evaluate(quiet_engine, models_dir, now, "1h") == (1, 0)
    with quiet_engine.connect() as conn:
        families = _window_families(ledger.evaluation_figures(conn), ledger.open_alerts(conn, None))
    samples = {
        (sample.name, sample.labels.get("kind"), sample.labels.get("feature")) for f in families for sample in f.samples
    }
    assert ("pipeline_alert_open", "drift", None) in samples
    assert ("pipeline_window_feature_psi", None, FEATURES[0]) in samples

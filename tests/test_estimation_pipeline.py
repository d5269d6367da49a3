"""CBPE through the real pipeline: a held-out digits batch is estimated as it is aggregated
(metrics, `batch_metrics.estimated_kpis`, its contribution's sums, `pipeline monitor`), and
once labelled its realised digit accuracy lies inside the estimate's band."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import Engine, text

from pipeline.artifacts import read_manifest
from pipeline.client import Client
from pipeline.pipelines.digits import CLASSIFIER, held_out_strips
from tests.helpers import Processes, RunServices
from tests.test_cli import _cli, _env

STRIPS = 500


def test_a_labelled_held_out_digits_batch_lies_in_its_estimated_band(
    stack: Processes, client: Client, engine: Engine, services: RunServices, models_dir: Path
) -> None:
    strips = held_out_strips(STRIPS, seed=14)
    batch = client.submit("digits", [{"image": strip["image"]} for strip in strips])
    status = batch.wait(timeout=600)
    assert status.state == "succeeded", status.error
    estimate = status.metrics["estimated"]["digit_accuracy"]
    assert 0.9 < estimate["low"] < estimate["value"] < estimate["high"] <= 1.0

    version = read_manifest(models_dir, CLASSIFIER).sha256
    with engine.connect() as conn:
        sums = conn.execute(
            text("SELECT model, model_version, estimate_sums FROM monitor_contributions WHERE batch_id = :id"),
            {"id": batch.id},
        ).all()
    digits = sum(len(strip["label"]) for strip in strips)
    assert {(row.model, row.model_version) for row in sums if row.estimate_sums} == {(CLASSIFIER, version)}
    assert next(row.estimate_sums for row in sums if row.estimate_sums)["accuracy.n"] == digits

    stored = batch.add_labels({item: strip["label"] for item, strip in enumerate(strips)})
    realised = stored.realised["kpis"]["digit_accuracy"]
    assert estimate["low"] <= realised <= estimate["high"]
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT estimated_kpis, realised_kpis FROM batch_metrics WHERE id = :id"), {"id": batch.id}
        ).one()
    assert row.estimated_kpis["digit_accuracy"] == estimate
    assert row.realised_kpis["digit_accuracy"] == realised

    run = _cli(_env(services, models_dir), "monitor", "digits", "--window", "24h", "--json")
    assert run.returncode == 0, run.stderr
    (classifier,) = [v for v in json.loads(run.stdout)["versions"] if v["model_version"] == version]
    window = classifier["estimated_kpis"]["digit_accuracy"]
    assert window["low"] <= window["value"] <= window["high"]
    assert classifier["realised_kpis"]["digit_accuracy"] is not None
    table = _cli(_env(services, models_dir), "monitor", "digits", "--window", "24h")
    assert "digit_accuracy" in table.stdout and "estimated" in table.stdout

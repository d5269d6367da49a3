"""The screening pipeline through real worker and aggregator processes: the soft
vote at the trained threshold, KPIs against scikit-learn, drift, latency figures
against the ledger timestamps, input warnings, and array / DataFrame inputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import confusion_matrix, recall_score
from sqlalchemy import Engine, text

from pipeline.artifacts import read_manifest
from pipeline.batch_handle import BatchHandle
from pipeline.client import BatchStatus, Client
from pipeline.errors import InvalidInputError
from pipeline.pipelines.screening import (
    CONFIG,
    FEATURES,
    MALIGNANT,
    MODELS,
    Screened,
    dataset_split,
    held_out_records,
)

Finished = tuple[list[dict[str, Any]], BatchHandle, BatchStatus]
SHIFTED = ("mean texture", "worst smoothness")
# Moved by half a training standard deviation in `half_sd_shift`: the detection target.
HALF_SD_SHIFTED = ("mean radius", "mean texture", "worst smoothness")
UNSEEN_SUBSETS = 4
UNSEEN_ROWS = 150
SPREAD_KEYS = ("p50", "p95", "p99", "max")


def _run(client: Client, inputs: Any) -> tuple[BatchHandle, BatchStatus]:
    batch = client.submit("screening", inputs)
    status = batch.wait(timeout=300)
    assert status.state == "succeeded", status.error
    return batch, status


@pytest.fixture(scope="module")
def held_out(client: Client, stack: object) -> Finished:
    """Every held-out record once, labelled: new data from the training distribution."""
    inputs = held_out_records()
    return inputs, *_run(client, inputs)


@pytest.fixture(scope="module")
def shifted(client: Client, stack: object) -> BatchStatus:
    """The held-out records with two features moved up by five training standard deviations."""
    X_train = dataset_split()[0]
    inputs = copy.deepcopy(held_out_records())
    for name in SHIFTED:
        shift = 5 * X_train[:, FEATURES.index(name)].std()
        for record in inputs:
            record["features"][name] += shift
    return _run(client, inputs)[1]


@pytest.fixture(scope="module")
def unseen_subsets(client: Client, stack: object) -> list[BatchStatus]:
    """Batches of 150 held-out records each, drawn without replacement: rows the models
    never saw, from the training distribution (no drift). Resampling with replacement would
    not do: a batch of n rows drawn from the 171 held-out ones repeats their own sampling
    noise (PSIs up to 0.16 against the reference), which at n >> 171 is a real difference
    between those 171 rows and the training rows (docs/monitoring.md)."""
    records = held_out_records()
    subsets = [
        np.random.default_rng(seed).choice(len(records), UNSEEN_ROWS, replace=False)
        for seed in range(1, UNSEEN_SUBSETS + 1)
    ]
    return [_run(client, [records[row] for row in subset])[1] for subset in subsets]


@pytest.fixture(scope="module")
def half_sd_shift(client: Client, stack: object) -> BatchStatus:
    """513 rows (each held-out record three times) with three features moved up by half a
    training standard deviation."""
    X_train = dataset_split()[0]
    inputs = [copy.deepcopy(record) for record in held_out_records() * 3]
    for name in HALF_SD_SHIFTED:
        shift = 0.5 * X_train[:, FEATURES.index(name)].std()
        for record in inputs:
            record["features"][name] += shift
    return _run(client, inputs)[1]


@pytest.fixture(scope="module")
def small(client: Client, stack: object) -> Finished:
    """20 unlabelled held-out records; item 3 has a mean area far above anything seen in training."""
    inputs = [{"features": record["features"]} for record in held_out_records()[:20]]
    inputs[3] = copy.deepcopy(inputs[3])
    inputs[3]["features"]["mean area"] = 50_000.0
    return inputs, *_run(client, inputs)


def _threshold(models_dir: Path) -> float:
    thresholds = {read_manifest(models_dir, name).config["operating_threshold"] for name in MODELS}
    assert len(thresholds) == 1, "the three manifests store one operating threshold"
    return thresholds.pop()


def test_results_are_the_soft_vote_at_the_trained_threshold(held_out: Finished, models_dir: Path) -> None:
    inputs, batch, _ = held_out
    threshold = _threshold(models_dir)
    results = list(batch.results())
    assert [r.item for r in results] == list(range(len(inputs)))
    for result in results:
        out = result.output
        assert out is not None and set(out["votes"]) == set(MODELS)
        p = out["malignant_probability"]
        assert p == pytest.approx(np.mean(list(out["votes"].values())), abs=2e-6)
        if abs(p - threshold) > 1e-5:  # rounding to 6 decimals cannot move it across
            assert out["decision"] == ("malignant" if p >= threshold else "benign")
            assert out["disagreement"] == (len({v >= threshold for v in out["votes"].values()}) > 1)
        assert out["warnings"] == []
        if abs(abs(p - threshold) - CONFIG.review_margin) > 1e-5:
            near = abs(p - threshold) < CONFIG.review_margin
            assert out["needs_review"] == (out["disagreement"] or near)


def test_kpis_match_scikit_learn(held_out: Finished) -> None:
    inputs, batch, status = held_out
    outputs = [r.output for r in batch.results()]
    y_true = [record["label"] for record in inputs]
    y_pred = [MALIGNANT if out["decision"] == "malignant" else 1 for out in outputs]  # type: ignore[index]
    kpis = status.metrics["kpis"]  # type: ignore[index]
    (_, _), (false_pos, true_neg) = confusion_matrix(y_true, y_pred, labels=[MALIGNANT, 1])
    assert kpis["labelled_items"] == len(inputs)
    assert kpis["recall_malignant"] == pytest.approx(recall_score(y_true, y_pred, pos_label=MALIGNANT))
    assert kpis["false_positive_rate"] == pytest.approx(false_pos / (false_pos + true_neg))
    assert kpis["missed_malignant"] == sum(t == MALIGNANT and p != MALIGNANT for t, p in zip(y_true, y_pred))
    assert kpis["disagreement_rate"] == pytest.approx(np.mean([o["disagreement"] for o in outputs]))  # type: ignore[index]
    assert kpis["review_rate"] == pytest.approx(np.mean([o["needs_review"] for o in outputs]))  # type: ignore[index]
    assert kpis["malignant_rate"] == pytest.approx(np.mean([p == MALIGNANT for p in y_pred]))
    # The screen is tuned for recall: it misses few cancers on data it never saw.
    assert kpis["recall_malignant"] >= 0.9


def _significant(drift: dict[str, Any]) -> list[str]:
    features = [name for name, entry in drift["features"].items() if entry["significant"]]
    return features + [name for name, entry in drift["models"].items() if entry["score_significant"]]


def test_reference_like_batch_is_not_flagged(held_out: Finished) -> None:
    drift = held_out[2].metrics["drift"]  # type: ignore[index]
    assert set(drift["models"]) == set(MODELS)
    reference_rows = len(dataset_split()[0])
    for entry in drift["models"].values():
        assert (entry["rows"], entry["reference_rows"]) == (len(held_out[0]), reference_rows)
    assert len(drift["features"]) == len(FEATURES) and drift["tests"] == len(FEATURES) + len(MODELS)
    assert (drift["false_alarm_rate"], drift["min_psi"]) == (0.025, 0.1)
    # 171 rows against 398: PSIs up to the moderate band from sampling alone, none significant.
    assert {entry["band"] for entry in drift["features"].values()} <= {"none", "moderate"}
    assert all(0 < entry["p_value"] <= 1 for entry in drift["features"].values())
    assert _significant(drift) == []
    assert (drift["drifted"], drift["drifted_features"], drift["drifted_share"]) == (False, [], 0.0)


def test_unseen_rows_are_not_flagged(unseen_subsets: list[BatchStatus]) -> None:
    assert len(unseen_subsets) == UNSEEN_SUBSETS
    for status in unseen_subsets:
        drift = status.metrics["drift"]  # type: ignore[index]
        assert all(entry["rows"] == UNSEEN_ROWS for entry in drift["models"].values())
        assert _significant(drift) == [] and drift["drifted"] is False


def test_two_shifted_features_are_flagged_exactly(shifted: BatchStatus) -> None:
    drift = shifted.metrics["drift"]  # type: ignore[index]
    assert drift["drifted"] is True
    assert sorted(drift["drifted_features"]) == sorted(SHIFTED)
    assert drift["drifted_share"] == pytest.approx(2 / len(FEATURES), abs=1e-6)
    for name, entry in drift["features"].items():
        assert (entry["psi"] >= 0.2) == (name in SHIFTED) == (entry["band"] == "major"), (name, entry)
        assert entry["significant"] == (name in SHIFTED), (name, entry)


def test_half_a_standard_deviation_on_3_of_30_features_is_flagged(half_sd_shift: BatchStatus) -> None:
    drift = half_sd_shift.metrics["drift"]  # type: ignore[index]
    assert drift["drifted"] is True
    assert set(HALF_SD_SHIFTED) <= set(drift["drifted_features"])
    # Each held-out row counts three times, so their own noise may flag a few other
    # features too; the shifted ones carry by far the strongest evidence.
    tests = {name: entry["p_value"] for name, entry in drift["features"].items()}
    tests |= {f"score of {name}": entry["score_p_value"] for name, entry in drift["models"].items()}
    assert set(sorted(tests, key=tests.__getitem__)[:3]) == set(HALF_SD_SHIFTED)


def test_small_batch_is_not_flagged_by_noise(small: Finished) -> None:
    drift = small[2].metrics["drift"]  # type: ignore[index]
    assert all(entry["rows"] == 20 for entry in drift["models"].values())
    # PSIs of 20 rows are mostly sampling noise: large effects (fixed bands would flag them), no evidence.
    assert [entry["band"] for entry in drift["features"].values()].count("major") > len(FEATURES) / 2
    assert _significant(drift) == []
    assert (drift["drifted"], drift["drifted_features"], drift["drifted_share"]) == (False, [], 0.0)


def test_far_out_of_range_value_is_a_warning_not_a_rejection(small: Finished) -> None:
    inputs, batch, status = small
    results = list(batch.results())
    assert all(r.output is not None for r in results)
    assert [r.item for r in results if r.output["warnings"]] == [3]  # type: ignore[index]
    [warning] = results[3].output["warnings"]  # type: ignore[index]
    assert warning.startswith("mean area = 50000 is far outside the training range")
    assert results[3].output["needs_review"] is True  # type: ignore[index]
    kpis = status.metrics["kpis"]  # type: ignore[index]
    # Without labels, only the label-free KPIs have values.
    assert kpis["labelled_items"] == 0 and kpis["recall_malignant"] is None and kpis["false_positive_rate"] is None
    assert kpis["input_warning_rate"] == pytest.approx(1 / 20)
    assert kpis["review_rate"] is not None and kpis["disagreement_rate"] is not None


def _spread_ordered(spread: dict[str, float]) -> bool:
    values = [spread[key] for key in SPREAD_KEYS]
    return values == sorted(values)


def test_latency_figures_match_the_ledger_timestamps(held_out: Finished, engine: Engine) -> None:
    _, batch, status = held_out
    metrics = status.metrics
    assert metrics is not None
    with engine.connect() as conn:
        timings = conn.execute(
            text(
                "SELECT model, rows, extract(epoch FROM started_at - queued_at)::float8,"
                " extract(epoch FROM finished_at - started_at)::float8 FROM subtasks WHERE batch_id = :b"
            ),
            {"b": batch.id},
        ).all()
    for model in MODELS:
        mine = [t for t in timings if t[0] == model]
        entry = metrics["models"][model]
        assert entry["subtasks"] == len(mine) > 1
        assert entry["rows"] == sum(t[1] for t in mine) == len(held_out[0])
        for key, column in (("queue_wait_s", 2), ("compute_s", 3)):
            spread = entry[key]
            assert _spread_ordered(spread), spread
            seconds = np.array([t[column] for t in mine])
            expected = [*np.percentile(seconds, [50, 95, 99]), seconds.max()]
            assert [spread[k] for k in SPREAD_KEYS] == pytest.approx(expected, abs=2e-6)
    latency = metrics["latency"]
    assert latency["subtasks"]["subtasks"] == len(timings)
    assert _spread_ordered(latency["subtasks"]["compute_s"]) and _spread_ordered(latency["subtasks"]["queue_wait_s"])
    assert latency["end_to_end_s"] >= latency["subtasks"]["compute_s"]["max"]
    assert latency["end_to_end_s"] >= latency["split_wait_s"] + latency["aggregation_s"]
    # Measured before the batch row was finished, so within the batch_status view's elapsed time.
    assert latency["end_to_end_s"] <= status.elapsed_s


def test_model_latency_view(held_out: Finished, engine: Engine) -> None:
    with engine.connect() as conn:
        rows = {
            row["model"]: row
            for row in conn.execute(text("SELECT * FROM model_latency WHERE model LIKE 'screen-%'")).mappings()
        }
    assert set(rows) == set(MODELS)
    for row in rows.values():
        assert row["batches"] >= 1 and row["rows"] >= len(held_out[0])
        for kind in ("wait", "compute"):
            values = [row[f"{kind}_{key}_s"] for key in SPREAD_KEYS]
            assert values == sorted(values)
        assert row["rows_per_compute_s"] > 0


def _exact(output: dict[str, Any] | None) -> tuple[Any, ...]:
    assert output is not None
    return output["decision"], output["disagreement"], output["needs_review"], output["warnings"]


def test_batch_metrics_view(held_out: Finished, shifted: BatchStatus, engine: Engine) -> None:
    with engine.connect() as conn:
        rows = {
            row["id"]: row
            for row in conn.execute(
                text("SELECT * FROM batch_metrics WHERE id IN (:a, :b)"), {"a": held_out[1].id, "b": shifted.id}
            ).mappings()
        }
    reference, moved = rows[held_out[2].id], rows[shifted.id]
    assert reference["kpis"] == held_out[2].metrics["kpis"]  # type: ignore[index]
    assert reference["end_to_end_s"] == held_out[2].metrics["latency"]["end_to_end_s"]  # type: ignore[index]
    assert reference["compute_p95_s"] <= reference["end_to_end_s"]
    assert (reference["drifted"], reference["drifted_features"], reference["drifted_share"]) == (False, [], 0.0)
    assert moved["drifted"] is True and sorted(moved["drifted_features"]) == sorted(SHIFTED)


def test_array_and_dataframe_inputs_match_item_inputs(client: Client, held_out: Finished) -> None:
    inputs, batch, _ = held_out
    expected = [r.output for r in batch.results()][:40]
    X = np.array([[record["features"][name] for name in FEATURES] for record in inputs[:40]])
    from_array = _run(client, X)[0]
    frame = pd.DataFrame(X[:, ::-1], columns=FEATURES[::-1]).assign(label=[r["label"] for r in inputs[:40]])
    from_frame, frame_status = _run(client, frame)
    for handle in (from_array, from_frame):
        outputs = [r.output for r in handle.results()]
        assert [_exact(out) for out in outputs] == [_exact(out) for out in expected]
        for out, want in zip(outputs, expected):
            assert out["malignant_probability"] == pytest.approx(want["malignant_probability"], abs=2e-6)  # type: ignore[index]
    assert frame_status.metrics["kpis"]["labelled_items"] == 40  # type: ignore[index]


def test_bad_tables_are_refused_before_anything_is_stored(client: Client, engine: Engine) -> None:
    X = np.array([[record["features"][name] for name in FEATURES] for record in held_out_records()[:5]])
    with engine.connect() as conn:
        before = conn.execute(text("SELECT count(*) FROM batches")).scalar_one()
    X[2, 4] = np.nan
    with pytest.raises(InvalidInputError) as nan:
        client.submit("screening", X)
    assert [index for index, _ in nan.value.problems] == [2]
    assert "mean smoothness" in nan.value.problems[0][1]
    with pytest.raises(InvalidInputError, match=r"shape \(5, 29\)"):
        client.submit("screening", X[:, 1:])
    with pytest.raises(InvalidInputError, match="lacks the feature columns .'mean radius'."):
        client.submit("screening", pd.DataFrame(X[:, 1:], columns=FEATURES[1:]))
    with pytest.raises(InvalidInputError, match="takes a list of items, not an array"):
        client.submit("digits", np.zeros((2, 64)))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM batches")).scalar_one() == before


def test_result_json_from_the_template_is_the_result_as_json() -> None:
    """The vectorised results are filled into a text template: each must parse to the result it says."""
    screened = Screened(
        answered=np.array([True, False, True]),
        probability=np.array([0.5, np.nan, 0.123457]),
        votes=np.array([[0.25, np.nan, 0.1], [0.75, np.nan, 0.2], [0.5, np.nan, 0.070371]]),
        malignant=np.array([True, False, False]),
        disagreement=np.array([True, False, False]),
        needs_review=np.array([True, False, False]),
        warnings={2: ['mean radius = 99 is far outside the training range [6.98, 28.1] "quoted" \\ é']},
    )
    first, missing, last = screened.results_json()
    assert missing is None
    assert json.loads(first) == {
        "malignant_probability": 0.5,
        "decision": "malignant",
        "votes": dict(zip(MODELS, [0.25, 0.75, 0.5])),
        "disagreement": True,
        "needs_review": True,
        "warnings": [],
    }
    assert json.loads(last) == {
        "malignant_probability": 0.123457,
        "decision": "benign",
        "votes": dict(zip(MODELS, [0.1, 0.2, 0.070371])),
        "disagreement": False,
        "needs_review": False,
        "warnings": ['mean radius = 99 is far outside the training range [6.98, 28.1] "quoted" \\ é'],
    }


def test_a_missing_label_in_a_dataframe_is_none_whatever_pandas_holds_it_as() -> None:
    """NaN in a float column and pandas' NA in a nullable integer column both mean "no label"."""
    from pipeline.inputs import encode_inputs
    from pipeline.registry import get_pipeline

    X = load_breast_cancer().data[:3]
    for labels in (pd.array([0, pd.NA, 1], dtype="Int64"), [0.0, np.nan, 1.0]):
        frame = pd.DataFrame(X, columns=FEATURES).assign(label=labels)
        (page,) = encode_inputs(get_pipeline("screening"), frame, 10, 10_000)
        assert page.data == [{"label": 0}, {}, {"label": 1}]

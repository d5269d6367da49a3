"""Monitoring over time (docs/monitoring.md, "Windows across batches" and "Alerts"): window
specs, each model version's window judged from its batches' pooled contributions (drift on
the pooled bin counts with the calibrated test, KPIs, realised KPIs from labels, p95
latency), and the alerts that open while a condition holds and clear when it stops."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, Row

from pipeline import ledger, registry
from pipeline.artifacts import drift_reference
from pipeline.definition import Pipeline
from pipeline.errors import UnknownPipelineError
from pipeline.profile import ModelCounts, judge_counts
from pipeline.windows import Window, parse_windows

# Fewest batches in a window before its p95 latency is held to the budget.
MIN_LATENCY_BATCHES = 20
# Features per model version a window's figures keep (by PSI): the Prometheus gauges' bound.
TOP_FEATURES = 10


def _number(value: Any) -> float | None:
    return None if value is None else round(float(value), 6)


def _drift(pipeline: Pipeline, row: Row[Any], models_dir: Path) -> dict[str, Any]:
    """A model version's window drift: its pooled bin counts judged against its reference with
    the calibrated test (`judge_counts`), the top features by PSI; or why it was skipped."""
    spec = next((spec for spec in pipeline.models if spec.name == row.model), None)
    if spec is None:
        return {"skipped": f"model {row.model!r} is no longer in pipeline {pipeline.name!r}"}
    reference = drift_reference(models_dir, spec)
    if isinstance(reference, str):
        return {"skipped": reference}
    manifest, profile = reference
    if manifest.sha256 != row.model_version:
        return {"skipped": f"version {row.model_version[:12]} is not the trained one ({manifest.version})"}
    if row.bin_counts is None:
        return {"skipped": "no bin counts"}
    counts = np.frombuffer(row.bin_counts, dtype="<i8").reshape(-1, len(profile.layout.shares)).sum(axis=0)
    figures = judge_counts(pipeline.drift, [ModelCounts(row.model, int(row.rows), manifest.version, profile, counts)])
    top = sorted(figures["features"].items(), key=lambda entry: -entry[1]["psi"])[:TOP_FEATURES]
    score = figures["models"][row.model]
    return {
        "rows": int(row.rows),
        "drifted": bool(figures["drifted_features"] or figures["drifted_scores"]),
        "drifted_features": figures["drifted_features"],
        "score": {key.removeprefix("score_"): value for key, value in score.items() if key.startswith("score_")},
        "top_features": dict(top),
    }


def version_figures(pipeline: Pipeline, row: Row[Any], models_dir: Path) -> dict[str, Any]:
    """One model version's window (a row of `ledger.window_versions`) as JSON-able figures."""
    label_counts = row.label_counts or {}
    realised = pipeline.realised_kpis(label_counts) if label_counts and pipeline.label_type is not None else {}
    return {
        "pipeline": row.pipeline,
        "model": row.model,
        "model_version": row.model_version,
        "batches": int(row.batches),
        "items": int(row.items),
        "rows": int(row.rows),
        "first_finished": row.first_finished.isoformat(),
        "last_finished": row.last_finished.isoformat(),
        "drift": _drift(pipeline, row, models_dir),
        "kpis": {name: _number(value) for name, value in (row.kpis or {}).items()},
        "labelled_items": int(label_counts.get("labelled", 0)),
        "realised_kpis": {name: _number(value) for name, value in realised.items()},
        "latency_p95_s": _number(row.latency_p95_s),
    }


def judge_window(
    conn: Connection, pipeline_name: str | None, window: Window, now: datetime, models_dir: Path
) -> list[dict[str, Any]]:
    """Every model version's figures in `window` at `now`, of one pipeline or all.

    Raises:
        UnknownPipelineError: `pipeline_name` is not registered.
    """
    if pipeline_name is not None:
        registry.get_pipeline(pipeline_name)
    since, until = window.bounds(now)
    rows = ledger.window_versions(conn, pipeline_name, since, until, window.last_rows)
    figures = []
    for row in rows:
        try:
            pipeline = registry.get_pipeline(row.pipeline)
        except UnknownPipelineError:
            continue  # contributions of a pipeline this process does not know: nothing to judge them by
        figures.append(version_figures(pipeline, row, models_dir))
    return figures


def conditions(pipeline: Pipeline, window: Window, versions: list[dict[str, Any]]) -> list[ledger.Condition]:
    """The alert conditions that hold on a pipeline's judged window: drift per model version;
    realised KPIs below their floor and p95 latency over budget on the batches of its first
    model's versions (each batch counts once)."""
    holding = []
    config = pipeline.monitoring
    for version in versions:
        scope = (version["model"], version["model_version"], window.spec)
        drift = version["drift"]
        if drift.get("drifted"):
            evidence = {key: drift[key] for key in ("rows", "drifted_features", "score")}
            holding.append(ledger.Condition("drift", *scope, evidence))
        if version["model"] != pipeline.models[0].name:
            continue
        below = {
            name: {"value": value, "floor": config.kpi_floors[name]}
            for name, value in version["realised_kpis"].items()
            if name in config.kpi_floors and value is not None and value < config.kpi_floors[name]
        }
        if below and version["labelled_items"] >= config.min_labelled:
            evidence = {"labelled_items": version["labelled_items"], "below": below}
            holding.append(ledger.Condition("realised_kpi", *scope, evidence))
        p95 = version["latency_p95_s"]
        if p95 is not None and version["batches"] >= MIN_LATENCY_BATCHES and p95 > config.latency_p95_budget_s:
            evidence = {"latency_p95_s": p95, "budget_s": config.latency_p95_budget_s, "batches": version["batches"]}
            holding.append(ledger.Condition("latency", *scope, evidence))
    return holding


def evaluate_alerts(
    conn: Connection, pipeline: Pipeline, windows: list[Window], now: datetime, models_dir: Path
) -> tuple[int, int]:
    """Judge the pipeline's `windows` at `now`, open an alert per condition that holds and has
    no open episode, clear those that stopped; return (opened, cleared)."""
    holding: list[ledger.Condition] = []
    figures: dict[str, list[dict[str, Any]]] = {}
    for window in windows:
        versions = judge_window(conn, pipeline.name, window, now, models_dir)
        figures[window.spec] = [_headline(version) for version in versions]
        holding += conditions(pipeline, window, versions)
    return ledger.record_alerts(conn, pipeline.name, [w.spec for w in windows], holding, figures)


def _headline(version: dict[str, Any]) -> dict[str, Any]:
    """The figures of a version's window the Prometheus gauges show."""
    drift = version["drift"]
    return {
        "model": version["model"],
        "model_version": version["model_version"],
        "rows": version["rows"],
        "drifted": drift.get("drifted"),
        "feature_psi": {name: entry["psi"] for name, entry in drift.get("top_features", {}).items()},
        "realised_kpis": version["realised_kpis"],
        "latency_p95_s": version["latency_p95_s"],
    }


def evaluate_if_due(engine: Engine, pipeline_name: str, windows: str, interval_s: float, models_dir: Path) -> None:
    """After a batch of `pipeline_name` finished: judge its windows and update its alerts,
    unless another process did in the last `interval_s` seconds (the windows then change by
    a few batches at most; one transaction)."""
    from datetime import UTC

    pipeline = registry.get_pipeline(pipeline_name)
    with engine.begin() as conn:
        if ledger.claim_evaluation(conn, pipeline_name, interval_s):
            evaluate_alerts(conn, pipeline, parse_windows(windows), datetime.now(UTC), models_dir)

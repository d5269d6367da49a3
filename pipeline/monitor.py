"""Monitoring over time (docs/monitoring.md, "Windows across batches" and "Alerts"): window
specs, each model version's window judged from its batches' pooled contributions (drift on
the pooled bin counts with the calibrated test, KPIs, realised KPIs from labels, p95
latency), and the alerts that open while a condition holds and clear when it stops."""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from pipeline import ledger, model_registry, registry
from pipeline.artifacts import Manifest, reference_of
from pipeline.definition import Pipeline
from pipeline.estimation import calibration_of, estimated_as
from pipeline.ledger.connection import Bind, transaction
from pipeline.profile import ModelCounts, judge_counts
from pipeline.windows import Window, parse_windows

# Fewest batches in a window before its p95 latency is held to the budget.
MIN_LATENCY_BATCHES = 20
# Features per model version a window's figures keep (by PSI): the Prometheus gauges' bound.
TOP_FEATURES = 10
# The latency histogram's buckets (SQL `monitor_latency_bucket`, migration 0009): bucket k
# holds (FLOOR * GROWTH^(k-1), FLOOR * GROWTH^k] seconds.
LATENCY_FLOOR_S = 0.001
LATENCY_GROWTH = 1.02


def _number(value: Any) -> float | None:
    return None if value is None else round(float(value), 6)


def latency_p95(histogram: dict[str, float]) -> float | None:
    """The p95 of the batches in a latency histogram (batches per `monitor_latency_bucket`):
    the upper edge of the bucket holding the nearest-rank 95th percentile, so at most 2 %
    above the exact one; None without batches."""
    total = sum(histogram.values())
    if not total:
        return None
    rank, seen = math.ceil(0.95 * total), 0.0
    for bucket in sorted(histogram, key=int):
        seen += histogram[bucket]
        if seen >= rank:
            break
    return LATENCY_FLOOR_S * LATENCY_GROWTH ** int(bucket)


def _drift(
    pipeline: Pipeline, pooled: ledger.PooledVersion, manifest: Manifest | None, top: int | None
) -> dict[str, Any]:
    """A model version's window drift: its pooled bin counts judged against the reference
    profile of that version (`manifest`, from the registry) with the calibrated test
    (`judge_counts`), the `top` features by PSI (None: all); or why it was skipped."""
    spec = next((spec for spec in pipeline.models if spec.name == pooled.model), None)
    if spec is None:
        return {"skipped": f"model {pooled.model!r} is no longer in pipeline {pipeline.name!r}"}
    if manifest is None:
        return {"skipped": f"version {pooled.model_version[:12]} is not in the registry"}
    profile = reference_of(spec, manifest)
    if isinstance(profile, str):
        return {"skipped": profile}
    counts = pooled.bin_counts(len(profile.layout.shares))
    if counts is None:
        return {"skipped": "no bin counts"}
    figures = judge_counts(
        pipeline.drift, [ModelCounts(pooled.model, pooled.rows, pooled.model_version, profile, counts)]
    )
    ranked = sorted(figures["features"].items(), key=lambda entry: -entry[1]["psi"])[:top]
    score = figures["models"][pooled.model]
    return {
        "rows": pooled.rows,
        "drifted": bool(figures["drifted_features"] or figures["drifted_scores"]),
        "drifted_features": figures["drifted_features"],
        "score": {key.removeprefix("score_"): value for key, value in score.items() if key.startswith("score_")},
        "top_features": dict(ranked),
    }


def _estimated(pipeline: Pipeline, pooled: ledger.PooledVersion, manifest: Manifest | None) -> dict[str, Any]:
    """A version's window CBPE: its pooled `estimate_sums` under the realised KPIs' names, each
    with its 95 % band (by the calibration rows of the version's manifest); empty for a model
    the pipeline does not estimate or a window without sums."""
    estimation, sums = pipeline.estimation, pooled.sums.get("estimate_sums")
    calibration = calibration_of(manifest)
    if estimation is None or estimation.model != pooled.model or not sums or calibration is None:
        return {}
    estimated = estimated_as(estimation.kpis, {key: float(value) for key, value in sums.items()}, calibration["rows"])
    return {name: {key: _number(value) for key, value in band.items()} for name, band in estimated.items()}


def version_figures(
    pipeline: Pipeline, pooled: ledger.PooledVersion, manifest: Manifest | None, top: int | None = TOP_FEATURES
) -> dict[str, Any]:
    """One model version's pooled window as JSON-able figures (`manifest`: the version's, from
    the registry; None when it is not registered; `top`: features kept by PSI, None: all)."""
    label_counts = {key: int(value) for key, value in pooled.sums.get("label_counts", {}).items()}
    realised = pipeline.realised_kpis(label_counts) if label_counts and pipeline.label_type is not None else {}
    kpi_sums, kpi_items = pooled.sums.get("kpi_sums", {}), pooled.sums.get("kpi_items", {})
    return {
        "pipeline": pooled.pipeline,
        "model": pooled.model,
        "model_version": pooled.model_version,
        "batches": pooled.batches,
        "items": pooled.items,
        "rows": pooled.rows,
        "first_finished": pooled.first_finished.isoformat(),
        "last_finished": pooled.last_finished.isoformat(),
        "drift": _drift(pipeline, pooled, manifest, top),
        "kpis": {name: _number(total / kpi_items[name]) for name, total in kpi_sums.items() if kpi_items.get(name)},
        "labelled_items": label_counts.get("labelled", 0),
        "realised_kpis": {name: _number(value) for name, value in realised.items()},
        "estimated_kpis": _estimated(pipeline, pooled, manifest),
        "latency_p95_s": _number(latency_p95(pooled.sums.get("latency_histogram", {}))),
    }


def _pipelines(pipeline_name: str | None) -> dict[str, Pipeline]:
    """`pipeline_name`'s pipeline, or every registered one (contributions of others have
    nothing to judge them by).

    Raises:
        UnknownPipelineError: `pipeline_name` is not registered.
    """
    if pipeline_name is not None:
        return {pipeline_name: registry.get_pipeline(pipeline_name)}
    return {pipeline.name: pipeline for pipeline in registry.all_pipelines()}


def _judged(
    conn: Connection, pipelines: dict[str, Pipeline], windows: list[list[ledger.PooledVersion]], top: int | None
) -> list[list[dict[str, Any]]]:
    """Each window's pooled versions as figures, the manifests read once for all."""
    keys = {(version.model, version.model_version) for pooled in windows for version in pooled}
    manifests = model_registry.registered_manifests(conn, keys)
    return [
        [version_figures(pipelines[v.pipeline], v, manifests.get((v.model, v.model_version)), top) for v in pooled]
        for pooled in windows
    ]


def judge_window(conn: Connection, pipeline_name: str | None, window: Window, now: datetime) -> list[dict[str, Any]]:
    """Every model version's figures in `window` at `now`, of one pipeline or of every
    registered one.

    Raises:
        UnknownPipelineError: `pipeline_name` is not registered.
    """
    pipelines = _pipelines(pipeline_name)
    since, until = window.bounds(now)
    pooled = ledger.window_versions(conn, list(pipelines), since, until, window.last_rows)
    return _judged(conn, pipelines, [pooled], TOP_FEATURES)[0]


def judge_series(
    conn: Connection, pipeline_name: str | None, span: timedelta, every: timedelta, now: datetime
) -> list[tuple[datetime, datetime, list[dict[str, Any]]]]:
    """Consecutive windows of `every` over the last `span` at `now`, oldest first: each
    window's (since, until] and its model versions' figures, as `judge_window` gives them
    for a window of `every` ending at `until`, but with every feature's PSI (`top_features`
    holds them all). One window query for the whole series.

    Raises:
        UnknownPipelineError: `pipeline_name` is not registered.
    """
    pipelines = _pipelines(pipeline_name)
    count = math.ceil(span / every)
    bounds = [(now - (count - i) * every, now - (count - i - 1) * every) for i in range(count)]
    pooled = ledger.window_series(conn, list(pipelines), bounds)
    return [(since, until, figures) for (since, until), figures in zip(bounds, _judged(conn, pipelines, pooled, None))]


def conditions(pipeline: Pipeline, window: Window, versions: list[dict[str, Any]]) -> list[ledger.Condition]:
    """The alert conditions that hold on a pipeline's judged window: drift per model version;
    an estimated KPI whose band lies wholly below its floor on the estimated model's
    versions; realised KPIs below their floor and p95 latency over budget on the batches of
    its first model's versions (each batch counts once)."""
    holding = []
    config = pipeline.monitoring
    for version in versions:
        scope = (version["model"], version["model_version"], window.spec)
        drift = version["drift"]
        if drift.get("drifted"):
            evidence = {key: drift[key] for key in ("rows", "drifted_features", "score")}
            holding.append(ledger.Condition("drift", *scope, evidence))
        estimated_below = {
            name: {**band, "floor": config.kpi_floors[name]}
            for name, band in version["estimated_kpis"].items()
            if name in config.kpi_floors and band["high"] < config.kpi_floors[name]
        }
        if estimated_below:
            evidence = {"rows": version["rows"], "below": estimated_below}
            holding.append(ledger.Condition("estimated_performance", *scope, evidence))
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


def evaluate_alerts(conn: Connection, pipeline: Pipeline, windows: list[Window], now: datetime) -> tuple[int, int]:
    """Judge the pipeline's `windows` at `now`, open an alert per condition that holds and has
    no open episode, clear those that stopped; return (opened, cleared)."""
    holding: list[ledger.Condition] = []
    figures: dict[str, list[dict[str, Any]]] = {}
    for window in windows:
        versions = judge_window(conn, pipeline.name, window, now)
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
        "estimated_kpis": version["estimated_kpis"],
        "latency_p95_s": version["latency_p95_s"],
    }


# When this process last tried to claim each pipeline's evaluation (time.monotonic): it
# tries again only `interval_s` later, so most finished batches cost no statement here.
_LAST_CLAIM: dict[str, float] = {}


def evaluate_if_due(bind: Bind, pipeline_name: str, windows: str, interval_s: float) -> None:
    """After a batch of `pipeline_name` finished: fold the pipeline's new contributions into
    their rollups, judge its windows and update its alerts, unless this process tried or
    another process did in the last `interval_s` seconds (the windows then change by a few
    batches at most; one transaction, on a connection of Engine `bind` or on autocommit
    Connection `bind`)."""
    from datetime import UTC

    now = time.monotonic()
    if now - _LAST_CLAIM.get(pipeline_name, -math.inf) < interval_s:
        return
    _LAST_CLAIM[pipeline_name] = now
    pipeline = registry.get_pipeline(pipeline_name)
    with transaction(bind) as conn:
        if ledger.claim_evaluation(conn, pipeline_name, interval_s):
            ledger.fold_contributions(conn, pipeline_name)
            evaluate_alerts(conn, pipeline, parse_windows(windows), datetime.now(UTC))

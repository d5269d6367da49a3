"""A batch's metrics for people: the rows the terminal and the HTML report share, and the
terminal tables (`pipeline status`, `pipeline report`, `pipeline monitor`). The HTML report
with plots is `pipeline.html_report`."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from pipeline.errors import UnknownPipelineError
from pipeline.status import BatchStatus

if TYPE_CHECKING:
    pass

SHOWN_FEATURES = 10
STATUS_FIELDS = (
    "id",
    "pipeline",
    "state",
    "items",
    "total",
    "succeeded",
    "failed",
    "cancelled",
    "progress",
    "created_at",
    "started_at",
    "finished_at",
    "wait_s",
    "aggregation_s",
    "elapsed_s",
    "error",
)
STATE_STYLES = {"succeeded": "green", "partial": "yellow", "failed": "red", "cancelled": "dim"}


def fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def fmt_p(value: float | None) -> str:
    """A p-value: three decimals, or two significant digits below 0.001."""
    if value is None:
        return "-"
    return f"{value:.1e}" if value < 0.001 else f"{value:.3f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


@lru_cache(maxsize=32)
def _key_order(pipeline_name: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The pipeline's own order of its (KPIs, models, features); empty when it is not registered here."""
    from pipeline import registry  # the pipelines' modules: only for a report that shows metrics

    try:
        pipeline = registry.get_pipeline(pipeline_name)
    except UnknownPipelineError:
        return (), (), ()
    models = tuple(spec.name for spec in pipeline.models)
    features = tuple(dict.fromkeys(name for spec in pipeline.models for name in spec.columns))
    return tuple(pipeline.kpis().summary()), models, features


def _ordered(mapping: dict[str, Any], order: tuple[str, ...]) -> dict[str, Any]:
    rank = {key: index for index, key in enumerate(order)}
    return dict(sorted(mapping.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def _metrics(status: BatchStatus) -> dict[str, Any]:
    """The batch's metrics with KPIs, models and features in the pipeline's order
    (PostgreSQL's jsonb keeps no key order), the unknown ones after, by name."""
    metrics = dict(status.metrics or {})
    kpis, models, features = _key_order(status.pipeline)
    metrics["kpis"] = _ordered(metrics.get("kpis") or {}, kpis)
    metrics["models"] = _ordered(metrics.get("models") or {}, models)
    if metrics.get("drift"):
        drift = metrics["drift"] = dict(metrics["drift"])
        drift["models"] = _ordered(drift.get("models") or {}, models)
        drift["features"] = _ordered(drift.get("features") or {}, features)
    return metrics


# --- rows shared by the terminal and the HTML ------------------------------------------------

LATENCY_HEADER = (
    "model",
    "sub-tasks",
    "rows",
    "queue wait ms p50 / p95 / p99 / max",
    "compute ms p50 / p95 / p99 / max",
    "rows per compute s",
    "rows/s",
)


def _spread(spread: dict[str, float | None]) -> str:
    return " / ".join(_ms(spread[key]) for key in ("p50", "p95", "p99", "max"))


def _latency_row(name: str, entry: dict[str, Any]) -> list[str]:
    return [
        name,
        str(entry["subtasks"]),
        str(entry["rows"]),
        _spread(entry["queue_wait_s"]),
        _spread(entry["compute_s"]),
        _rate(entry["rows_per_compute_s"]),
        _rate(entry["rows_per_s"]),
    ]


def latency_rows(status: BatchStatus) -> list[list[str]]:
    """One row per model, then one for all sub-tasks together."""
    metrics = _metrics(status)
    rows = [_latency_row(name, entry) for name, entry in (metrics.get("models") or {}).items()]
    total = (metrics.get("latency") or {}).get("subtasks")
    if total:
        rows.append(_latency_row("all", total))
    return rows


def batch_latency_rows(status: BatchStatus) -> list[tuple[str, str]]:
    latency = _metrics(status).get("latency") or {}
    return [
        ("split wait s (submitted → split)", fmt(latency.get("split_wait_s"))),
        ("aggregation s (last sub-task → results)", fmt(latency.get("aggregation_s"))),
        ("end-to-end s (submitted → finished)", fmt(latency.get("end_to_end_s"))),
        ("inputs per end-to-end second", _rate(latency.get("items_per_s"))),
    ]


DRIFT_MODEL_HEADER = ("model", "rows", "score PSI", "band", "p-value", "significant", "drifted", "reference")
DRIFT_FEATURE_HEADER = ("feature", "PSI", "band", "p-value", "significant", "drifted")


def drift_model_rows(status: BatchStatus) -> list[list[str]]:
    """Per model: rows, its score's PSI and band (the effect), p-value and whether it is
    significant at this n (the evidence), drifted, and its reference's version."""
    models = (_metrics(status).get("drift") or {}).get("models") or {}
    return [
        [name, "-", "-", "-", "-", "-", "-", entry["skipped"]]
        if "skipped" in entry
        else [
            name,
            str(entry["rows"]),
            fmt(entry["score_psi"]),
            entry["score_band"],
            fmt_p(entry.get("score_p_value")),
            fmt(entry.get("score_significant")),
            fmt(entry.get("score_drifted")),
            entry["reference_version"],
        ]
        for name, entry in models.items()
    ]


def drift_feature_rows(status: BatchStatus, limit: int | None = None) -> list[list[str]]:
    """The features, drifted ones first, then the significant ones, then by PSI; the first
    `limit` of them (all when None)."""
    features = (_metrics(status).get("drift") or {}).get("features") or {}
    ranked = sorted(
        features.items(), key=lambda kv: (not kv[1].get("drifted"), not kv[1].get("significant"), -kv[1]["psi"])
    )
    return [
        [name, fmt(e["psi"]), e["band"], fmt_p(e.get("p_value")), fmt(e.get("significant")), fmt(e.get("drifted"))]
        for name, e in ranked[:limit]
    ]


def drift_summary(status: BatchStatus) -> str:
    drift = _metrics(status).get("drift")
    if not drift:
        return "no drift figures"
    if drift["drifted_share"] is None:
        return "not judged: no model with a reference profile scored this batch"
    verdict = "DRIFT" if drift["drifted"] else "no drift"
    flagged = ", ".join(drift["drifted_features"] + [f"score of {m}" for m in drift["drifted_scores"]]) or "nothing"
    rule = (
        f" (significant at a false-alarm rate of {drift['false_alarm_rate']:g} and PSI >= {drift['min_psi']:g})"
        if "false_alarm_rate" in drift
        else ""
    )
    return (
        f"{verdict}: {len(drift['drifted_features'])} of {len(drift['features'])} features"
        f" ({drift['drifted_share']:.0%}) drifted{rule}; flagged: {flagged}"
    )


# --- terminal ---------------------------------------------------------------------------------


def status_table(status: BatchStatus) -> Table:
    """The batch's `batch_status` row as a two-column table."""
    table = Table(title="batch_status", show_header=False)
    for field in STATUS_FIELDS:
        table.add_row(field, fmt(getattr(status, field)))
    return table


def batches_table(rows: list[BatchStatus]) -> Table:
    """One line per batch (`pipeline status` without an id), its state coloured; the id
    is never cut, so it can be copied from a narrow terminal."""
    table = Table(title="newest batches", box=box.SIMPLE_HEAD)
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("pipeline")
    table.add_column("state")
    for column in ("items", "done", "failed"):
        table.add_column(column, justify="right")
    table.add_column("created")
    table.add_column("elapsed s", justify="right")
    for row in rows:
        table.add_row(
            str(row.id),
            row.pipeline,
            f"[{STATE_STYLES.get(row.state.value, 'default')}]{row.state.value}[/]",
            str(row.items),
            f"{row.progress:.0%}",
            str(row.failed),
            f"{row.created_at:%m-%d %H:%M:%S}",
            fmt(row.elapsed_s),
        )
    return table


def band_text(band: dict[str, float]) -> str:
    """A CBPE estimate with its 95 % band: `0.987 [0.975, 0.995]`."""
    return f"{fmt(band['value'])} [{fmt(band['low'])}, {fmt(band['high'])}]"


def estimate_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """A batch's estimated KPIs (CBPE) each beside its realised value once labels are stored
    (`-` before), or why none was estimated."""
    if metrics.get("estimation_skipped"):
        return [("estimated", f"none: {metrics['estimation_skipped']}")]
    realised = (metrics.get("realised") or {}).get("kpis") or {}
    return [
        (f"{name} estimated / realised", f"{band_text(band)} / {fmt(realised.get(name, '-'))}")
        for name, band in (metrics.get("estimated") or {}).items()
    ]


def kpi_table(status: BatchStatus) -> Table:
    table = Table(title=f"{status.pipeline} KPIs", show_header=False)
    metrics = _metrics(status)
    for name, value in (metrics.get("kpis") or {}).items():
        table.add_row(name, fmt(value))
    for name, value in estimate_rows(metrics):
        table.add_row(name, value)
    return table


def latency_table(status: BatchStatus) -> Table:
    title = "latency per model (queue wait = queued → started, compute = started → finished)"
    table = Table(*LATENCY_HEADER, title=title)
    for row in latency_rows(status):
        table.add_row(*row)
    return table


def batch_latency_table(status: BatchStatus) -> Table:
    table = Table(title="batch latency", show_header=False)
    for name, value in batch_latency_rows(status):
        table.add_row(name, value)
    return table


def drift_table(status: BatchStatus) -> Table:
    """Per model its output score's drift figures, then the features' (drifted first)."""
    table = Table("model / feature", *DRIFT_MODEL_HEADER[1:], title=f"drift: {drift_summary(status)}")
    for row in drift_model_rows(status):
        table.add_row(f"score of {row[0]}", *row[1:])
    for name, psi, band, p_value, significant, drifted in drift_feature_rows(status, SHOWN_FEATURES):
        table.add_row(name, "", psi, band, p_value, significant, drifted, "")
    return table


def print_status(console: Console, status: BatchStatus) -> None:
    """The status row and, once the batch has metrics, its latency and KPIs."""
    console.print(status_table(status))
    if status.metrics:
        console.print(batch_latency_table(status))
        console.print(latency_table(status))
        console.print(kpi_table(status))


def print_report(console: Console, status: BatchStatus) -> None:
    """Every metric of a batch as tables."""
    print_status(console, status)
    if status.metrics:
        console.print(drift_table(status))


def _window_drift(drift: dict[str, Any]) -> tuple[str, str]:
    """(verdict, the top feature's PSI, band and significance) of a version's window drift."""
    if "skipped" in drift:
        return "-", str(drift["skipped"])
    verdict = "[red]drifted[/]: " + ", ".join(drift["drifted_features"]) if drift["drifted"] else "no"
    if not drift["top_features"]:
        return verdict, "-"
    name, top = next(iter(drift["top_features"].items()))
    star = "*" if top["significant"] else ""
    return verdict, f"{name} {top['psi']:.3f} {top['band']}{star}"


def monitor_table(window: str, versions: list[dict[str, Any]]) -> Table:
    """One line per model version over a window (`pipeline monitor`): pooled drift, KPIs,
    estimated KPIs (CBPE, with their 95 % band), realised KPIs where labelled, p95 latency."""
    table = Table(title=f"window {window}", box=box.SIMPLE_HEAD)
    for column in ("pipeline", "model", "version", "batches", "rows", "drifted", "top PSI (* significant)"):
        table.add_column(column, justify="right" if column in ("batches", "rows") else "left")
    for column in ("score PSI", "KPIs", "estimated [95 % band]", "realised (labelled)", "p95 s"):
        table.add_column(column)
    for version in versions:
        drift = version["drift"]
        score = drift.get("score")
        realised = ", ".join(f"{name} {fmt(value)}" for name, value in version["realised_kpis"].items())
        estimated = ", ".join(f"{name} {band_text(band)}" for name, band in version["estimated_kpis"].items())
        table.add_row(
            version["pipeline"],
            version["model"],
            version["model_version"][:12],
            str(version["batches"]),
            str(version["rows"]),
            *_window_drift(drift),
            "-" if score is None else f"{score['psi']:.3f} {score['band']}{'*' if score['significant'] else ''}",
            ", ".join(f"{name} {fmt(value)}" for name, value in version["kpis"].items() if name.endswith("rate")),
            estimated or "-",
            f"{realised} ({version['labelled_items']})" if realised else "-",
            fmt(version["latency_p95_s"]),
        )
    return table

"""The monitoring time-series page (`pipeline monitor --html FILE`): per pipeline and model
version, one point per window of a series (`pipeline.monitor.judge_series`) that has
batches, with the PSI of its top features, KPIs, CBPE-estimated accuracy with its band
beside the realised one, and p95 latency; then the open alerts. Self-contained like the
batch report (`pipeline.html_report`), whose plotting and HTML helpers it uses."""

from __future__ import annotations

import html
import json
from datetime import datetime
from typing import Any

from pipeline.errors import InvalidWindowError
from pipeline.html_report import STYLE, _figure, _html_table, _img, _png
from pipeline.report import band_text, fmt
from pipeline.windows import Window, parse_window

# Features per model version whose PSI the page follows: the largest PSIs over the series.
SERIES_FEATURES = 5
# Series longer than this are refused (the page, its plots and the query stay bounded).
MAX_POINTS = 400

Series = list[tuple[datetime, datetime, list[dict[str, Any]]]]
VersionKey = tuple[str, str, str]
# One version's points: (since, until, figures) of each window where it has batches.
Points = list[tuple[datetime, datetime, dict[str, Any]]]


def series_windows(span_spec: str, every_spec: str) -> tuple[Window, Window]:
    """The series' span and the width of its windows, both time windows, at most
    `MAX_POINTS` windows of `every_spec` in `span_spec`.

    Raises:
        InvalidWindowError: either does not parse, is a `<n>rows` window, or they give too
            many windows or none.
    """
    span, every = parse_window(span_spec), parse_window(every_spec)
    for name, window in (("--window", span), ("--every", every)):
        if window.span is None:
            raise InvalidWindowError(f"{name} {window.spec!r}: a time series needs a time window (<n>m, <n>h, <n>d)")
    assert span.span is not None and every.span is not None
    if every.span > span.span:
        raise InvalidWindowError(f"--every {every.spec} is longer than --window {span.spec}")
    if span.span / every.span > MAX_POINTS:
        raise InvalidWindowError(
            f"--window {span.spec} in windows of --every {every.spec} is more than {MAX_POINTS} windows"
        )
    return span, every


def by_version(series: Series) -> dict[VersionKey, Points]:
    """The series split per (pipeline, model, model version), each in window order."""
    versions: dict[VersionKey, Points] = {}
    for since, until, figures in series:
        for version in figures:
            key = (version["pipeline"], version["model"], version["model_version"])
            versions.setdefault(key, []).append((since, until, version))
    return dict(sorted(versions.items()))


def top_features(points: Points, k: int = SERIES_FEATURES) -> list[str]:
    """The `k` features with the largest PSI in any window of the version's series."""
    largest: dict[str, float] = {}
    for _, _, version in points:
        for name, entry in version["drift"].get("top_features", {}).items():
            largest[name] = max(largest.get(name, 0.0), entry["psi"])
    return sorted(largest, key=lambda name: -largest[name])[:k]


def _psi(version: dict[str, Any], feature: str) -> float | None:
    entry = version["drift"].get("top_features", {}).get(feature)
    return None if entry is None else entry["psi"]


def series_plot(points: Points, features: list[str]) -> str | None:
    """The version's series as base64 PNG: PSI of `features`, the KPIs, each CBPE estimate
    (line, 95 % band shaded) with the realised value (dots), and p95 latency; None without
    points."""
    if not points:
        return None
    ends = [until for _, until, _ in points]
    kpis = sorted({name for _, _, version in points for name in version["kpis"]})
    estimated = sorted({name for _, _, version in points for name in version["estimated_kpis"]})
    panels = ["psi"] * bool(features) + [f"kpi:{name}" for name in kpis]
    panels += [f"estimated:{name}" for name in estimated] + ["latency"]
    figure = _figure(10, 2.2 * len(panels))
    axes = figure.subplots(len(panels), 1, squeeze=False, sharex=True)
    for ax, panel in zip((row[0] for row in axes), panels):
        kind, _, name = panel.partition(":")
        if kind == "psi":
            for feature in features:
                ax.plot(ends, [_psi(v, feature) for _, _, v in points], marker=".", label=feature)
            ax.set_ylabel("PSI")
            ax.legend(fontsize=7, loc="upper left")
        elif kind == "kpi":
            ax.plot(ends, [v["kpis"].get(name) for _, _, v in points], marker=".", color="#3b6ea5")
            ax.set_ylabel(name, fontsize=8)
        elif kind == "estimated":
            bands = [v["estimated_kpis"].get(name) for _, _, v in points]
            nan = float("nan")
            ax.fill_between(
                ends,
                [b["low"] if b else nan for b in bands],
                [b["high"] if b else nan for b in bands],
                color="#3b6ea5",
                alpha=0.25,
                label="estimated 95 % band",
            )
            ax.plot(ends, [b["value"] if b else None for b in bands], marker=".", color="#3b6ea5", label="estimated")
            realised = [v["realised_kpis"].get(name) for _, _, v in points]
            ax.plot(ends, realised, "o", color="#c0392b", label="realised")
            ax.set_ylabel(name, fontsize=8)
            ax.legend(fontsize=7, loc="lower left")
        else:
            ax.plot(ends, [v["latency_p95_s"] for _, _, v in points], marker=".", color="#555555")
            ax.set_ylabel("p95 latency s", fontsize=8)
    figure.autofmt_xdate()
    figure.tight_layout()
    return _png(figure)


def series_rows(points: Points, features: list[str]) -> list[list[str]]:
    """One table row per window of the version's series, newest first."""
    rows = []
    for since, until, version in reversed(points):
        drift = version["drift"]
        rows.append(
            [
                f"{since.isoformat(timespec='seconds')} – {until.isoformat(timespec='seconds')}",
                str(version["batches"]),
                str(version["rows"]),
                fmt(drift.get("drifted")),
                *(fmt(_psi(version, feature)) for feature in features),
                ", ".join(f"{name} {fmt(value)}" for name, value in version["kpis"].items()) or "-",
                ", ".join(f"{name} {band_text(band)}" for name, band in version["estimated_kpis"].items()) or "-",
                ", ".join(f"{name} {fmt(value)}" for name, value in version["realised_kpis"].items()) or "-",
                fmt(version["latency_p95_s"]),
            ]
        )
    return rows


def _alert_rows(alerts: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            alert["kind"],
            alert["pipeline"],
            f"{alert['model']}@{alert['model_version'][:12]}",
            alert["window"],
            alert["opened_at"][:19],
            json.dumps(alert["evidence"]),
        ]
        for alert in alerts
    ]


def render_monitor_html(
    pipeline: str | None, span: str, every: str, now: datetime, series: Series, alerts: list[dict[str, Any]]
) -> str:
    """The page: a section per model version with its plot and its table of windows, then
    the open alerts."""
    title = f"Monitoring of {pipeline or 'every pipeline'}: the last {span} in windows of {every}"
    sections = []
    for (name, model, version), points in by_version(series).items():
        features = top_features(points)
        header = ["window (since – until]", "batches", "rows", "drifted", *(f"PSI {f}" for f in features)]
        header += ["KPIs", "estimated [95 % band]", "realised", "p95 latency s"]
        heading = f"{name} / {model} @ {version[:12]}"
        sections.append(
            f'<h2 title="{html.escape(version)}">{html.escape(heading)}</h2>\n'
            f"{_img(series_plot(points, features), f'time series of {heading}')}\n"
            f"{_html_table(header, series_rows(points, features))}"
        )
    body = "\n".join(sections) or f"<p>No batch finished in the last {html.escape(span)}.</p>"
    alert_header = ["kind", "pipeline", "model@version", "window", "opened", "evidence"]
    alert_table = _html_table(alert_header, _alert_rows(alerts)) if alerts else "<p>None.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>at {html.escape(now.isoformat(timespec="seconds"))}; {len(series)} windows, each shown where it has batches.</p>
{body}
<h2 id="alerts">Open alerts</h2>
{alert_table}
</body></html>
"""

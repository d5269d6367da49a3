"""`pipeline monitor` and the open alerts that `status` shows too."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.cli.base import (
    JSON_OPTION,
    _client,
    _console,
    _writing,
    main,
)

if TYPE_CHECKING:
    from pipeline.client import Client


def _alert_dicts(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Open alerts' rows (`ledger.open_alerts`, `listing.open_alerts`) as JSON-ready dicts."""
    return [{**row, "opened_at": row["opened_at"].isoformat()} for row in rows]


def _open_alerts(client: Client, pipeline: str | None) -> list[dict[str, Any]]:
    from pipeline import ledger

    with client.engine.connect() as conn:
        return _alert_dicts(row._asdict() for row in ledger.open_alerts(conn, pipeline))


def _print_open_alerts(alerts: list[dict[str, Any]]) -> None:
    """One line per open alert (none: nothing printed)."""
    for alert in alerts:
        _console().print(
            f"[red]alert[/red] {alert['kind']} {alert['pipeline']} {alert['model']}@{alert['model_version'][:12]}"
            f" window {alert['window']} since {alert['opened_at'][:19]}: {json.dumps(alert['evidence'])}",
            markup=True,
            highlight=False,
        )


@main.command()
@click.argument("pipeline_name", metavar="[PIPELINE]", required=False)
@click.option(
    "--window", "window_spec", help="<n>m, <n>h, <n>d or <n>rows  [default: 1h; with --html, the series' span: 24h]"
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a self-contained HTML page of the time series of windows of --every over --window.",
)
@click.option("--every", "every_spec", help="With --html: each window's width  [default: 1h].")
@JSON_OPTION
def monitor(
    pipeline_name: str | None, window_spec: str | None, html_path: Path | None, every_spec: str | None, as_json: bool
) -> None:
    """Per model version over a window: pooled drift (PSI, band, significant), KPIs, realised
    KPIs where labelled, p95 latency; then the open alerts.

    With --html FILE, also write the time series: one point per --every window of the last
    --window, each judged as `pipeline monitor --window EVERY` would judge it then.
    """
    from datetime import UTC, datetime

    from pipeline.monitor import judge_series, judge_window
    from pipeline.windows import parse_window

    now = datetime.now(UTC)
    if html_path is not None:
        from pipeline.monitor_report import render_monitor_html, series_windows

        span, every = series_windows(window_spec or "24h", every_spec or "1h")
        assert span.span is not None and every.span is not None
        client = _client()
        with client.engine.connect() as conn:
            series = judge_series(conn, pipeline_name, span.span, every.span, now)
        alerts = _open_alerts(client, pipeline_name)
        page = render_monitor_html(pipeline_name, span.spec, every.spec, now, series, alerts)
        with _writing(html_path):
            html_path.write_text(page, encoding="utf-8")
        _console().print(f"{len(series)} windows of {every.spec} written to {html_path}")
        return
    if every_spec is not None:
        raise click.ClickException("--every goes with --html (the time series' windows)")
    window = parse_window(window_spec or "1h")
    client = _client()
    with client.engine.connect() as conn:
        versions = judge_window(conn, pipeline_name, window, now)
    if as_json:
        alerts = _open_alerts(client, pipeline_name)
        click.echo(json.dumps({"window": window.spec, "at": now.isoformat(), "versions": versions, "alerts": alerts}))
        return
    from pipeline.report import monitor_table

    _console().print(monitor_table(window.spec, versions))
    _print_open_alerts(_open_alerts(client, pipeline_name))

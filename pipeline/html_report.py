"""A batch's self-contained HTML report (`pipeline report --html`): its tables and plots
(matplotlib figures rendered without a display, PNGs embedded as base64: no script, no
network)."""

from __future__ import annotations

import base64
import html
import io
import textwrap
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, text

from pipeline.report import (
    DRIFT_FEATURE_HEADER,
    DRIFT_MODEL_HEADER,
    LATENCY_HEADER,
    STATUS_FIELDS,
    _key_order,
    _metrics,
    _ordered,
    batch_latency_rows,
    drift_feature_rows,
    drift_model_rows,
    drift_summary,
    fmt,
    latency_rows,
)
from pipeline.status import BatchStatus

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HISTOGRAM_BINS = 30
# PSI bands (effect sizes); a band of metrics stored before the calibrated verdict is grey.
BAND_COLOURS = {"none": "#4c9a2a", "moderate": "#e69f00", "major": "#c0392b"}
# PSI bars are drawn up to this value; larger ones are cut there and labelled with their value.
PSI_AXIS_CAP = 1.0


# --- plots ------------------------------------------------------------------------------------


def latency_histograms(engine: Engine, batch_id: uuid.UUID, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Per model and kind ("queue wait", "compute"): the upper end of the range in
    seconds and the sub-task count of each of `bins` equal bins from 0, counted in
    PostgreSQL."""
    sql = text(
        """
        WITH timed AS (
            SELECT s.model, v.kind, v.seconds
            FROM subtasks s
            CROSS JOIN LATERAL (VALUES
                ('queue wait', extract(epoch FROM s.started_at - s.queued_at)::float8),
                ('compute', extract(epoch FROM s.finished_at - s.started_at)::float8)
            ) AS v(kind, seconds)
            WHERE s.batch_id = :batch_id AND s.state IN ('succeeded', 'failed')
              AND s.started_at IS NOT NULL AND s.finished_at IS NOT NULL
        ), ranges AS (
            SELECT model, kind, greatest(max(seconds), 1e-6) AS top FROM timed GROUP BY model, kind
        )
        SELECT t.model, t.kind, r.top,
               least(greatest(width_bucket(t.seconds, 0, r.top, :bins), 1), :bins) AS bucket,
               count(*) AS subtasks
        FROM timed t JOIN ranges r USING (model, kind)
        GROUP BY t.model, t.kind, r.top, bucket
        ORDER BY t.model, t.kind, bucket
        """
    )
    histograms: dict[str, Any] = {}
    with engine.connect() as conn:
        for row in conn.execute(sql, {"batch_id": batch_id, "bins": bins}):
            entry = histograms.setdefault(row.model, {}).setdefault(row.kind, {"top": row.top, "counts": [0] * bins})
            entry["counts"][row.bucket - 1] = row.subtasks
    return histograms


def _figure(width: float, height: float) -> Figure:
    """A bare matplotlib Figure of `width` x `height` inches. matplotlib is imported here, when
    a plot is drawn, so the terminal commands (`pipeline status`) do not load it."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    # A bare Figure (no pyplot) renders with the Agg canvas: no display, no global state.
    figure.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def latency_plot(status: BatchStatus, histograms: dict[str, Any]) -> str | None:
    """Histograms of queue wait and compute per model, as base64 PNG (None without sub-tasks)."""
    if not histograms:
        return None
    figure = _figure(10, 2.4 * len(histograms))
    axes = figure.subplots(len(histograms), 2, squeeze=False)
    for row, (model, kinds) in enumerate(_ordered(histograms, _key_order(status.pipeline)[1]).items()):
        for column, kind in enumerate(("queue wait", "compute")):
            ax = axes[row][column]
            entry = kinds.get(kind)
            if entry is not None:
                counts = entry["counts"]
                width = entry["top"] * 1000 / len(counts)
                ax.bar([(i + 0.5) * width for i in range(len(counts))], counts, width=width, color="#3b6ea5")
            ax.set_title(f"{model}: {kind}", fontsize=10)
            ax.set_xlabel("ms")
            ax.set_ylabel("sub-tasks")
    figure.tight_layout()
    return _png(figure)


def drift_plot(status: BatchStatus) -> str | None:
    """PSI per feature and per model output score, coloured by band, with the band
    limits drawn and the significant ones starred; as base64 PNG (None without drift figures)."""
    drift = _metrics(status).get("drift") or {}
    bars = [
        (name, entry["psi"], entry["band"], entry.get("significant"))
        for name, entry in (drift.get("features") or {}).items()
    ]
    bars += [
        (f"score of {model}", entry["score_psi"], entry["score_band"], entry.get("score_significant"))
        for model, entry in (drift.get("models") or {}).items()
        if "skipped" not in entry
    ]
    if not bars:
        return None
    figure = _figure(9, 1 + 0.22 * len(bars))
    ax = figure.subplots()
    positions = range(len(bars))
    values = [min(value, PSI_AXIS_CAP) for _, value, _, _ in bars]
    ax.barh(positions, values, color=[BAND_COLOURS.get(band, "#999999") for _, _, band, _ in bars])
    for position, (_, value, _, _) in zip(positions, bars):
        if value > PSI_AXIS_CAP:
            ax.text(PSI_AXIS_CAP, position, f" {value:.2f}", va="center", fontsize=7)
    bands = drift.get("bands") or {}
    for limit, style in ((bands.get("moderate"), ":"), (bands.get("major"), "--")):
        if limit is not None:
            ax.axvline(limit, color="black", linestyle=style, linewidth=1)
    ax.set_yticks(
        list(positions), [f"{name} *" if significant else name for name, _, _, significant in bars], fontsize=7
    )
    ax.invert_yaxis()
    major = bands.get("major") or 0.2
    ax.set_xlim(0, max(1.5 * major, max(values)) * 1.15)
    ax.set_xlabel("PSI against the training reference (dotted: moderate, dashed: major; * significant at this n)")
    ax.set_title("\n".join(textwrap.wrap(drift_summary(status), 110)), fontsize=9)
    figure.tight_layout()
    return _png(figure)


def kpi_plot(status: BatchStatus) -> str | None:
    """The KPIs that are shares (0..1) as bars, as base64 PNG (None when there are none)."""
    shares = [
        (name, value)
        for name, value in (_metrics(status).get("kpis") or {}).items()
        if isinstance(value, float) and 0 <= value <= 1
    ]
    if not shares:
        return None
    figure = _figure(8, 0.8 + 0.4 * len(shares))
    ax = figure.subplots()
    ax.barh(range(len(shares)), [value for _, value in shares], color="#3b6ea5")
    for position, (_, value) in enumerate(shares):
        ax.text(value, position, f" {value:.3f}", va="center", fontsize=8)
    ax.set_yticks(range(len(shares)), [name for name, _ in shares], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_title(f"{status.pipeline} KPIs", fontsize=10)
    figure.tight_layout()
    return _png(figure)


# --- HTML -------------------------------------------------------------------------------------

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
.flag { font-weight: bold; }
"""


def _html_table(header: list[str] | tuple[str, ...] | None, rows: list[list[str]] | list[tuple[str, str]]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _img(png: str | None, alt: str) -> str:
    if png is None:
        return f"<p>({html.escape(alt)}: nothing to plot)</p>"
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


def render_html(status: BatchStatus, histograms: dict[str, Any]) -> str:
    """The batch's report as one self-contained HTML page."""
    kpis = [(name, fmt(value)) for name, value in (_metrics(status).get("kpis") or {}).items()]
    title = f"Batch {status.id} ({status.pipeline})"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>state <b>{html.escape(status.state.value)}</b>; {status.items} inputs, {status.succeeded} of {status.total}
sub-tasks succeeded, {status.failed} failed, {status.cancelled} cancelled.</p>
<h2 id="status">Status</h2>
{_html_table(None, [(f, fmt(getattr(status, f))) for f in STATUS_FIELDS])}
<h2 id="kpis">KPIs</h2>
{_html_table(("KPI", "value"), kpis)}
{_img(kpi_plot(status), "KPI summary")}
<h2 id="latency">Latency</h2>
{_html_table(None, batch_latency_rows(status))}
{_html_table(LATENCY_HEADER, latency_rows(status))}
{_img(latency_plot(status, histograms), "latency histogram per model")}
<h2 id="drift">Drift</h2>
<p class="flag">{html.escape(drift_summary(status))}</p>
{_html_table(DRIFT_MODEL_HEADER, drift_model_rows(status))}
{_img(drift_plot(status), "drift per feature")}
{_html_table(DRIFT_FEATURE_HEADER, drift_feature_rows(status))}
</body></html>
"""


def write_html(path: Path, status: BatchStatus, histograms: dict[str, Any]) -> None:
    path.write_text(render_html(status, histograms), encoding="utf-8")

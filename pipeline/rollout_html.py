"""A roll-out's self-contained HTML page (`pipeline rollout report --html`): the tables of
`pipeline.rollout_report` and its plots, drawn and escaped as the batch report does
(`pipeline.html_report`: PNGs embedded as base64, no script, no network)."""

from __future__ import annotations

import html
from pathlib import Path

from pipeline.html_report import STYLE, _figure, _html_table, _img, _png
from pipeline.rollout_report import (
    CHECK_HEADER,
    CPU_HEADER,
    KPI_HEADER,
    RolloutReport,
    check_rows,
    check_whys,
    cpu_rows,
    flip_rows,
    kpi_rows,
    summary_rows,
    verdict_line,
)

VERDICT_COLOURS = {"pass": "#4c9a2a", "fail": "#c0392b", "insufficient data": "#e69f00"}
# Tables of sentences (the roll-out, why each check decided) read better left-aligned.
TEXT_STYLE = ".text td { text-align: left; }"


def score_difference_plot(report: RolloutReport) -> str | None:
    """The histogram of challenger − champion scores over the paired rows, as base64 PNG
    (None in a canary or without paired rows)."""
    differences = report.score_differences
    if differences is None:
        return None
    figure = _figure(8, 3)
    ax = figure.subplots()
    edges = differences.edges
    width = edges[1] - edges[0]
    ax.bar([low + width / 2 for low in edges[:-1]], differences.counts, width=width, color="#3b6ea5")
    ax.axvline(0, color="black", linewidth=1)
    ax.axvline(differences.mean, color="#c0392b", linestyle="--", linewidth=1)
    ax.set_xlabel("challenger score − champion score (dashed: mean)")
    ax.set_ylabel("paired rows")
    ax.set_title(f"score differences over {report.paired_rows} paired rows", fontsize=10)
    figure.tight_layout()
    return _png(figure)


def cpu_plot(report: RolloutReport) -> str | None:
    """Predict CPU µs per row of each version as box plots over its sub-tasks (whiskers:
    min and max), as base64 PNG (None when no sub-task was timed)."""
    timed = [cpu for cpu in report.cpu if cpu.subtasks]
    if not timed:
        return None
    figure = _figure(8, 0.8 + 0.7 * len(timed))
    ax = figure.subplots()
    boxes = [
        {
            "label": f"{cpu.role} ({cpu.subtasks} sub-tasks)",
            "whislo": (cpu.min or 0) * 1e6,
            "q1": (cpu.q1 or 0) * 1e6,
            "med": (cpu.median or 0) * 1e6,
            "q3": (cpu.q3 or 0) * 1e6,
            "whishi": (cpu.max or 0) * 1e6,
        }
        for cpu in timed
    ]
    ax.bxp(boxes, orientation="horizontal", showfliers=False)
    ax.set_xlabel("predict CPU µs per row (one value per sub-task)")
    ax.set_title("CPU per row per version", fontsize=10)
    figure.tight_layout()
    return _png(figure)


def render_html(report: RolloutReport) -> str:
    """The roll-out's report as one self-contained HTML page."""
    status = report.rollout
    title = f"Roll-out {status.id} of {status.model} ({status.mode.value})"
    colour = VERDICT_COLOURS.get(status.verdict, "#222")
    if report.flips is not None:
        header, rows = flip_rows(report.flips)
        flips = _html_table(header, rows) + _img(score_difference_plot(report), "score difference histogram")
    else:
        flips = "<p>(a canary serves each row with one version: there are no paired rows)</p>"
    kpis = kpi_rows(report)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}{TEXT_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="flag" style="color: {colour}">{html.escape(verdict_line(report))}</p>
<h2 id="rollout">Roll-out</h2>
<div class="text">{_html_table(None, summary_rows(report))}</div>
<h2 id="checks">Gate checks</h2>
{_html_table(CHECK_HEADER, check_rows(report))}
<div class="text">{_html_table(("check", "why"), check_whys(report))}</div>
<h2 id="kpis">KPI deltas</h2>
{_html_table(KPI_HEADER, kpis) if kpis else "<p>(no KPI check: the gate has no labelled rows)</p>"}
<h2 id="flips">Decisions and scores</h2>
{flips}
<h2 id="cpu">CPU per row</h2>
{_html_table(CPU_HEADER, cpu_rows(report))}
{_img(cpu_plot(report), "CPU per row per version")}
</body></html>
"""


def write_html(path: Path, report: RolloutReport) -> None:
    path.write_text(render_html(report), encoding="utf-8")

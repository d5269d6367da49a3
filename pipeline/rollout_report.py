"""A roll-out's page for people (`pipeline rollout report`): champion and challenger side by
side, from the evidence the gate reads (`pipeline.rollout_evidence.evidence`) and the gate stored
on the roll-out. This module builds the data (`build`), the rows the terminal and the HTML
share, and the terminal tables; the HTML page with plots is `pipeline.rollout_html`."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine

from pipeline import registry, rollout_evidence, rollouts
from pipeline.definition import ModelSpec
from pipeline.errors import RolloutError
from pipeline.gate import GateCheck, Timings
from pipeline.ledger import rollouts as rollout_rows
from pipeline.report import fmt, fmt_p
from pipeline.rollouts import RolloutStatus

# Equal bins of the score differences, symmetric around 0.
DIFFERENCE_BINS = 31


class FlipMatrix(BaseModel):
    """Paired rows counted by (champion decision, challenger decision): `counts[i][j]` rows
    the champion decided `classes[i]` and the challenger `classes[j]`."""

    classes: list[str]
    counts: list[list[int]]


class ScoreDifferences(BaseModel):
    """Challenger score minus champion score per paired row: summary and a histogram
    (`counts[k]` rows in [`edges[k]`, `edges[k + 1]`))."""

    mean: float
    median: float
    unchanged: int
    edges: list[float]
    counts: list[int]


class CpuPerRow(BaseModel):
    """One version's predict CPU seconds per row, one value per sub-task (`Timings`): how
    many sub-tasks and the quartiles (None without any)."""

    role: str
    versions: list[str]
    subtasks: int
    min: float | None
    q1: float | None
    median: float | None
    q3: float | None
    max: float | None


class RolloutReport(BaseModel):
    """A roll-out as its report shows it. `rollout` holds the gate as stored (its checks
    judge prefixes of the evidence: their `n_*` say how many rows); the other figures are
    over all the evidence read now, the gate's cap included. `paired_rows`, `agreement`,
    `flips` and `score_differences` are for shadow roll-outs (None in a canary)."""

    rollout: RolloutStatus
    champion_versions: list[str]
    paired_rows: int | None
    agreement: float | None
    flips: FlipMatrix | None
    score_differences: ScoreDifferences | None
    cpu: list[CpuPerRow]


def class_names(spec: ModelSpec, classes: int) -> list[str]:
    """The name of each decision class of `spec`'s model, as `rollout_evidence.decisions_of` numbers them."""
    if spec.label_columns:
        names = [f"{label:g}" for label in spec.labels]
    elif spec.probabilities and spec.n_outputs > 1:
        names = [f"class {k}" for k in range(spec.n_outputs)]
    else:
        names = ["score < 0.5", "score >= 0.5"]
    return names + [f"class {k}" for k in range(len(names), classes)]


def flip_matrix(champion: np.ndarray, challenger: np.ndarray, names: list[str]) -> FlipMatrix:
    """Paired decisions (class numbers below `len(names)`) counted by (champion, challenger)."""
    classes = len(names)
    counts = np.bincount(champion * classes + challenger, minlength=classes * classes).reshape(classes, classes)
    return FlipMatrix(classes=names, counts=counts.tolist())


def score_differences(champion: np.ndarray, challenger: np.ndarray, bins: int = DIFFERENCE_BINS) -> ScoreDifferences:
    """Challenger minus champion per paired row (at least one), binned symmetrically around 0."""
    differences = challenger - champion
    reach = max(float(np.abs(differences).max()), 1e-6)
    counts, edges = np.histogram(differences, bins=bins, range=(-reach, reach))
    return ScoreDifferences(
        mean=float(differences.mean()),
        median=float(np.median(differences)),
        unchanged=int(np.count_nonzero(differences == 0)),
        edges=edges.tolist(),
        counts=counts.tolist(),
    )


def cpu_per_row(role: str, versions: list[str], seconds: np.ndarray) -> CpuPerRow:
    """The quartiles of one version's seconds per row (one value per sub-task)."""
    if not len(seconds):
        return CpuPerRow(role=role, versions=versions, subtasks=0, min=None, q1=None, median=None, q3=None, max=None)
    low, q1, median, q3, high = (float(q) for q in np.quantile(seconds, [0, 0.25, 0.5, 0.75, 1]))
    return CpuPerRow(
        role=role, versions=versions, subtasks=len(seconds), min=low, q1=q1, median=median, q3=q3, max=high
    )


def _cpu(status: RolloutStatus, champions: list[str], timings: Timings) -> list[CpuPerRow]:
    return [
        cpu_per_row("champion", champions, timings.champion),
        cpu_per_row("challenger", [status.version], timings.challenger),
    ]


def build(engine: Engine, model: str, rollout_id: int | None = None) -> RolloutReport:
    """The report of `model`'s active roll-out (else its last one; roll-out `rollout_id`
    when given). An active roll-out's gate is first recomputed and stored, as by
    `rollouts.status`.

    Raises:
        UnknownPipelineError: no pipeline has `model`.
        RolloutError: it never had a roll-out, none of id `rollout_id`, or its evidence
            cannot be read (the gate's own errors, `rollouts.GATE_ERRORS`).
    """
    status = rollouts.status(engine, model, rollout_id=rollout_id)
    spec = registry.get_model(model)
    target = rollout_rows.ActiveRollout(status.id, model, status.version, status.mode.value, status.percent)
    try:
        with engine.connect() as conn:
            subtasks, found = rollout_evidence.read_evidence(conn, target)
    except rollouts.GATE_ERRORS as error:
        raise RolloutError(f"roll-out {status.id} of {model!r}: its evidence cannot be read: {error}") from None
    champions = sorted({s.model_version for s in subtasks if s.model_version and s.model_version != status.version})
    paired = found.paired
    rows = None if paired is None else len(paired)
    return RolloutReport(
        rollout=status,
        champion_versions=champions,
        paired_rows=rows,
        agreement=float(np.mean(paired.champion_decisions == paired.challenger_decisions))
        if paired is not None and rows
        else None,
        flips=None
        if paired is None
        else flip_matrix(paired.champion_decisions, paired.challenger_decisions, class_names(spec, paired.classes)),
        score_differences=score_differences(paired.champion_scores, paired.challenger_scores)
        if paired is not None and rows
        else None,
        cpu=_cpu(status, champions, found.timings),
    )


# --- rows shared by the terminal and the HTML ------------------------------------------------

CHECK_HEADER = ("check", "kind", "verdict", "estimate", "interval", "margin", "p-value", "n champion / challenger")
KPI_HEADER = ("KPI", "verdict", "challenger − champion", "interval", "margin", "labelled rows")
CPU_HEADER = ("role", "version", "sub-tasks", "µs per row: min", "q1", "median", "q3", "max")


def verdict_line(report: RolloutReport) -> str:
    """The overall verdict and why, in one line."""
    gate = report.rollout.gate
    if gate is None:
        return f"{report.rollout.verdict}: no batch of this roll-out judged yet"
    return f"{gate.verdict}: " + ("; ".join(gate.reasons) or "every check passed")


def summary_rows(report: RolloutReport) -> list[tuple[str, str]]:
    """The roll-out: what, who, since when, its state and how many batches and rows."""
    status = report.rollout
    mode = status.mode.value + (f" {status.percent:g} %" if status.percent is not None else "")
    rows = [
        ("roll-out", f"{status.id} of {status.model}"),
        ("mode", mode),
        ("state", status.state.value + (f" ({status.reason})" if status.reason else "")),
        ("champion", ", ".join(report.champion_versions) or "-"),
        ("challenger", status.version),
        ("started", f"{status.started_at:%Y-%m-%d %H:%M:%S} by {status.started_by}"),
        ("ended", "-" if status.ended_at is None else f"{status.ended_at:%Y-%m-%d %H:%M:%S} by {status.ended_by}"),
        ("batches", str(status.batches)),
        ("verdict", verdict_line(report)),
    ]
    if report.paired_rows is not None:
        rows.append(("paired rows", str(report.paired_rows)))
        rows.append(("agreement", "-" if report.agreement is None else f"{report.agreement:.2%}"))
    if report.score_differences is not None:
        diff = report.score_differences
        rows.append(
            ("score difference", f"mean {diff.mean:+.4f}, median {diff.median:+.4f}, {diff.unchanged} rows unchanged")
        )
    if status.gate_error is not None:
        rows.append(("gate error", f"{status.gate_error.after}: {status.gate_error.error}"))
    return rows


def _interval(ci: tuple[float, float] | None) -> str:
    return "-" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _checks(report: RolloutReport) -> list[GateCheck]:
    return [] if report.rollout.gate is None else report.rollout.gate.checks


def check_rows(report: RolloutReport) -> list[list[str]]:
    """One row per check of the stored gate."""
    return [
        [
            check.name,
            check.kind,
            check.verdict,
            fmt(check.estimate),
            _interval(check.ci),
            fmt(check.margin),
            fmt_p(check.p_value),
            f"{check.n_champion} / {check.n_challenger}",
        ]
        for check in _checks(report)
    ]


def check_whys(report: RolloutReport) -> list[tuple[str, str]]:
    """(check, why) for each check of the stored gate."""
    return [(check.name, check.why) for check in _checks(report)]


def kpi_rows(report: RolloutReport) -> list[list[str]]:
    """The KPI deltas (challenger minus champion) with their intervals: the gate's KPI checks."""
    return [
        [
            check.name.removeprefix("kpi:"),
            check.verdict,
            "-" if check.estimate is None else f"{check.estimate:+.4f}",
            _interval(check.ci),
            fmt(check.margin),
            f"{check.n_champion} / {check.n_challenger}",
        ]
        for check in _checks(report)
        if check.kind == "kpi"
    ]


def flip_rows(flips: FlipMatrix) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the flip matrix: champion decisions down, challenger decisions across."""
    header = ["champion \\ challenger", *flips.classes, "total"]
    rows = [
        [name, *(str(count) for count in counts), str(sum(counts))] for name, counts in zip(flips.classes, flips.counts)
    ]
    totals = [sum(column) for column in zip(*flips.counts)]
    rows.append(["total", *(str(total) for total in totals), str(sum(totals))])
    return header, rows


def _short(versions: list[str]) -> str:
    return ", ".join(version[:12] for version in versions) or "-"


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def cpu_rows(report: RolloutReport) -> list[list[str]]:
    """Per version: predict CPU µs per row over its sub-tasks (min, quartiles, max)."""
    return [
        [cpu.role, _short(cpu.versions), str(cpu.subtasks), *map(_us, (cpu.min, cpu.q1, cpu.median, cpu.q3, cpu.max))]
        for cpu in report.cpu
    ]


# --- terminal ---------------------------------------------------------------------------------


def _table(title: str, header: tuple[str, ...] | list[str] | None, rows: list[list[str]]) -> Table:
    """A table whose cells are plain text (a reason holding `[...]` is not rich markup)."""
    table = Table(*(header or ()), title=title, show_header=header is not None)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def print_rollout_report(console: Console, report: RolloutReport) -> None:
    """The report as terminal tables."""
    console.print(_table("roll-out", None, [list(row) for row in summary_rows(report)]))
    console.print(_table("gate checks", CHECK_HEADER, check_rows(report)))
    for name, why in check_whys(report):
        console.print(f"  {name}: {why}", markup=False)
    kpis = kpi_rows(report)
    if kpis:
        console.print(_table("KPI deltas", KPI_HEADER, kpis))
    if report.flips is not None:
        header, rows = flip_rows(report.flips)
        console.print(_table("flip matrix (paired rows)", header, rows))
    console.print(_table("predict CPU per row", CPU_HEADER, cpu_rows(report)))

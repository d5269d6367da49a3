"""The gate's verdict over its checks for a shadow or a canary roll-out, and the rule that
aborts a challenger whose sub-tasks fail more than the champion's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import stats

from pipeline.gate.checks import (
    check_behaviour,
    check_latency,
    check_paired_kpis,
    check_unpaired_kpis,
)
from pipeline.gate.evidence import (
    DEFAULT_KPIS,
    FAIL,
    INSUFFICIENT,
    NO_LABEL,
    PASS,
    GateCheck,
    GateConfig,
    GateResult,
    Kpi,
    PairedRows,
    Timings,
    Verdict,
    VersionRows,
)


def _combined(checks: Sequence[GateCheck]) -> Verdict:
    """Fail if any check fails, pass if all pass, else insufficient data (also when there are none)."""
    verdicts = {check.verdict for check in checks}
    if FAIL in verdicts:
        return FAIL
    return PASS if checks and verdicts == {PASS} else INSUFFICIENT


CANARY_WITHOUT_LABELS = "quality unknown: a canary without labelled rows cannot show the challenger is not worse"


def _overall(mode: Literal["shadow", "canary"], checks: list[GateCheck], labelled: bool) -> GateResult:
    """Combine the checks. Quality: with labelled rows the KPIs decide it (a behaviour change the
    labels show is not a loss only warns); without labels a shadow roll-out's behaviour checks
    decide it, and a canary's cannot be shown. Overall: fail if quality or latency fails, pass
    if both pass, else insufficient data."""
    kpis = [check for check in checks if check.kind == "kpi"]
    labels_decide = labelled and bool(kpis)
    reasons = [
        f"{check.name}: {check.why}"
        + (" (a warning only: the labels decide quality)" if labels_decide and check.kind == "behaviour" else "")
        for check in checks
        if check.verdict == FAIL
    ]
    if labels_decide:
        quality, basis = _combined(kpis), "the KPIs on labelled rows"
    elif mode == "shadow":
        quality = _combined([check for check in checks if check.kind == "behaviour"])
        basis = "the behaviour checks (no labelled rows)"
    else:
        quality, basis = INSUFFICIENT, ""
    speed = _combined([check for check in checks if check.kind == "latency"])
    if FAIL in (quality, speed):
        verdict: Verdict = FAIL
    elif quality == PASS and speed == PASS:
        verdict = PASS
        reasons.append(f"quality judged by {basis}; latency within the margin")
    else:
        verdict = INSUFFICIENT
        if not basis:
            reasons.append(CANARY_WITHOUT_LABELS)
        reasons.extend(f"{check.name}: {check.why}" for check in checks if check.verdict == INSUFFICIENT)
    return GateResult(mode=mode, verdict=verdict, reasons=reasons, checks=checks)


def judge_shadow(
    rows: PairedRows, timings: Timings, config: GateConfig | None = None, kpis: Mapping[str, Kpi] = DEFAULT_KPIS
) -> GateResult:
    """The gate of a shadow roll-out from its paired rows and the versions' sub-task timings."""
    config = config or GateConfig()
    checks = [*check_behaviour(rows, config), *check_paired_kpis(rows, kpis, config)]
    checks.append(check_latency(timings, config))
    labelled = rows.labels is not None and bool(np.any(rows.labels != NO_LABEL))
    return _overall("shadow", checks, labelled)


def judge_canary(
    champion: VersionRows,
    challenger: VersionRows,
    timings: Timings,
    config: GateConfig | None = None,
    kpis: Mapping[str, Kpi] = DEFAULT_KPIS,
) -> GateResult:
    """The gate of a canary roll-out from each version's rows and sub-task timings.

    Raises:
        ValueError: the versions' rows count different numbers of classes.
    """
    config = config or GateConfig()
    checks = [*check_unpaired_kpis(champion, challenger, kpis, config), check_latency(timings, config)]
    labelled = any(rows.labels is not None and bool(np.any(rows.labels != NO_LABEL)) for rows in (champion, challenger))
    return _overall("canary", checks, labelled)


class SubtaskCounts(BaseModel):
    """One version's finished sub-tasks in a roll-out: how many, how many failed (gave up
    after retries), and how many of those failed on an output guardrail."""

    finished: int = Field(ge=0)
    failed: int = Field(ge=0)
    guardrail_violations: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> SubtaskCounts:
        if not self.guardrail_violations <= self.failed <= self.finished:
            raise ValueError(
                f"sub-task counts must satisfy guardrail violations ({self.guardrail_violations}) "
                f"<= failed ({self.failed}) <= finished ({self.finished})"
            )
        return self


class AbortRule(BaseModel):
    """When a challenger is aborted automatically: on any output guardrail violation, or when its
    sub-task failure rate exceeds the champion's by more than `margin` (absolute), significantly
    (Fisher's exact test, one-sided, at `alpha`), once each version has `min_subtasks` finished."""

    model_config = ConfigDict(frozen=True)

    margin: float = Field(default=0.05, gt=0, lt=1)
    min_subtasks: int = Field(default=10, ge=1)
    alpha: float = Field(default=0.01, gt=0, lt=0.5)


def abort_reason(champion: SubtaskCounts, challenger: SubtaskCounts, rule: AbortRule | None = None) -> str | None:
    """Why the challenger must be aborted now, or None when it may go on."""
    rule = rule or AbortRule()
    if challenger.guardrail_violations:
        return f"{challenger.guardrail_violations} challenger sub-tasks violated the output guardrails"
    if min(champion.finished, challenger.finished) < rule.min_subtasks:
        return None
    champion_rate = champion.failed / champion.finished
    challenger_rate = challenger.failed / challenger.finished
    table = [
        [challenger.failed, challenger.finished - challenger.failed],
        [champion.failed, champion.finished - champion.failed],
    ]
    p_value = float(stats.fisher_exact(table, alternative="greater").pvalue)
    if challenger_rate - champion_rate > rule.margin and p_value < rule.alpha:
        return (
            f"challenger sub-task failure rate {challenger_rate:.1%} ({challenger.failed} of {challenger.finished}) "
            f"exceeds the champion's {champion_rate:.1%} ({champion.failed} of {champion.finished}) by more than "
            f"{rule.margin:.0%} (Fisher's exact test p = {p_value:.2g})"
        )
    return None

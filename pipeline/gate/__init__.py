"""The statistical gate of a model roll-out: is the challenger version safe to promote?

Pure functions of the evidence a roll-out has gathered so far (numpy + scipy, no
database, no broker); the roll-out plumbing recomputes the gate as shadow or canary rows
accumulate and stores the `GateResult` (JSON) per roll-out. docs/rollouts.md explains the
statistics and the error rates measured by `python -m bench.gate_simulation`.

Checks, each with a verdict `pass`, `fail` or `insufficient data`:

* shadow (the same rows scored by both versions, paired per row):
  `agreement` (share of rows whose decision is unchanged), `flips` (McNemar's exact test,
  Bowker's test beyond two classes: do changed decisions move one way?), `scores`
  (Wilcoxon signed-rank on the per-row score differences);
* both modes: `latency` (Mann-Whitney on CPU seconds of predict per row, one value per sub-task)
  and, on labelled rows, one `kpi:<name>` check per KPI: the challenger's KPI minus the
  champion's, with a bootstrap confidence interval, against a non-inferiority margin.

Sequential looks: a check judges only at milestones of its sample size (the first
`min * growth**k` rows, k < `looks`) and tests each look at `alpha / looks`, so however
often the gate is recomputed, the chance that a check ever fails falsely is at most
`alpha` (Bonferroni). Rows past the last milestone change nothing: the verdict is final.

Modules: `evidence` (configuration, KPIs, the rows and timings given, results),
`checks` (each check at its looks), `verdict` (the verdict over the checks, the abort rule).
"""

from pipeline.gate.checks import (
    BEHAVIOUR_CHECKS as BEHAVIOUR_CHECKS,
)
from pipeline.gate.checks import (
    check_agreement as check_agreement,
)
from pipeline.gate.checks import (
    check_behaviour as check_behaviour,
)
from pipeline.gate.checks import (
    check_flips as check_flips,
)
from pipeline.gate.checks import (
    check_latency as check_latency,
)
from pipeline.gate.checks import (
    check_paired_kpis as check_paired_kpis,
)
from pipeline.gate.checks import (
    check_scores as check_scores,
)
from pipeline.gate.checks import (
    check_unpaired_kpis as check_unpaired_kpis,
)
from pipeline.gate.evidence import (
    DEFAULT_KPIS as DEFAULT_KPIS,
)
from pipeline.gate.evidence import (
    FAIL as FAIL,
)
from pipeline.gate.evidence import (
    INSUFFICIENT as INSUFFICIENT,
)
from pipeline.gate.evidence import (
    NO_LABEL as NO_LABEL,
)
from pipeline.gate.evidence import (
    PASS as PASS,
)
from pipeline.gate.evidence import (
    CheckKind as CheckKind,
)
from pipeline.gate.evidence import (
    GateCheck as GateCheck,
)
from pipeline.gate.evidence import (
    GateConfig as GateConfig,
)
from pipeline.gate.evidence import (
    GateResult as GateResult,
)
from pipeline.gate.evidence import (
    Kpi as Kpi,
)
from pipeline.gate.evidence import (
    PairedRows as PairedRows,
)
from pipeline.gate.evidence import (
    Timings as Timings,
)
from pipeline.gate.evidence import (
    Verdict as Verdict,
)
from pipeline.gate.evidence import (
    VersionRows as VersionRows,
)
from pipeline.gate.evidence import (
    accuracy as accuracy,
)
from pipeline.gate.evidence import (
    false_positive_rate as false_positive_rate,
)
from pipeline.gate.evidence import (
    recall as recall,
)
from pipeline.gate.verdict import (
    CANARY_WITHOUT_LABELS as CANARY_WITHOUT_LABELS,
)
from pipeline.gate.verdict import (
    AbortRule as AbortRule,
)
from pipeline.gate.verdict import (
    SubtaskCounts as SubtaskCounts,
)
from pipeline.gate.verdict import (
    abort_reason as abort_reason,
)
from pipeline.gate.verdict import (
    judge_canary as judge_canary,
)
from pipeline.gate.verdict import (
    judge_shadow as judge_shadow,
)

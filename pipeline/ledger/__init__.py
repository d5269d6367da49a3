"""The batch ledger: every state change of batches and sub-tasks, in PostgreSQL.

PostgreSQL is the source of truth. Each transition is one statement guarded by the
state it expects; when it matches no row the caller lost a race or holds a duplicate
message, and does nothing more. Bulk writes use COPY. One module per noun:

- `connection`: the engine, migrations, autocommit, COPY;
- `batches`: a new batch and its inputs (with a keyed request's fingerprint), a batch's status, cancel;
- `counters`: counting finished sub-tasks, failure policies, aborts;
- `split`: the split's writes (new sub-tasks, its steps);
- `claims`: a worker's claims of sub-tasks (with the rows to score);
- `outcomes`: a claimed sub-task's completion or failure, counted in its batch;
- `pages`: reading input pages, reading and writing result pages;
- `aggregation`: the aggregate's locks, reads and the batch's final state (with its window contributions);
- `sweeps`: the sweeper's reconciliation;
- `dead_letters`: messages refused as malformed (used as a module: `dead_letters.record`);
- `heartbeats`: which queues the live workers consume;
- `labels`: ground truth stored after a batch, and its realised KPIs;
- `monitor`: each finished batch's window contributions, windows pooled, alert episodes;
- `registry`: model versions, their aliases (champion, challenger) and events;
- `rollouts`: roll-outs, their batches and gate evidence (used as a module: `rollouts.start_rollout`);
- `listing`: what `pipeline status` lists, on a plain psycopg connection (used as a module:
  `listing.batch_statuses`);
- `queries.sql`: the raw SQL, by name (`raw_sql` reads it, `queries` builds its SQLAlchemy
  statements; the rest is SQLAlchemy Core, built once).

Who owns the transaction: a function whose first argument is an `Engine` is a whole
transaction (or one autocommitted statement) and has committed when it returns; a
function whose first argument is a `Connection` runs on the caller's transaction and
never commits, so the caller can put several steps in one (`with engine.begin() as conn`).
`listing`'s reads take a psycopg connection and run on it as it is (an engine's caller
passes `connection.driver_connection(conn)`).

Each name is imported from its module on first use (PEP 562): a command that reads batch
statuses does not build the claim, split and sweep statements.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.ledger.aggregation import (
        CANCELLED_ERROR,
        OnePageBatch,
        StreamKey,
        SubtaskOutput,
        SubtaskTiming,
        batch_state,
        finish_batch,
        lock_aggregating_batch,
        lock_aggregation,
        one_page_batch_due,
        running_batch,
        serving_versions,
        subtask_outputs,
        unfinished_before,
    )
    from pipeline.ledger.batches import (
        NOTIFY_CHANNEL,
        RequestFingerprint,
        batch_status_read_ahead,
        batch_status_row,
        cancel_batch,
        first_subtask_started,
        insert_batch,
    )
    from pipeline.ledger.claims import (
        Claim,
        claim_interactive,
        claim_more_of_batch,
        claim_subtask,
        claim_turn,
    )
    from pipeline.ledger.connection import make_engine, migrate
    from pipeline.ledger.counters import (
        DEADLINE_REASON,
        FAIL_FAST_REASON,
        UNFINISHED_SUBTASK_STATES,
        Outcome,
        too_many_failures_reason,
    )
    from pipeline.ledger.heartbeats import forget_worker, record_heartbeat, unserved_queues
    from pipeline.ledger.labels import StoredLabels, store_labels
    from pipeline.ledger.monitor import (
        Condition,
        Contribution,
        PooledVersion,
        claim_evaluation,
        evaluation_figures,
        fold_contributions,
        open_alerts,
        record_alerts,
        record_contributions,
        store_label_counts,
        window_series,
        window_versions,
    )
    from pipeline.ledger.outcomes import (
        Completion,
        complete_subtask,
        complete_subtasks,
        fail_subtask,
    )
    from pipeline.ledger.pages import (
        ResultsPage,
        StoredResult,
        input_pages,
        insert_result_page,
        iter_results,
        result_page_row,
    )
    from pipeline.ledger.registry import (
        StoredArtifact,
        VersionRecord,
        aliases_of,
        events_of,
        insert_version,
        manifests_of,
        previous_champion,
        set_alias,
        stored_artifact,
        versions_of,
    )
    from pipeline.ledger.split import (
        INTERACTIVE_CHANNEL,
        Dispatch,
        NewSubtask,
        RideQuery,
        Riding,
        StoredBatch,
        WholeSplit,
        copy_subtasks,
        fail_pending_batch,
        model_row_costs,
        next_seqs,
        pending_batch,
        record_split,
        store_split_batch,
    )
    from pipeline.ledger.sweeps import Sweep, sweep

# The names each module re-exports here.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "aggregation": (
        "CANCELLED_ERROR",
        "OnePageBatch",
        "StreamKey",
        "SubtaskOutput",
        "SubtaskTiming",
        "batch_state",
        "finish_batch",
        "lock_aggregating_batch",
        "lock_aggregation",
        "one_page_batch_due",
        "running_batch",
        "serving_versions",
        "subtask_outputs",
        "unfinished_before",
    ),
    "batches": (
        "NOTIFY_CHANNEL",
        "RequestFingerprint",
        "batch_status_read_ahead",
        "batch_status_row",
        "cancel_batch",
        "first_subtask_started",
        "insert_batch",
    ),
    "claims": (
        "Claim",
        "claim_interactive",
        "claim_more_of_batch",
        "claim_subtask",
        "claim_turn",
    ),
    "connection": (
        "make_engine",
        "migrate",
    ),
    "counters": (
        "DEADLINE_REASON",
        "FAIL_FAST_REASON",
        "UNFINISHED_SUBTASK_STATES",
        "Outcome",
        "too_many_failures_reason",
    ),
    "heartbeats": (
        "forget_worker",
        "record_heartbeat",
        "unserved_queues",
    ),
    "labels": (
        "StoredLabels",
        "store_labels",
    ),
    "outcomes": (
        "Completion",
        "complete_subtask",
        "complete_subtasks",
        "fail_subtask",
    ),
    "monitor": (
        "Condition",
        "Contribution",
        "PooledVersion",
        "claim_evaluation",
        "evaluation_figures",
        "fold_contributions",
        "open_alerts",
        "record_alerts",
        "record_contributions",
        "store_label_counts",
        "window_series",
        "window_versions",
    ),
    "pages": (
        "ResultsPage",
        "StoredResult",
        "input_pages",
        "insert_result_page",
        "iter_results",
        "result_page_row",
    ),
    "registry": (
        "StoredArtifact",
        "VersionRecord",
        "aliases_of",
        "events_of",
        "insert_version",
        "manifests_of",
        "previous_champion",
        "set_alias",
        "stored_artifact",
        "versions_of",
    ),
    "split": (
        "INTERACTIVE_CHANNEL",
        "Dispatch",
        "NewSubtask",
        "RideQuery",
        "Riding",
        "StoredBatch",
        "WholeSplit",
        "copy_subtasks",
        "fail_pending_batch",
        "pending_batch",
        "model_row_costs",
        "next_seqs",
        "record_split",
        "store_split_batch",
    ),
    "sweeps": (
        "Sweep",
        "sweep",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "CANCELLED_ERROR",
    "Claim",
    "Completion",
    "Condition",
    "Contribution",
    "DEADLINE_REASON",
    "Dispatch",
    "FAIL_FAST_REASON",
    "INTERACTIVE_CHANNEL",
    "NOTIFY_CHANNEL",
    "NewSubtask",
    "OnePageBatch",
    "Outcome",
    "PooledVersion",
    "RequestFingerprint",
    "ResultsPage",
    "RideQuery",
    "Riding",
    "StoredArtifact",
    "StoredBatch",
    "StoredLabels",
    "StoredResult",
    "StreamKey",
    "SubtaskOutput",
    "SubtaskTiming",
    "Sweep",
    "UNFINISHED_SUBTASK_STATES",
    "VersionRecord",
    "WholeSplit",
    "aliases_of",
    "batch_state",
    "batch_status_read_ahead",
    "batch_status_row",
    "cancel_batch",
    "claim_evaluation",
    "claim_interactive",
    "claim_more_of_batch",
    "claim_subtask",
    "claim_turn",
    "complete_subtask",
    "complete_subtasks",
    "copy_subtasks",
    "evaluation_figures",
    "events_of",
    "fail_pending_batch",
    "fail_subtask",
    "finish_batch",
    "first_subtask_started",
    "fold_contributions",
    "forget_worker",
    "input_pages",
    "insert_result_page",
    "insert_batch",
    "insert_version",
    "iter_results",
    "lock_aggregating_batch",
    "lock_aggregation",
    "pending_batch",
    "make_engine",
    "manifests_of",
    "migrate",
    "model_row_costs",
    "next_seqs",
    "one_page_batch_due",
    "open_alerts",
    "previous_champion",
    "record_alerts",
    "record_contributions",
    "record_heartbeat",
    "record_split",
    "result_page_row",
    "running_batch",
    "serving_versions",
    "set_alias",
    "store_label_counts",
    "store_labels",
    "store_split_batch",
    "stored_artifact",
    "subtask_outputs",
    "sweep",
    "too_many_failures_reason",
    "unfinished_before",
    "unserved_queues",
    "versions_of",
    "window_series",
    "window_versions",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'pipeline.ledger' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pipeline.ledger.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

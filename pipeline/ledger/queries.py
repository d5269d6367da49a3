"""The ledger's raw SQL, named: read once from `queries.sql` (procrastinate keeps its SQL
the same way), so a reader finds every hand-written statement in one file."""

from __future__ import annotations

import re
from importlib.resources import files

from sqlalchemy import TextClause, text

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _parse(source: str) -> dict[str, str]:
    """Split `source` into its `-- name:` blocks: name → SQL, without comment lines."""
    parts = _NAME.split(source)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines)
    return queries


RAW: dict[str, str] = _parse(files("pipeline.ledger").joinpath("queries.sql").read_text())


def query(name: str) -> TextClause:
    """The named query as a statement with bound parameters."""
    return text(RAW[name])


BATCH_STATUS = query("batch_status")
BATCH_STATUSES = query("batch_statuses")
NEW_SUBTASK_IDS = query("new_subtask_ids")
SUBTASK_OUTPUTS = query("subtask_outputs")
SERVING_VERSIONS = query("serving_versions")
RECORD_HEARTBEAT = query("record_heartbeat")
UNSERVED_QUEUES = query("unserved_queues")
REPLACE_CHANGED_LABELS = query("replace_changed_labels")
INSERT_LABELS = query("insert_labels")
LABELLED_RESULTS = query("labelled_results")
RECORD_CONTRIBUTIONS = query("record_contributions")
UNFOLDED_CONTRIBUTIONS = query("unfolded_contributions")
FOLD_CONTRIBUTIONS = query("fold_contributions")
STORE_LABEL_COUNTS = query("store_label_counts")
WINDOW_BY_TIME = text(RAW["window_parts_by_time"] + "\n" + RAW["window_pooled"])
WINDOW_BY_ROWS = text(RAW["window_parts_by_rows"] + "\n" + RAW["window_pooled"])
CLAIM_EVALUATION = query("claim_evaluation")
STORE_EVALUATION = query("store_evaluation")
OPEN_ALERTS_HOLDING = query("open_alerts_holding")
CLEAR_ALERTS_NOT_HOLDING = query("clear_alerts_not_holding")
OPEN_ALERTS = query("open_alerts")
EVALUATION_FIGURES = query("evaluation_figures")
FAILED_RESULT_PAGES = query("failed_result_pages")
SET_ALIAS = query("set_alias")
REGISTER_VERSION = query("register_version")
START_ROLLOUT = query("start_rollout")
END_ROLLOUT = query("end_rollout")
RECORD_GATE = query("record_gate")
RECORD_GATE_ERROR = query("record_gate_error")
ADD_ROLLOUT_BATCH = query("add_rollout_batch")
ROLLOUT_EVIDENCE = query("rollout_evidence")
ROLLOUT_COUNTS = query("rollout_counts")
# COPY statements run on the driver's cursor, as strings.
COPY_INPUT_PAGES = RAW["copy_input_pages"]
COPY_SUBTASKS = RAW["copy_subtasks"]
COPY_RESULT_PAGE = RAW["copy_result_page"]

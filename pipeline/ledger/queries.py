"""The ledger's raw SQL (`raw_sql`, from `queries.sql`) as SQLAlchemy statements, built once."""

from __future__ import annotations

from sqlalchemy import TextClause, text

from pipeline.ledger.connection import BINARY_RESULTS
from pipeline.ledger.raw_sql import RAW


def query(name: str) -> TextClause:
    """The named query as a statement with bound parameters."""
    return text(RAW[name])


BATCH_STATUS = query("batch_status")
BATCH_STATUS_READ_AHEAD = query("batch_status_read_ahead")
NEW_SUBTASK_IDS = query("new_subtask_ids")
STORE_SPLIT_BATCH = query("store_split_batch")
SERVING_OF = query("serving_of")
# Outputs are `bytea`: read in binary format.
SUBTASK_OUTPUTS = query("subtask_outputs").execution_options(**BINARY_RESULTS)
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
INSERT_RESULT_PAGE = query("insert_result_page")
FINISH_BATCH = query("finish_batch")
# COPY statements run on the driver's cursor, as strings.
COPY_INPUT_PAGES = RAW["copy_input_pages"]
COPY_SUBTASKS = RAW["copy_subtasks"]

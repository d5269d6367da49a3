"""Monitoring over time: labels that arrive after a batch, per-batch window contributions, alerts.

- `labels`: ground truth of a finished batch's inputs, stored after it. A changed label
  closes the current row (`replaced_at`) and adds a new one, so the history is kept; the
  current label of an input is its row with `replaced_at IS NULL` (one at most);
- view `batch_metrics` gains `labelled_share` and `realised_kpis` (recomputed from the
  stored results and labels each time labels are stored);
- `monitor_contributions`: one row per finished batch and model version, written with the
  batch's metrics: rows, drift bin counts, KPIs, label counts, latency. Windows pool them;
- `alerts`: one row per episode of a condition (drift, realised KPI below its floor,
  latency over budget, estimated performance) per pipeline / model / version / window,
  open while it holds (`cleared_at IS NULL`);
- `monitor_evaluations`: when each pipeline's windows were last judged (one judge at a time),
  and their headline figures (the Prometheus gauges read them).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TS = postgresql.TIMESTAMP(timezone=True)
ALERT_KINDS = "('drift','estimated_performance','realised_kpi','latency')"

# The view's columns as revision 0003 left them.
BATCH_METRICS_COLUMNS = """
    b.id,
    b.pipeline,
    b.state,
    b.items,
    b.finished_at,
    (b.metrics #>> '{latency,end_to_end_s}')::float8 AS end_to_end_s,
    (b.metrics #>> '{latency,aggregation_s}')::float8 AS aggregation_s,
    (b.metrics #>> '{latency,items_per_s}')::float8 AS items_per_s,
    (b.metrics #>> '{latency,subtasks,queue_wait_s,p95}')::float8 AS wait_p95_s,
    (b.metrics #>> '{latency,subtasks,compute_s,p95}')::float8 AS compute_p95_s,
    b.metrics -> 'kpis' AS kpis,
    (b.metrics #>> '{drift,drifted}')::boolean AS drifted,
    b.metrics #> '{drift,drifted_features}' AS drifted_features,
    (b.metrics #>> '{drift,drifted_share}')::float8 AS drifted_share"""

REALISED_COLUMNS = """
    coalesce((b.metrics #>> '{realised,labelled_share}')::float8, 0) AS labelled_share,
    b.metrics #> '{realised,kpis}' AS realised_kpis"""
HAS_METRICS = "b.metrics IS NOT NULL"


def _id() -> sa.Column[int]:
    return sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True)


def _batch_id() -> sa.Column[object]:
    return sa.Column(
        "batch_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "labels",
        _id(),
        _batch_id(),
        sa.Column("item", sa.Integer, nullable=False),
        sa.Column("label", postgresql.JSONB, nullable=False),
        sa.Column("received_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.Column("replaced_at", TS),
    )
    # One current label per input; the same label again is a conflict on it (idempotent).
    op.create_index(
        "labels_current", "labels", ["batch_id", "item"], unique=True, postgresql_where=sa.text("replaced_at IS NULL")
    )
    # New columns go last: CREATE OR REPLACE VIEW keeps the existing ones in place.
    op.execute(
        f"CREATE OR REPLACE VIEW batch_metrics AS SELECT {BATCH_METRICS_COLUMNS},{REALISED_COLUMNS}"
        f" FROM batches b WHERE {HAS_METRICS}"
    )
    op.create_table(
        "monitor_contributions",
        _id(),
        _batch_id(),
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("finished_at", TS, nullable=False),
        sa.Column("items", sa.Integer, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("bin_counts", sa.LargeBinary),
        sa.Column("kpis", postgresql.JSONB, nullable=False),
        sa.Column("label_counts", postgresql.JSONB),
        sa.Column("latency_s", sa.Float),
        sa.UniqueConstraint("batch_id", "model", "model_version"),
    )
    op.create_index("monitor_contributions_window", "monitor_contributions", ["pipeline", "finished_at"])
    op.create_table(
        "alerts",
        _id(),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("window", sa.Text, nullable=False),
        sa.Column("opened_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.Column("evidence", postgresql.JSONB, nullable=False),
        sa.Column("cleared_at", TS),
        sa.CheckConstraint(f"kind IN {ALERT_KINDS}", name="alerts_kind_known"),
    )
    # One open episode per condition and scope.
    op.create_index(
        "alerts_open",
        "alerts",
        ["kind", "pipeline", "model", "model_version", "window"],
        unique=True,
        postgresql_where=sa.text("cleared_at IS NULL"),
    )
    op.create_table(
        "monitor_evaluations",
        sa.Column("pipeline", sa.Text, primary_key=True),
        sa.Column("evaluated_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        # The judged windows' headline figures, read by the Prometheus endpoint.
        sa.Column("figures", postgresql.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    )


def downgrade() -> None:
    op.drop_table("monitor_evaluations")
    op.drop_table("alerts")
    op.drop_table("monitor_contributions")
    # A view loses a column only by being created again.
    op.execute("DROP VIEW batch_metrics")
    op.execute(f"CREATE VIEW batch_metrics AS SELECT {BATCH_METRICS_COLUMNS} FROM batches b WHERE {HAS_METRICS}")
    op.drop_table("labels")

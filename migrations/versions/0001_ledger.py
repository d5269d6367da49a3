"""The batch ledger: batches, inputs, subtasks, results and the batch_status view.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = postgresql.TIMESTAMP(timezone=True)
BATCH_STATES = "('pending','running','aggregating','succeeded','partial','failed','cancelled')"
SUBTASK_STATES = "('pending','dispatched','running','succeeded','failed','cancelled')"


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False, server_default="pending"),
        sa.Column("idempotency_key", sa.Text, unique=True),
        sa.Column("items", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cancelled", sa.Integer, nullable=False, server_default="0"),
        sa.Column("aggregate_runs", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.Column("started_at", TS),
        sa.Column("aggregating_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("result", postgresql.JSONB),
        sa.Column("metrics", postgresql.JSONB),
        sa.Column("error", sa.Text),
        sa.CheckConstraint(f"state IN {BATCH_STATES}", name="batches_state_known"),
        sa.CheckConstraint("succeeded + failed + cancelled <= total", name="batches_counters_within_total"),
    )
    op.create_index("batches_state_created", "batches", ["state", "created_at"])

    op.create_table(
        "inputs",
        sa.Column(
            "batch_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("item", sa.Integer, primary_key=True),
        sa.Column("data", postgresql.JSONB, nullable=False),
    )

    op.create_table(
        "subtasks",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "batch_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("state", sa.Text, nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("items", postgresql.ARRAY(sa.Integer), nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("output", sa.LargeBinary),
        sa.Column("error", sa.Text),
        sa.Column("worker", sa.Text),
        sa.Column("model_version", sa.Text),
        sa.Column("queued_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.Column("lease_until", TS),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.UniqueConstraint("batch_id", "model", "seq"),
        sa.CheckConstraint(f"state IN {SUBTASK_STATES}", name="subtasks_state_known"),
    )
    # The sweeper's scan: unfinished sub-tasks by lease.
    op.create_index(
        "subtasks_unfinished_lease",
        "subtasks",
        ["lease_until"],
        postgresql_where=sa.text("state IN ('pending','dispatched','running')"),
    )

    op.create_table(
        "results",
        sa.Column(
            "batch_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("item", sa.Integer, primary_key=True),
        sa.Column("output", postgresql.JSONB),
        sa.Column("error", sa.Text),
        sa.CheckConstraint("(output IS NULL) <> (error IS NULL)", name="results_output_xor_error"),
    )

    op.execute(
        """
        CREATE VIEW batch_status AS
        SELECT
            b.id,
            b.pipeline,
            b.state,
            b.items,
            b.total,
            b.succeeded,
            b.failed,
            b.cancelled,
            b.total - b.succeeded - b.failed - b.cancelled AS remaining,
            CASE WHEN b.total = 0 THEN 0.0
                 ELSE round((b.succeeded + b.failed + b.cancelled)::numeric / b.total, 4)
            END AS progress,
            b.created_at,
            b.started_at,
            b.finished_at,
            extract(epoch FROM b.started_at - b.created_at) AS wait_s,
            extract(epoch FROM b.finished_at - b.aggregating_at) AS aggregation_s,
            extract(epoch FROM coalesce(b.finished_at, clock_timestamp()) - b.created_at) AS elapsed_s,
            b.error
        FROM batches b
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW batch_status")
    op.drop_table("results")
    op.drop_table("subtasks")
    op.drop_table("inputs")
    op.drop_table("batches")

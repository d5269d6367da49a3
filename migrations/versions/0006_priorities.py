"""Priorities: a batch is `interactive` or `bulk`; its sub-tasks carry the rank a worker
claims them in (interactive, then bulk round-robin by seq, then shadow), with an index for
that claim; `batch_status` shows the priority.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# `batch_status` as 0001 made it; this revision adds `priority` at its end.
BATCH_STATUS = """
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
        b.error{priority}
    FROM batches b
"""


def upgrade() -> None:
    op.add_column("batches", sa.Column("priority", sa.Text, nullable=False, server_default="bulk"))
    op.create_check_constraint("batches_priority_known", "batches", "priority IN ('interactive', 'bulk')")
    # Batches already stored keep the rank of bulk work (1): nothing is reordered by the upgrade.
    op.add_column("subtasks", sa.Column("priority", sa.SmallInteger, nullable=False, server_default="1"))
    op.create_index(
        "subtasks_dispatched_by_priority",
        "subtasks",
        ["model", "priority", "seq", "id"],
        postgresql_where=sa.text("state = 'dispatched'"),
    )
    op.execute("CREATE OR REPLACE VIEW batch_status AS" + BATCH_STATUS.format(priority=",\n        b.priority"))


def downgrade() -> None:
    op.execute("DROP VIEW batch_status")
    op.execute("CREATE VIEW batch_status AS" + BATCH_STATUS.format(priority=""))
    op.drop_index("subtasks_dispatched_by_priority", "subtasks")
    op.drop_column("subtasks", "priority")
    op.drop_constraint("batches_priority_known", "batches")
    op.drop_column("batches", "priority")

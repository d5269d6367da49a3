"""Per-batch failure policy and deadline.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("failure_policy", sa.Text, nullable=False, server_default="best_effort"))
    op.add_column("batches", sa.Column("max_failed_fraction", sa.Float))
    op.add_column("batches", sa.Column("deadline_at", postgresql.TIMESTAMP(timezone=True)))
    op.create_check_constraint(
        "batches_failure_policy_known", "batches", "failure_policy IN ('best_effort', 'fail_fast')"
    )
    op.create_check_constraint(
        "batches_max_failed_fraction_range", "batches", "max_failed_fraction > 0 AND max_failed_fraction <= 1"
    )


def downgrade() -> None:
    op.drop_constraint("batches_max_failed_fraction_range", "batches")
    op.drop_constraint("batches_failure_policy_known", "batches")
    op.drop_column("batches", "deadline_at")
    op.drop_column("batches", "max_failed_fraction")
    op.drop_column("batches", "failure_policy")

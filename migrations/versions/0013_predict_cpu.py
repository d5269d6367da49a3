"""The CPU seconds a worker spent in a sub-task's predict call, for the roll-out gate.

- `subtasks.predict_cpu_s`: CPU time of the worker process in the model's predict call
  (`time.process_time`), set when the sub-task succeeds; NULL before revision 0013 and
  for failed sub-tasks. Wall time (`finished_at - started_at`) depends on what else the
  machine runs at that moment: shadow work runs after its batch's serve work, beside
  the aggregate, so comparing wall times compares moments, not versions.

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("subtasks", sa.Column("predict_cpu_s", sa.Float, nullable=True))


def downgrade() -> None:
    op.drop_column("subtasks", "predict_cpu_s")

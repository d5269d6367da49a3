"""A shadow sub-task's paired timing: the champion's predict CPU seconds on the same rows.

The roll-out gate's latency check compared a shadow's CPU per row with its serve twin's,
timed at another moment in other company: a small batch's serve sub-tasks run back to back
in one turn (the model's trees stay in cache), its shadows one at a time after it, beside
other work. An identical forest measured 1.4-1.7x slower that way. The worker running a
shadow sub-task now times the champion on the same rows in the same turn (in alternating
order), and the gate compares those pairs.

Revision ID: 0019
Revises: 0018
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("subtasks", sa.Column("champion_cpu_s", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("subtasks", "champion_cpu_s")

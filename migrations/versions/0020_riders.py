"""A small batch's riders: sub-tasks published on another one's message.

A worker whose turn claims one of a small batch's sub-tasks claims the batch's first
`dispatched` sub-task of every model it serves with it, so of the models the same live
workers consume, the client publishes one message and the others' sub-tasks ride on it.
A message claims its model's best dispatched sub-task, whichever batch it belongs to: when
that is a rider, which has no message of its own, the sub-task the message was published
for is left without one, so the worker publishes that message again. `rides` marks them
until the sweeper publishes them (their lease is short: the heartbeats' age).

Revision ID: 0020
Revises: 0019
"""

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("subtasks", sa.Column("rides", sa.Boolean(), server_default=sa.text("false"), nullable=False))


def downgrade() -> None:
    op.drop_column("subtasks", "rides")

"""When a pending batch's split was last published, so the sweeper republishes it once a
lease, not at every sweep.

- `batches.split_published_at`: set by the sweeper each time it publishes the split of a
  batch still `pending`; NULL until then (the client's own publish is `created_at`).

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("split_published_at", postgresql.TIMESTAMP(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("batches", "split_published_at")

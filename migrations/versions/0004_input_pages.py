"""Inputs stored in pages (packed float32 features or one JSON array per page), the
split committed step by step (`batches.split_items`), and the packed float32
columns stored uncompressed (they do not compress; trying costs CPU).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

PACKED_COLUMNS = (("subtasks", "payload"), ("subtasks", "output"), ("input_pages", "features"))


def upgrade() -> None:
    op.drop_table("inputs")
    op.create_table(
        "input_pages",
        sa.Column(
            "batch_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("first_item", sa.Integer, primary_key=True),
        sa.Column("items", sa.Integer, nullable=False),
        sa.Column("features", sa.LargeBinary),
        sa.Column("data", postgresql.JSON),
        sa.CheckConstraint("items > 0", name="input_pages_items_positive"),
    )
    op.add_column("batches", sa.Column("split_items", sa.Integer, nullable=False, server_default="0"))
    for table, column in PACKED_COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_column("batches", "split_items")
    op.drop_table("input_pages")
    op.create_table(
        "inputs",
        sa.Column(
            "batch_id",
            postgresql.UUID(as_uuid=True),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("item", sa.Integer, primary_key=True),
        sa.Column("data", postgresql.JSONB, nullable=False),
    )
    for table, column in PACKED_COLUMNS[:2]:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE EXTENDED")

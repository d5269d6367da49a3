"""Dead letters: one row per message a worker or aggregator refused as malformed.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

REASONS = "('shape','arguments','unknown_task','content_type','undecodable','invalid')"


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text),
        sa.Column("task", sa.Text),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("content_type", sa.Text),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column(
            "received_at",
            postgresql.TIMESTAMP(timezone=True),
            nullable=False,
            server_default=sa.text("clock_timestamp()"),
        ),
        sa.CheckConstraint(f"reason IN {REASONS}", name="dead_letters_reason_known"),
    )
    # pipeline_rejected_messages_total reads (queue, reason) from this index alone.
    op.create_index("dead_letters_queue_reason", "dead_letters", ["queue", "reason"])


def downgrade() -> None:
    op.drop_table("dead_letters")

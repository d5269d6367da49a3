"""An index for a model's cost per row: its newest succeeded sub-tasks of at least 1,000 rows.

The split caps a bulk batch's chunks at `PIPELINE_BULK_CHUNK_MS` of predict CPU, from what
each model's recent large sub-tasks took per row (`ledger.model_row_costs`); this partial
index lets it read them backwards in a few pages, whatever the table's size.

Revision ID: 0017
Revises: 0016
"""

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX subtasks_model_cost ON subtasks (model, id)"
        " WHERE state = 'succeeded' AND predict_cpu_s IS NOT NULL AND rows >= 1000"
    )


def downgrade() -> None:
    op.drop_index("subtasks_model_cost", table_name="subtasks")

"""Idempotency fingerprints, results readiness in `batch_status`, worker heartbeats.

- `batches.request_sha256`: the SHA-256 of a keyed submission (pipeline, options, inputs
  as stored); the same key with another fingerprint is refused. NULL without a key, and
  for batches stored before this revision (their key is accepted as before);
- view `batch_status` gains `results_ready`: a cancelled batch is `cancelled` at once, but
  its results are written later, when its running sub-tasks have finished;
- `worker_heartbeats`: each worker and aggregator process records every few seconds which
  queues it consumes, so a batch waiting on a queue nobody serves can say so.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TS = postgresql.TIMESTAMP(timezone=True)

# The view's columns as revision 0006 left them (0001's, then `priority`).
BATCH_STATUS_COLUMNS = """
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
    b.error,
    b.priority"""

# A cancelled batch is `cancelled` at once and has its results written later, by its one
# aggregate run; the other final states are set once the results are written.
RESULTS_READY = """
    b.state IN ('succeeded', 'partial', 'failed') OR (b.state = 'cancelled' AND b.aggregate_runs > 0)
        AS results_ready"""


def upgrade() -> None:
    op.add_column("batches", sa.Column("request_sha256", sa.Text))
    # New columns go last: CREATE OR REPLACE VIEW keeps the existing ones in place.
    op.execute(f"CREATE OR REPLACE VIEW batch_status AS SELECT {BATCH_STATUS_COLUMNS},{RESULTS_READY} FROM batches b")
    op.create_table(
        "worker_heartbeats",
        # The Celery node name, e.g. models-4242@host.
        sa.Column("worker", sa.Text, primary_key=True),
        sa.Column("queues", postgresql.ARRAY(sa.Text), nullable=False),
        sa.Column("started_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.Column("beat_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
    )


def downgrade() -> None:
    op.drop_table("worker_heartbeats")
    # A view loses a column only by being created again.
    op.execute("DROP VIEW batch_status")
    op.execute(f"CREATE VIEW batch_status AS SELECT {BATCH_STATUS_COLUMNS} FROM batches b")
    op.drop_column("batches", "request_sha256")

"""Roll-outs: a challenger version tried on live batches, in shadow or as a canary.

- `rollouts`: one row per roll-out of a model's version (`mode` shadow | canary, the
  canary's `percent`), `state` active → promoted | aborted, who started and ended it and
  why, and the latest gate (`pipeline.gate.GateResult` as JSON); at most one `active`
  per model (a partial unique index);
- `rollout_batches`: the batches whose split pinned a roll-out's version (the gate's
  evidence is read from their sub-tasks);
- `subtasks.role`: `serve` (the batch's results and counters) or `shadow` (a copy of a
  serve sub-task's rows scored by the challenger, never counted);
- `model_events.event` gains the roll-out's kinds (started, verdict, promoted, aborted).

Expand-only: the new column has a default, the widened CHECK accepts every existing row.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TS = postgresql.TIMESTAMP(timezone=True)
OLD_EVENTS = "('registered','alias_set','rollback')"
EVENTS = (
    "('registered','alias_set','rollback','rollout_started','rollout_verdict','rollout_promoted','rollout_aborted')"
)


def upgrade() -> None:
    op.add_column("subtasks", sa.Column("role", sa.Text, nullable=False, server_default="serve"))
    op.create_check_constraint("subtasks_role_known", "subtasks", "role IN ('serve','shadow')")
    op.drop_constraint("model_events_event_known", "model_events")
    op.create_check_constraint("model_events_event_known", "model_events", f"event IN {EVENTS}")
    op.create_table(
        "rollouts",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("mode", sa.Text, nullable=False),
        # A canary's share of inputs in percent; NULL for a shadow roll-out.
        sa.Column("percent", sa.Float),
        sa.Column("state", sa.Text, nullable=False, server_default="active"),
        sa.Column("started_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.Column("started_by", sa.Text, nullable=False),
        sa.Column("ended_at", TS),
        sa.Column("ended_by", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("gate", postgresql.JSONB),
        sa.CheckConstraint("mode IN ('shadow','canary')", name="rollouts_mode_known"),
        sa.CheckConstraint("state IN ('active','promoted','aborted')", name="rollouts_state_known"),
        sa.CheckConstraint(
            "(mode = 'canary') = (percent IS NOT NULL) AND (percent IS NULL OR (percent > 0 AND percent < 100))",
            name="rollouts_percent_of_canary",
        ),
        sa.CheckConstraint("(state = 'active') = (ended_at IS NULL)", name="rollouts_ended_when_not_active"),
        sa.ForeignKeyConstraint(["model", "version"], ["model_versions.model", "model_versions.version"]),
    )
    op.create_index(
        "rollouts_one_active_per_model",
        "rollouts",
        ["model"],
        unique=True,
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_table(
        "rollout_batches",
        sa.Column("rollout_id", sa.BigInteger, sa.ForeignKey("rollouts.id"), primary_key=True),
        sa.Column(
            "batch_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("added_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
    )
    op.create_index("rollout_batches_batch", "rollout_batches", ["batch_id"])


def downgrade() -> None:
    op.drop_table("rollout_batches")
    op.drop_table("rollouts")
    op.drop_constraint("model_events_event_known", "model_events")
    op.create_check_constraint("model_events_event_known", "model_events", f"event IN {OLD_EVENTS}")
    op.drop_constraint("subtasks_role_known", "subtasks")
    op.drop_column("subtasks", "role")

"""The model registry: every model is a line of versions, one of which serves.

- `model_versions`: one row per (model, artifact SHA-256): its manifest, metrics, where it
  came from and who made it; the artifact itself in `artifact` (bytea) up to
  PIPELINE_REGISTRY_INLINE_MAX_BYTES, else in the content-addressed store directory
  (`artifact_path`, relative to PIPELINE_REGISTRY_STORE_DIR): exactly one of the two;
- `model_aliases`: which version is a model's `champion` (and `challenger`);
- `model_events`: append-only history of every registration and alias change (a trigger
  refuses UPDATE and DELETE).

`subtasks.model_version` (revision 0001) now holds the version the split pinned;
`batches.model_versions` the versions (model → version) its first split step pinned, which
its later steps keep.

Schema only: this migration does not read PIPELINE_MODELS_DIR. A migration runs wherever
`pipeline migrate` runs (often a host or job without the models volume), must be
repeatable from the database alone, and loading artifacts would import every pipeline's
libraries into Alembic. The existing artifacts become each model's first, champion
version when `pipeline migrate`, `pipeline models train` or a worker start finds them
(`pipeline.model_registry.adopt_models_dir`, idempotent).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TS = postgresql.TIMESTAMP(timezone=True)
SOURCES = "('trained','registered','migrated')"
ALIASES = "('champion','challenger')"
EVENTS = "('registered','alias_set','rollback')"

APPEND_ONLY = """
CREATE FUNCTION model_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'model_events is append-only';
END $$;
CREATE TRIGGER model_events_append_only BEFORE UPDATE OR DELETE ON model_events
  FOR EACH ROW EXECUTE FUNCTION model_events_append_only();
"""


def upgrade() -> None:
    op.add_column("batches", sa.Column("model_versions", postgresql.JSONB))
    op.create_table(
        "model_versions",
        sa.Column("model", sa.Text, primary_key=True),
        # The artifact's SHA-256, 64 lowercase hex digits.
        sa.Column("version", sa.Text, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("manifest", postgresql.JSONB, nullable=False),
        sa.Column("metrics", postgresql.JSONB, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("artifact", sa.LargeBinary),
        sa.Column("artifact_path", sa.Text),
        sa.Column("created_by", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.CheckConstraint("version ~ '^[0-9a-f]{64}$'", name="model_versions_version_sha256"),
        sa.CheckConstraint(f"source IN {SOURCES}", name="model_versions_source_known"),
        sa.CheckConstraint(
            "(artifact IS NULL) <> (artifact_path IS NULL)", name="model_versions_artifact_in_one_place"
        ),
    )
    op.create_table(
        "model_aliases",
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("alias", sa.Text, primary_key=True),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("set_at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.Column("set_by", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.CheckConstraint(f"alias IN {ALIASES}", name="model_aliases_alias_known"),
        sa.ForeignKeyConstraint(["model", "version"], ["model_versions.model", "model_versions.version"]),
    )
    op.create_table(
        "model_events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        # The alias an `alias_set` or `rollback` event moved; NULL for a registration.
        sa.Column("alias", sa.Text),
        # The version the alias named before (NULL: it named none).
        sa.Column("previous_version", sa.Text),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("at", TS, nullable=False, server_default=sa.text("clock_timestamp()")),
        sa.CheckConstraint(f"event IN {EVENTS}", name="model_events_event_known"),
    )
    op.create_index("model_events_model_at", "model_events", ["model", "at"])
    op.execute(APPEND_ONLY)


def downgrade() -> None:
    op.drop_table("model_events")
    op.execute("DROP FUNCTION model_events_append_only()")
    op.drop_table("model_aliases")
    op.drop_table("model_versions")
    op.drop_column("batches", "model_versions")

"""Monitoring rollups folded after the aggregate, not in it.

- `monitor_contributions.folded`: whether the contribution is in its hour's rollup. A
  batch's aggregate only inserts its contributions (unfolded); `fold_contributions` later
  adds them to the rollups and marks them folded in one statement, so a crash in between
  loses nothing and folds nothing twice. Windows read the unfolded contributions
  themselves. Existing contributions are all in their rollups (folded);
- `monitor_contributions.unfolded_bins`: the bin counts as `bigint[]` until folded (the
  fold adds them; NULL once folded), since summing the int64 bytes of `bin_counts` in SQL
  takes a function call per byte;
- partial index `monitor_contributions_unfolded` (pipeline, finished_at) on the unfolded;
- view `monitor_contribution_parts` gains `folded`;
- the trigger that re-sums the rollups of deleted contributions' hours sums the folded
  contributions left only.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

PARTS_VIEW = """
CREATE OR REPLACE VIEW monitor_contribution_parts AS
SELECT c.id, c.pipeline, c.model, c.model_version, c.finished_at, monitor_bucket(c.finished_at) AS bucket_start,
  1 AS batches, c.items, c.rows, c.bin_counts, monitor_kpi_sums(c.kpis, c.items) AS kpi_sums,
  monitor_kpi_items(c.kpis, c.items) AS kpi_items, c.label_counts,
  monitor_latency_histogram(c.latency_s) AS latency_histogram, c.estimate_sums{folded}
FROM monitor_contributions c
"""
# The rollups of the contributions {which} selects, summed again.
ROLLUPS_FROM_CONTRIBUTIONS = """
INSERT INTO monitor_rollups
SELECT p.pipeline, p.model, p.model_version, p.bucket_start, count(*), sum(p.items), sum(p.rows),
  min(p.finished_at), max(p.finished_at), monitor_counts_sum(monitor_counts(p.bin_counts)),
  monitor_jsonb_sum(p.kpi_sums), monitor_jsonb_sum(p.kpi_items), monitor_jsonb_sum(p.label_counts),
  monitor_jsonb_sum(p.latency_histogram), monitor_jsonb_sum(p.estimate_sums)
FROM monitor_contribution_parts p {which}
GROUP BY p.pipeline, p.model, p.model_version, p.bucket_start
"""
TOUCHED = "SELECT DISTINCT g.pipeline, g.model, g.model_version, monitor_bucket(g.finished_at) FROM gone g"
FORGET = """
CREATE OR REPLACE FUNCTION monitor_rollups_forget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM monitor_rollups r WHERE (r.pipeline, r.model, r.model_version, r.bucket_start) IN ({touched});
  {insert};
  RETURN NULL;
END $$;
"""


def _forget(folded: str) -> str:
    """The trigger function re-summing the touched hours from the contributions `folded` selects."""
    which = f"WHERE {folded}(p.pipeline, p.model, p.model_version, p.bucket_start) IN ({TOUCHED})"
    return FORGET.format(touched=TOUCHED, insert=ROLLUPS_FROM_CONTRIBUTIONS.format(which=which).strip())


def upgrade() -> None:
    # Existing rows are in their rollups; new ones are not until folded.
    op.add_column("monitor_contributions", sa.Column("folded", sa.Boolean, nullable=False, server_default=sa.true()))
    op.alter_column("monitor_contributions", "folded", server_default=sa.false())
    op.add_column("monitor_contributions", sa.Column("unfolded_bins", postgresql.ARRAY(sa.BigInteger)))
    op.create_index(
        "monitor_contributions_unfolded",
        "monitor_contributions",
        ["pipeline", "finished_at"],
        postgresql_where=sa.text("NOT folded"),
    )
    op.execute(PARTS_VIEW.format(folded=", c.folded"))
    op.execute(_forget("p.folded AND "))


def downgrade() -> None:
    # Revision 0014 keeps every contribution in its rollup: sum them all again.
    op.execute("TRUNCATE monitor_rollups")
    op.execute(ROLLUPS_FROM_CONTRIBUTIONS.format(which=""))
    op.execute(_forget(""))
    op.execute("DROP VIEW monitor_contribution_parts")
    op.execute(PARTS_VIEW.format(folded="").replace("CREATE OR REPLACE", "CREATE"))
    op.drop_index("monitor_contributions_unfolded", table_name="monitor_contributions")
    op.drop_column("monitor_contributions", "unfolded_bins")
    op.drop_column("monitor_contributions", "folded")

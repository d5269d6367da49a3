"""Monitoring rollups: windows read hourly sums instead of every batch's contribution.

- `monitor_rollups`: per pipeline, model, model version and hour (`bucket_start`, UTC
  hours from the epoch): its contributions' batches, inputs, rows, first and last finish
  time, summed drift bin counts (`bigint[]`), KPI sums (`kpi_sums`: each numeric KPI times
  the batch's inputs; `kpi_items`: the inputs that reported it), label counts, a latency
  histogram (2 %-wide buckets, `monitor_latency_bucket`) and the CBPE sums. Kept in the
  statement that stores a batch's contributions (an UPSERT adding element-wise) and in the
  one that stores a batch's label counts (adding the difference); backfilled here;
- `monitor_contributions.estimate_sums`: the CBPE sums one batch adds (docs/monitoring.md,
  "Performance without labels");
- view `batch_metrics` gains `estimated_kpis` (`metrics.estimated`);
- SQL functions the writers and the window query share: `monitor_bucket`,
  `monitor_latency_bucket`, `monitor_counts` (the contributions' int64 bytes as `bigint[]`),
  `monitor_jsonb_combine` / `monitor_jsonb_add`, `monitor_counts_add` and its aggregate
  `monitor_counts_sum`, `monitor_kpi_sums`, `monitor_kpi_items`, `monitor_latency_histogram`;
- view `monitor_contribution_parts`: each contribution in a rollup's shape (what a window
  reads for the hours it does not cover whole).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TS = postgresql.TIMESTAMP(timezone=True)

# The view's columns as revision 0008 left them.
BATCH_METRICS_0008 = """
    b.id, b.pipeline, b.state, b.items, b.finished_at,
    (b.metrics #>> '{latency,end_to_end_s}')::float8 AS end_to_end_s,
    (b.metrics #>> '{latency,aggregation_s}')::float8 AS aggregation_s,
    (b.metrics #>> '{latency,items_per_s}')::float8 AS items_per_s,
    (b.metrics #>> '{latency,subtasks,queue_wait_s,p95}')::float8 AS wait_p95_s,
    (b.metrics #>> '{latency,subtasks,compute_s,p95}')::float8 AS compute_p95_s,
    b.metrics -> 'kpis' AS kpis,
    (b.metrics #>> '{drift,drifted}')::boolean AS drifted,
    b.metrics #> '{drift,drifted_features}' AS drifted_features,
    (b.metrics #>> '{drift,drifted_share}')::float8 AS drifted_share,
    coalesce((b.metrics #>> '{realised,labelled_share}')::float8, 0) AS labelled_share,
    b.metrics #> '{realised,kpis}' AS realised_kpis"""
ESTIMATED_COLUMN = "b.metrics -> 'estimated' AS estimated_kpis"
HAS_METRICS = "b.metrics IS NOT NULL"

FUNCTIONS = r"""
-- The hour a contribution counts in (UTC, whatever the session's time zone).
CREATE FUNCTION monitor_bucket(at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN date_bin('1 hour', at, TIMESTAMPTZ '2000-01-01 00:00:00+00');

-- The latency histogram's bucket: k holds latencies in (1 ms * 1.02^(k-1), 1 ms * 1.02^k].
CREATE FUNCTION monitor_latency_bucket(latency_s float8) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN greatest(0, ceil(ln(greatest(latency_s, 0.001) / 0.001) / ln(1.02)))::int;

-- Key-wise total + factor * part of two JSON objects of numbers (NULL is the empty object).
CREATE FUNCTION monitor_jsonb_combine(total jsonb, part jsonb, factor numeric) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (
  SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}'::jsonb) FROM (
    SELECT s.key, sum(s.value) AS value FROM (
      SELECT t.key, t.value::text::numeric AS value FROM jsonb_each(coalesce(total, '{}'::jsonb)) AS t
      UNION ALL
      SELECT p.key, p.value::text::numeric * factor FROM jsonb_each(coalesce(part, '{}'::jsonb)) AS p
    ) AS s GROUP BY s.key
  ) AS e
);

CREATE FUNCTION monitor_jsonb_add(total jsonb, part jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN monitor_jsonb_combine(total, part, 1);

-- What a batch adds to a window's KPI means: each numeric KPI times its inputs, and those inputs.
CREATE FUNCTION monitor_kpi_sums(kpis jsonb, items bigint) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT coalesce(jsonb_object_agg(e.key, e.value::text::numeric * items), '{}'::jsonb)
        FROM jsonb_each(kpis) AS e WHERE jsonb_typeof(e.value) = 'number');

CREATE FUNCTION monitor_kpi_items(kpis jsonb, items bigint) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (SELECT coalesce(jsonb_object_agg(e.key, items), '{}'::jsonb)
        FROM jsonb_each(kpis) AS e WHERE jsonb_typeof(e.value) = 'number');

-- One batch's latency as a histogram: {bucket: 1}, or empty without one.
CREATE FUNCTION monitor_latency_histogram(latency_s float8) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN latency_s IS NULL THEN '{}'::jsonb
  ELSE jsonb_build_object(monitor_latency_bucket(latency_s)::text, 1) END;

CREATE AGGREGATE monitor_jsonb_sum(jsonb) (SFUNC = monitor_jsonb_add, STYPE = jsonb);

-- Element-wise total + factor * part of two count arrays of one length (NULL is nothing).
CREATE FUNCTION monitor_counts_combine(total bigint[], part bigint[], factor bigint) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN part IS NULL THEN total
  ELSE ARRAY(SELECT coalesce(a, 0) + factor * b FROM unnest(total, part) WITH ORDINALITY AS u (a, b, i) ORDER BY i) END;

CREATE FUNCTION monitor_counts_add(total bigint[], part bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN monitor_counts_combine(total, part, 1);

CREATE AGGREGATE monitor_counts_sum(bigint[]) (SFUNC = monitor_counts_add, STYPE = bigint[]);

-- A contribution's bin counts (int64 little-endian bytes) as an array; for the backfill.
CREATE FUNCTION monitor_counts(counts bytea) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY(
  SELECT (SELECT sum(get_byte(counts, 8 * i + j)::bigint << (8 * j)) FROM generate_series(0, 7) AS j)::bigint
  FROM generate_series(0, length(counts) / 8 - 1) AS i ORDER BY i
);
"""
DROP_FUNCTIONS = """
DROP FUNCTION monitor_counts(bytea);
DROP AGGREGATE monitor_counts_sum(bigint[]);
DROP FUNCTION monitor_counts_add(bigint[], bigint[]);
DROP FUNCTION monitor_counts_combine(bigint[], bigint[], bigint);
DROP AGGREGATE monitor_jsonb_sum(jsonb);
DROP FUNCTION monitor_latency_histogram(float8);
DROP FUNCTION monitor_kpi_items(jsonb, bigint);
DROP FUNCTION monitor_kpi_sums(jsonb, bigint);
DROP FUNCTION monitor_jsonb_add(jsonb, jsonb);
DROP FUNCTION monitor_jsonb_combine(jsonb, jsonb, numeric);
DROP FUNCTION monitor_latency_bucket(float8);
DROP FUNCTION monitor_bucket(timestamptz);
"""

PARTS_VIEW = """
CREATE VIEW monitor_contribution_parts AS
SELECT c.id, c.pipeline, c.model, c.model_version, c.finished_at, monitor_bucket(c.finished_at) AS bucket_start,
  1 AS batches, c.items, c.rows, c.bin_counts, monitor_kpi_sums(c.kpis, c.items) AS kpi_sums,
  monitor_kpi_items(c.kpis, c.items) AS kpi_items, c.label_counts,
  monitor_latency_histogram(c.latency_s) AS latency_histogram, c.estimate_sums
FROM monitor_contributions c
"""
# Every rollup, or (with a WHERE in place of {which}) those of some hours.
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


# Contributions deleted (with their batches): their hours' rollups summed again from the
# contributions left (exact, bounds included; deleting batches is rare and set-based).
FORGET_TRIGGERS = f"""
CREATE FUNCTION monitor_rollups_forget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM monitor_rollups r WHERE (r.pipeline, r.model, r.model_version, r.bucket_start) IN ({TOUCHED});
  {
    ROLLUPS_FROM_CONTRIBUTIONS.format(
        which=f"WHERE (p.pipeline, p.model, p.model_version, p.bucket_start) IN ({TOUCHED})"
    ).strip()
};
  RETURN NULL;
END $$;
CREATE TRIGGER monitor_rollups_forget AFTER DELETE ON monitor_contributions
  REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION monitor_rollups_forget();

CREATE FUNCTION monitor_rollups_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  TRUNCATE monitor_rollups;
  RETURN NULL;
END $$;
CREATE TRIGGER monitor_rollups_truncate AFTER TRUNCATE ON monitor_contributions
  FOR EACH STATEMENT EXECUTE FUNCTION monitor_rollups_truncate();
"""


def upgrade() -> None:
    op.execute(FUNCTIONS)
    op.add_column("monitor_contributions", sa.Column("estimate_sums", postgresql.JSONB))
    op.create_table(
        "monitor_rollups",
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("model_version", sa.Text, nullable=False),
        sa.Column("bucket_start", TS, nullable=False),
        sa.Column("batches", sa.BigInteger, nullable=False),
        sa.Column("items", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.BigInteger, nullable=False),
        sa.Column("first_finished", TS, nullable=False),
        sa.Column("last_finished", TS, nullable=False),
        sa.Column("bin_counts", postgresql.ARRAY(sa.BigInteger)),
        sa.Column("kpi_sums", postgresql.JSONB, nullable=False),
        sa.Column("kpi_items", postgresql.JSONB, nullable=False),
        sa.Column("label_counts", postgresql.JSONB),
        sa.Column("latency_histogram", postgresql.JSONB, nullable=False),
        sa.Column("estimate_sums", postgresql.JSONB),
        sa.PrimaryKeyConstraint("pipeline", "model", "model_version", "bucket_start"),
    )
    op.create_index("monitor_rollups_window", "monitor_rollups", ["pipeline", "bucket_start"])
    # The last-rows windows walk each model version's contributions newest first.
    op.create_index(
        "monitor_contributions_version",
        "monitor_contributions",
        ["pipeline", "model", "model_version", sa.text("finished_at DESC"), sa.text("id DESC")],
    )
    op.execute(PARTS_VIEW)
    op.execute(ROLLUPS_FROM_CONTRIBUTIONS.format(which=""))
    op.execute(FORGET_TRIGGERS)
    op.execute(
        f"CREATE OR REPLACE VIEW batch_metrics AS SELECT {BATCH_METRICS_0008}, {ESTIMATED_COLUMN}"
        f" FROM batches b WHERE {HAS_METRICS}"
    )


def downgrade() -> None:
    op.execute("DROP VIEW batch_metrics")
    op.execute(f"CREATE VIEW batch_metrics AS SELECT {BATCH_METRICS_0008} FROM batches b WHERE {HAS_METRICS}")
    op.execute("DROP TRIGGER monitor_rollups_truncate ON monitor_contributions")
    op.execute("DROP FUNCTION monitor_rollups_truncate()")
    op.execute("DROP TRIGGER monitor_rollups_forget ON monitor_contributions")
    op.execute("DROP FUNCTION monitor_rollups_forget()")
    op.execute("DROP VIEW monitor_contribution_parts")
    op.drop_index("monitor_contributions_version", table_name="monitor_contributions")
    op.drop_table("monitor_rollups")
    op.drop_column("monitor_contributions", "estimate_sums")
    op.execute(DROP_FUNCTIONS)

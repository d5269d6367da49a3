"""Views over the metrics: model_latency, per-model queue wait and compute
percentiles over the finished sub-tasks of the batches submitted in the last 24
hours; batch_metrics, the headline figures of every finished batch's metrics.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Recent batches are found through batches.created_at, then their sub-tasks through
    # the (batch_id, model, seq) unique index: no scan of the whole subtasks table.
    op.execute(
        """
        CREATE VIEW model_latency AS
        WITH timed AS (
            SELECT
                s.model,
                s.batch_id,
                s.rows,
                extract(epoch FROM s.started_at - s.queued_at)::float8 AS wait_s,
                extract(epoch FROM s.finished_at - s.started_at)::float8 AS compute_s
            FROM batches b
            JOIN subtasks s ON s.batch_id = b.id
            WHERE b.created_at > clock_timestamp() - interval '24 hours'
              AND s.state IN ('succeeded', 'failed')
              AND s.started_at IS NOT NULL
              AND s.finished_at IS NOT NULL
        )
        SELECT
            model,
            count(DISTINCT batch_id) AS batches,
            count(*) AS subtasks,
            sum(rows) AS rows,
            percentile_cont(0.5) WITHIN GROUP (ORDER BY wait_s) AS wait_p50_s,
            percentile_cont(0.95) WITHIN GROUP (ORDER BY wait_s) AS wait_p95_s,
            percentile_cont(0.99) WITHIN GROUP (ORDER BY wait_s) AS wait_p99_s,
            max(wait_s) AS wait_max_s,
            percentile_cont(0.5) WITHIN GROUP (ORDER BY compute_s) AS compute_p50_s,
            percentile_cont(0.95) WITHIN GROUP (ORDER BY compute_s) AS compute_p95_s,
            percentile_cont(0.99) WITHIN GROUP (ORDER BY compute_s) AS compute_p99_s,
            max(compute_s) AS compute_max_s,
            sum(rows) / nullif(sum(compute_s), 0) AS rows_per_compute_s
        FROM timed
        GROUP BY model
        """
    )
    op.execute(
        """
        CREATE VIEW batch_metrics AS
        SELECT
            b.id,
            b.pipeline,
            b.state,
            b.items,
            b.finished_at,
            (b.metrics #>> '{latency,end_to_end_s}')::float8 AS end_to_end_s,
            (b.metrics #>> '{latency,aggregation_s}')::float8 AS aggregation_s,
            (b.metrics #>> '{latency,items_per_s}')::float8 AS items_per_s,
            (b.metrics #>> '{latency,subtasks,queue_wait_s,p95}')::float8 AS wait_p95_s,
            (b.metrics #>> '{latency,subtasks,compute_s,p95}')::float8 AS compute_p95_s,
            b.metrics -> 'kpis' AS kpis,
            (b.metrics #>> '{drift,drifted}')::boolean AS drifted,
            b.metrics #> '{drift,drifted_features}' AS drifted_features,
            (b.metrics #>> '{drift,drifted_share}')::float8 AS drifted_share
        FROM batches b
        WHERE b.metrics IS NOT NULL
        """
    )


def downgrade() -> None:
    op.execute("DROP VIEW batch_metrics")
    op.execute("DROP VIEW model_latency")

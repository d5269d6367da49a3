"""Every result names the model versions that scored its input.

- `result_pages.versions`: JSON array, per input null (the batch's pinned
  `batches.model_versions`) or an object of the models whose version differs for it: the
  version (a canary's challenger), or null where the model scored none of its rows (its
  sub-task failed or was cancelled, the input was never split); NULL for a page where every
  input has the pinned versions (no canary, no failure): no per-input cost then;
- view `results` gains `model_versions` (jsonb {model: version}): the batch's pinned
  versions merged with the input's overrides, nulls dropped.

Expand-only: existing pages have `versions` NULL, so their inputs read the batch's pinned
versions (`{}` for a batch split before revision 0010, which pinned none).

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# As revision 0004's view, plus `model_versions`; the LEFT JOIN on the batch's key is
# removed by the planner when a query does not read `model_versions`.
RESULTS_VIEW = """
CREATE VIEW results AS
SELECT
    p.batch_id,
    p.first_item + (r.n - 1)::int AS item,
    CASE WHEN json_typeof(r.output) <> 'null' THEN r.output END AS output,
    r.error,
    CASE WHEN json_typeof(r.versions) = 'object'
        THEN jsonb_strip_nulls(coalesce(b.model_versions, '{}'::jsonb) || r.versions::jsonb)
        ELSE coalesce(b.model_versions, '{}'::jsonb)
    END AS model_versions
FROM result_pages p
    LEFT JOIN batches b ON b.id = p.batch_id,
    ROWS FROM (json_array_elements(p.outputs), json_array_elements_text(p.errors), json_array_elements(p.versions))
        WITH ORDINALITY AS r(output, error, versions, n)
"""

OLD_RESULTS_VIEW = """
CREATE VIEW results AS
SELECT
    p.batch_id,
    p.first_item + (r.n - 1)::int AS item,
    CASE WHEN json_typeof(r.output) <> 'null' THEN r.output END AS output,
    r.error
FROM result_pages p,
    ROWS FROM (json_array_elements(p.outputs), json_array_elements_text(p.errors))
        WITH ORDINALITY AS r(output, error, n)
"""


def upgrade() -> None:
    op.add_column("result_pages", sa.Column("versions", postgresql.JSON, nullable=True))
    # As the other JSON page columns (revision 0004): lz4 where the server is built with it.
    methods = (
        op.get_bind()
        .execute(sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'"))
        .scalar_one()
    )
    if "lz4" in methods:
        op.execute("ALTER TABLE result_pages ALTER COLUMN versions SET COMPRESSION lz4")
    op.execute("DROP VIEW results")
    op.execute(RESULTS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW results")
    op.execute(OLD_RESULTS_VIEW)
    op.drop_column("result_pages", "versions")

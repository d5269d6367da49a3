"""Inputs and results stored in pages; `results` becomes a view with one row per input.

- `input_pages`: packed float32 features, or one JSON array per page of inputs;
- `result_pages`: per page one JSON array of outputs and one of errors; the `results`
  view unnests them (writing a million result rows cost several seconds of COPY and
  JSONB parsing; a page costs one row);
- `batches.split_items`: the split commits step by step and resumes from there;
- `subtasks.bin_counts`: drift bin counts made by the worker;
- `subtasks.payload` may be NULL: the rows are then the inputs' stored features;
- the packed columns are stored uncompressed (they do not compress; trying costs CPU).

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

# One row per input, in (batch_id, item) order within a page; `output` is SQL NULL
# where the input has no result, and `error` then says why.
RESULTS_VIEW = """
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

JSON_PAGE_COLUMNS = (("result_pages", "outputs"), ("result_pages", "errors"), ("input_pages", "data"))
# Inputs per page of the rows converted from the old tables (pipeline.inputs.PAGE_ITEMS then).
PAGE_ITEMS = 10_000
PACKED_COLUMNS = (("subtasks", "payload"), ("subtasks", "output"), ("input_pages", "features"))


def _batch_id() -> sa.Column[object]:
    return sa.Column(
        "batch_id", postgresql.UUID(as_uuid=True), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )


def _page_table(name: str, *columns: sa.Column[object]) -> None:
    """A table of pages of a batch's consecutive inputs, keyed by (batch_id, first_item)."""
    op.create_table(
        name,
        _batch_id(),
        sa.Column("first_item", sa.Integer, primary_key=True),
        sa.Column("items", sa.Integer, nullable=False),
        *columns,
        sa.CheckConstraint("items > 0", name=f"{name}_items_positive"),
    )


def upgrade() -> None:
    _page_table("input_pages", sa.Column("features", sa.LargeBinary), sa.Column("data", postgresql.JSON))
    _page_table(
        "result_pages", sa.Column("outputs", postgresql.JSON, nullable=False), sa.Column("errors", postgresql.JSON)
    )
    # Nothing stored is lost: the rows of the old per-input tables become pages (inputs as
    # whole JSON items, which every pipeline can read back; see Pipeline.with_features).
    op.execute(
        f"""
        INSERT INTO input_pages (batch_id, first_item, items, data)
        SELECT batch_id, min(item), count(*), json_agg(data ORDER BY item)
        FROM inputs GROUP BY batch_id, item / {PAGE_ITEMS}
        """
    )
    op.execute(
        f"""
        INSERT INTO result_pages (batch_id, first_item, items, outputs, errors)
        SELECT batch_id, min(item), count(*), json_agg(output ORDER BY item),
               CASE WHEN bool_or(error IS NOT NULL) THEN json_agg(error ORDER BY item) END
        FROM results GROUP BY batch_id, item / {PAGE_ITEMS}
        """
    )
    op.drop_table("inputs")
    op.drop_table("results")
    op.execute(RESULTS_VIEW)
    op.add_column("batches", sa.Column("split_items", sa.Integer, nullable=False, server_default="0"))
    # A batch past `pending` was split whole by the code before this revision.
    op.execute("UPDATE batches SET split_items = items WHERE state <> 'pending'")
    op.add_column("subtasks", sa.Column("bin_counts", sa.LargeBinary))
    # NULL: the rows are the inputs' stored features (no copy per model).
    op.alter_column("subtasks", "payload", nullable=True)
    for table, column in PACKED_COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE EXTERNAL")
    # JSON pages compress well; lz4 does it at a fraction of pglz's CPU (1M results: 1.4 s
    # of COPY instead of 2.3 s), where the server is built with it.
    methods = (
        op.get_bind()
        .execute(sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'"))
        .scalar_one()
    )
    if "lz4" in methods:
        for table, column in JSON_PAGE_COLUMNS:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4")


def downgrade() -> None:
    # Back to the per-input tables of revision 0001 (as 0001 created them); the pages' rows
    # are not converted back.
    op.alter_column("subtasks", "payload", nullable=False)
    op.drop_column("subtasks", "bin_counts")
    op.drop_column("batches", "split_items")
    op.execute("DROP VIEW results")
    op.drop_table("result_pages")
    op.create_table(
        "results",
        _batch_id(),
        sa.Column("item", sa.Integer, primary_key=True),
        sa.Column("output", postgresql.JSONB),
        sa.Column("error", sa.Text),
        sa.CheckConstraint("(output IS NULL) <> (error IS NULL)", name="results_output_xor_error"),
    )
    op.drop_table("input_pages")
    op.create_table(
        "inputs",
        _batch_id(),
        sa.Column("item", sa.Integer, primary_key=True),
        sa.Column("data", postgresql.JSONB, nullable=False),
    )
    for table, column in PACKED_COLUMNS[:2]:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE EXTENDED")

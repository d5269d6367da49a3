"""Input and result pages' JSON compressed with LZ4 where the server has it.

A page of JSON items or results is several MB, stored out of line and compressed; with
PostgreSQL's default `pglz`, compressing it was most of a page's COPY (9.4 MB of JSON
items: 266 ms with pglz, 77 ms with lz4, the same read time; lz4 stores 15 % more). A
server built without lz4 (the embedded one) keeps pglz. Rows stored before keep theirs.

Revision ID: 0018
Revises: 0017
"""

from alembic import op
from sqlalchemy import text

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

JSON_PAGE_COLUMNS = (("input_pages", "data"), ("result_pages", "outputs"), ("result_pages", "errors"))


def _has_lz4() -> bool:
    return bool(
        op.get_bind()
        .execute(text("SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"))
        .scalar()
    )


def _compress(method: str) -> None:
    for table, column in JSON_PAGE_COLUMNS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}")


def upgrade() -> None:
    if _has_lz4():
        _compress("lz4")


def downgrade() -> None:
    _compress("default")

"""The fold sums the contributions' bin counts from their int64 bytes.

- `monitor_contributions.unfolded_bins` dropped: a batch's contributions carry their bin
  counts once (`bin_counts`, int64 little-endian), and `fold_contributions` sums an hour's
  bytes per rollup in the caller (numpy) before adding them to the rollup. The aggregate
  no longer sends each contribution's counts twice, nor stores a second copy until folded.

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_column("monitor_contributions", "unfolded_bins")


def downgrade() -> None:
    # Revision 0015's fold adds the arrays: give the unfolded contributions theirs again.
    op.add_column("monitor_contributions", sa.Column("unfolded_bins", postgresql.ARRAY(sa.BigInteger)))
    op.execute("UPDATE monitor_contributions SET unfolded_bins = monitor_counts(bin_counts) WHERE NOT folded")

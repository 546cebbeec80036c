"""step_timings.load_seconds and batch_size: a cold worker's model load time and how many jobs
batches have lately held, for the eta

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("step_timings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("load_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("batch_size", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("step_timings", schema=None) as batch_op:
        batch_op.drop_column("batch_size")
        batch_op.drop_column("load_seconds")

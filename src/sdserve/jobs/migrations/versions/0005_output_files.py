"""output_files: which job (and owner) made each output key, so outputs can be chained as inputs

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "output_files",
        sa.Column("key", sa.String(length=500), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("key"),
    )
    # Outputs of jobs made before this revision chain too.
    connection = op.get_bind()
    jobs = sa.table("jobs", sa.column("id"), sa.column("owner"), sa.column("params"))
    files = sa.table("output_files", sa.column("key"), sa.column("job_id"), sa.column("owner"))
    seen: set[str] = set()
    rows = []
    for job_id, owner, params in connection.execute(
        sa.select(jobs.c.id, jobs.c.owner, jobs.c.params)
    ):
        if isinstance(params, str):
            params = json.loads(params)
        for key in (params or {}).get("output_keys", []):
            if isinstance(key, str) and key not in seen:
                seen.add(key)
                rows.append({"key": key, "job_id": job_id, "owner": owner})
    if rows:
        connection.execute(files.insert(), rows)


def downgrade() -> None:
    op.drop_table("output_files")

"""Alembic environment: runs on the connection JobStore hands over (see `sdserve.jobs.schema`)."""

from __future__ import annotations

from alembic import context

from sdserve.jobs.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=context.config.attributes.get("metadata", Base.metadata),
    render_as_batch=True,  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

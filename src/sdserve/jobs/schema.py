"""The database schema is created and upgraded by Alembic migrations (`jobs/migrations/versions`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import func, inspect, select
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).parent / "migrations"
_FIRST_REVISION = "0001"  # the schema of sdserve 0.1, made before migrations existed
_LOCK_ID = 0x5D5E_0001  # PostgreSQL advisory lock: one process migrates at a time


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest schema; safe to call from many processes at once."""
    # SQLite: BEGIN IMMEDIATE holds the write lock for the whole upgrade.
    with engine.execution_options(sqlite_immediate=True).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(_LOCK_ID)))
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        tables = set(inspect(connection).get_table_names())
        if "jobs" in tables and "alembic_version" not in tables:
            command.stamp(config, _FIRST_REVISION)  # a data dir from before migrations
        command.upgrade(config, "head")

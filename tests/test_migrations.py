"""Schema migrations on SQLite and PostgreSQL: a database made before migrations existed is
upgraded with its jobs kept."""

from __future__ import annotations

import time

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text

from sdserve.jobs.schema import MIGRATIONS
from sdserve.jobs.store import JobStore, normalize_database_url


def _make_v01_database(url: str) -> None:
    """The schema sdserve 0.1 made with create_all: migration 0001, and no alembic_version."""
    engine = create_engine(url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(
            text(
                "INSERT INTO jobs (kind, family, status, model_id, batch_key, owner, params, step,"
                " total_steps, cost, attempts, created_at) VALUES ('text2img', 'v3', 'queued',"
                " 'tiny-sd', 'k', 'key:1', '{\"prompt\": \"kept\"}', 0, 3, 1.0, 0, :now)"
            ),
            {"now": time.time()},
        )
        connection.execute(
            text(
                "INSERT INTO api_keys (key_hash, prefix, label, created_at)"
                " VALUES ('h', 'p', 'old key', :now)"
            ),
            {"now": time.time()},
        )
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sdserve.db'}"
    return request.getfixturevalue("postgres").new_database()


def test_old_data_dir_is_upgraded_and_keeps_its_jobs(database_url):
    url = database_url
    _make_v01_database(normalize_database_url(url))
    store = JobStore(url)
    store.create_schema()
    job = store.get(1)
    assert job.status == "queued" and job.params == {"prompt": "kept"}
    tables = set(inspect(store.engine).get_table_names())
    assert {"models", "workers", "broadcasts", "plans", "key_usage"} <= tables
    columns = {c["name"] for c in inspect(store.engine).get_columns("api_keys")}
    assert {"plan", "parent_id", "purchased_models"} <= columns
    with store.engine.connect() as connection:
        assert connection.execute(text("SELECT purchased_models FROM api_keys")).scalar() == 0
    # idempotent: a second process starting on the same database changes nothing
    JobStore(url).create_schema()
    assert store.get(1).params == {"prompt": "kept"}


def test_new_database_gets_the_newest_schema(database_url):
    store = JobStore(database_url)
    store.create_schema()
    with store.engine.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert version == sorted(p.name[:4] for p in (MIGRATIONS / "versions").glob("0*.py"))[-1]

"""A revoked key stops working at once on every API process, however it was revoked."""

from __future__ import annotations

import sqlite3
import time

import pytest
from conftest import ADMIN_KEY, ServerProcess, create_key, run_cli


@pytest.fixture(scope="module")
def second_api(server):
    """Another API process on the same database, as behind a load balancer."""
    other = ServerProcess(server.data_dir, SDSERVE_IN_PROCESS_WORKER="0").start()
    yield other
    other.stop()


def _works(srv, key) -> bool:
    return srv.post("/api/v3/system_load", {"key": key}).json()["status"] == "ok"


def test_api_revocation_reaches_the_other_process_at_once(server, second_api):
    key = create_key(server.data_dir)
    assert _works(second_api, key) and _works(server, key)  # both have the key cached now
    answer = server.post(
        "/api/v3/cancel_subscription", {"key": ADMIN_KEY, "key_to_cancel": key}
    ).json()
    assert answer["status"] == "success", answer
    assert not _works(second_api, key)
    assert not _works(server, key)


def test_revocation_by_another_process_takes_effect_at_once(server, second_api):
    """What `sdserve keys revoke` does: a write to the database from outside the server."""
    key = create_key(server.data_dir)
    assert _works(server, key) and _works(second_api, key)
    with sqlite3.connect(server.data_dir / "sdserve.db", timeout=30) as db:
        db.execute(
            "update api_keys set revoked_at = ? where revoked_at is null and prefix = ?",
            (time.time(), key[:8]),
        )
    assert not _works(server, key) and not _works(second_api, key)


def test_cli_revocation(server, second_api):
    key = create_key(server.data_dir)
    assert _works(server, key) and _works(second_api, key)
    run_cli("keys", "revoke", key, data_dir=server.data_dir)
    assert not _works(server, key) and not _works(second_api, key)
    other = create_key(server.data_dir)  # other keys are untouched
    assert _works(server, other) and _works(second_api, other)

"""The job store on a real SQLite file and a real PostgreSQL server: batch-shaped claims,
leases, retries, durability."""

from __future__ import annotations

import time

import pytest

from sdserve.errors import JobNotFound, RateLimited
from sdserve.jobs.control import ControlChannel, WorkerInfo
from sdserve.jobs.eta import GUESS_MARGIN
from sdserve.jobs.store import JobStore


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """The same tests on both databases the store supports."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = request.getfixturevalue("postgres").new_database()
    store = JobStore(url)
    store.create_schema()
    yield store
    store.engine.dispose()


def submit(store, batch_key="m|text2img|64|64|2|Euler", owner="key:1", limit=None):
    return store.submit(
        kind="text2img",
        dialect="community",
        model_id="m",
        batch_key=batch_key,
        owner=owner,
        params={},
        total_steps=2,
        cost=1.0,
        track_id=None,
        webhook=None,
        queue_limit=limit,
    )


def test_claim_returns_only_compatible_jobs_in_order(store):
    a1 = submit(store, "A")
    b1 = submit(store, "B")
    a2 = submit(store, "A")
    a3 = submit(store, "A")
    batch = store.claim_batch("w1", max_size=8, lease_seconds=30)
    assert [j.id for j in batch] == [a1.id, a2.id, a3.id]
    assert all(j.status == "processing" for j in batch)
    assert [j.id for j in store.claim_batch("w2", 8, 30)] == [b1.id]
    assert store.claim_batch("w3", 8, 30) == []


def test_claim_respects_max_size(store):
    ids = [submit(store).id for _ in range(5)]
    assert [j.id for j in store.claim_batch("w", 2, 30)] == ids[:2]
    assert [j.id for j in store.claim_batch("w", 2, 30)] == ids[2:4]


def test_expired_lease_is_claimed_again_and_old_owner_cannot_finish(store):
    job = submit(store)
    store.claim_batch("dead-worker", 1, lease_seconds=0.05)
    time.sleep(0.1)
    [again] = store.claim_batch("rescuer", 1, 30)
    assert again.id == job.id and again.attempts == 2
    assert not store.complete(job.id, "dead-worker", {"output_keys": []}, 1.0)
    assert store.complete(job.id, "rescuer", {"output_keys": ["x"]}, 1.0)
    assert store.get(job.id).status == "success"


def test_heartbeat_keeps_the_lease(store):
    submit(store)
    [job] = store.claim_batch("w", 1, lease_seconds=0.2)
    for _ in range(3):
        time.sleep(0.1)
        store.heartbeat("w", [job.id], 0.2)
    assert store.claim_batch("other", 1, 30) == []


def test_jobs_that_keep_killing_workers_fail(store):
    job = submit(store)
    for _ in range(3):
        store.claim_batch("w", 1, lease_seconds=0.01)
        time.sleep(0.02)
    assert store.fail_exhausted(max_attempts=3) == [job.id]
    assert store.get(job.id).status == "failed"


def test_ids_are_shared_and_owners_are_enforced(store, tmp_path):
    a = submit(store, owner="key:1")
    b = submit(store, owner="key:2")
    assert b.id == a.id + 1
    with pytest.raises(JobNotFound):
        store.get(a.id, owner="key:2")
    assert store.get(a.id, owner="admin").id == a.id
    reopened = JobStore(store.url)  # another process's view: the same rows
    assert reopened.get(b.id).status == "queued"


def test_queue_limit(store):
    submit(store, limit=2)
    submit(store, limit=2)
    with pytest.raises(RateLimited):
        submit(store, limit=2)
    submit(store, owner="key:other", limit=2)


def test_queue_info_counts_work_ahead(store):
    timed = submit(store)
    [claimed] = store.claim_batch("w", 1, 30)
    store.complete(claimed.id, "w", {"output_keys": []}, 1.0)  # measures 1 s for this job
    ControlChannel(store).advertise(  # a live worker with the model loaded: no load in the eta
        WorkerInfo("w", "h", "cpu", None, None, ["m"], "idle", time.time())
    )
    first, second = submit(store, "A"), submit(store, "B")
    assert timed.id == claimed.id
    assert store.queue_info(second).position == 1
    # shapes A and B have not run: priced at the model's speed, a guess
    assert store.queue_info(second).eta == pytest.approx(2.0 * GUESS_MARGIN)
    assert store.queue_info(first).eta == pytest.approx(1.0 * GUESS_MARGIN)
    store.claim_batch("w", 1, 30)
    # the running job's work counts for the ones behind it
    assert store.queue_info(store.get(second.id)).position == 0
    assert store.queue_info(store.get(second.id)).eta == pytest.approx(2.0 * GUESS_MARGIN)

"""`eta` on a real job store: a cold worker's model load, the work ahead at each model's own measured
speed, and a tiny job's fixed cost are all in it (reference §16.2)."""

from __future__ import annotations

import time

import pytest
import torch
from sqlalchemy import delete

from sdserve.engine import speed_probe
from sdserve.jobs.control import ControlChannel, WorkerInfo
from sdserve.jobs.db import Job
from sdserve.jobs.eta import COLD_BATCH_SIZE, ETA_MARGIN, GUESS_MARGIN
from sdserve.jobs.store import JobStore


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres").new_database()


def _submit(store: JobStore, model_id: str, cost: float, batch_key: str | None = None):
    return store.submit(
        kind="text2img",
        dialect="community",
        model_id=model_id,
        batch_key=batch_key or f"{model_id}|{cost}",
        owner="key:1",
        params={},
        total_steps=2,  # a step floor (eta.STEP_FLOOR_UNITS) under the costs here
        cost=cost,
        track_id=None,
        webhook=None,
        queue_limit=None,
    )


def _measure(
    store: JobStore,
    model_id: str,
    seconds: float,
    load: float = 0.0,
    batch_key: str | None = None,
    batch: int = 1,
) -> None:
    """One job of `model_id` (cost 1) run to success in `seconds` (in a loop of `batch` jobs),
    after a `load` s model load."""
    job = _submit(store, model_id, 1.0, batch_key)
    [claimed] = store.claim_batch("w-measure", max_size=1, lease_seconds=30)
    assert claimed.id == job.id
    timings = {"model_load": load, "batch_size": batch}
    assert store.complete(job.id, "w-measure", {"timings": timings}, seconds)


def _worker(store: JobStore, resident: list[str], seconds_per_unit: float | None = None) -> None:
    ControlChannel(store).advertise(
        WorkerInfo(
            worker_id="w1",
            hostname="h",
            device="cpu",
            gpu_name=None,
            gpu_memory_mb=None,
            resident=resident,
            state="idle",
            last_seen=time.time(),
            seconds_per_unit=seconds_per_unit,
        )
    )


def _fresh(url: str) -> JobStore:
    """Another API process on the same database: nothing cached."""
    store = JobStore(url)
    store.create_schema()
    return store


def test_a_cold_worker_s_model_load_is_in_the_eta(url):
    store = _fresh(url)
    _measure(store, "m", seconds=2.0, load=8.0)  # 1 s a unit (with the job's fixed unit)
    _worker(store, resident=[])
    job = _submit(store, "m", 1.0)
    cold = _fresh(url).queue_info(job).eta
    assert cold >= 8.0 + 2.0, cold
    _worker(store, resident=["m"])
    warm = _fresh(url).queue_info(job).eta
    assert 2.0 <= warm <= 2.0 * ETA_MARGIN + 0.01, warm  # measured, with the margin


def test_work_ahead_is_priced_at_its_own_model_s_speed(url):
    store = _fresh(url)
    _measure(store, "slow", seconds=10.0)  # 5 s a unit
    _measure(store, "fast", seconds=0.2)  # 0.1 s a unit
    _worker(store, resident=["slow", "fast"])
    _submit(store, "slow", 4.0)  # 25 s of work, of a shape not measured yet: a guess
    job = _submit(store, "fast", 1.0)
    info = _fresh(url).queue_info(job)
    assert info.position == 1
    assert 25.0 * GUESS_MARGIN <= info.eta <= 26.0 * GUESS_MARGIN, info


def test_a_tiny_job_is_not_promised_almost_no_time(url):
    store = _fresh(url)
    _measure(store, "m", seconds=3.0)  # a cost-1 job in 3 s: mostly fixed work
    _worker(store, resident=["m"])
    job = _submit(store, "m", 0.01)  # 64x64 at 2 steps is about 0.03 units
    assert _fresh(url).queue_info(job).eta >= 1.0


def test_a_batch_s_later_jobs_come_before_this_one_ends(url):
    store = _fresh(url)
    _measure(store, "m", seconds=2.0)  # 1 s a unit
    _worker(store, resident=["m"])
    first = _submit(store, "m", 1.0, batch_key="A")
    _submit(store, "m", 1.0, batch_key="B")
    job = _submit(store, "m", 1.0, batch_key="B")
    _submit(store, "m", 1.0, batch_key="A")  # later, but claimed with `first`, ahead of `job`
    info = _fresh(url).queue_info(job)
    assert info.position == 2
    assert info.eta >= 4 * 2.0, info
    assert _fresh(url).queue_info(first).eta >= 2 * 2.0  # its batch's loop holds two jobs


def test_each_shape_of_work_is_priced_at_its_own_speed(url):
    # One model's speed per unit differs tenfold between shapes (a small image is mostly fixed
    # work): the shape measured last must not price the others.
    store = _fresh(url)
    _measure(store, "m", seconds=20.0, batch_key="m|512|40")  # 10 s a unit
    _measure(store, "m", seconds=0.2, batch_key="m|64|2")  # 0.1 s a unit, measured last
    _worker(store, resident=["m"])
    large = _submit(store, "m", 1.0, batch_key="m|512|40")
    assert 20.0 * ETA_MARGIN <= _fresh(url).queue_info(large).eta <= 22.0 * ETA_MARGIN
    store.claim_batch("w-measure", max_size=1, lease_seconds=30)  # `large` runs
    small = _submit(store, "m", 1.0, batch_key="m|64|2")
    small_eta = _fresh(url).queue_info(small).eta  # behind `large`, then its own 0.2 s
    assert 20.2 * ETA_MARGIN <= small_eta <= 21.0 * ETA_MARGIN, small_eta


def test_eta_is_a_bound_most_jobs_finish_within(url):
    # Not the mean: a job measured at 2 s is promised more, and no more than the margin over it.
    store = _fresh(url)
    _measure(store, "m", seconds=2.0)
    _worker(store, resident=["m"])
    job = _submit(store, "m", 1.0, batch_key="m|1.0")
    assert 1.2 * 2.0 <= _fresh(url).queue_info(job).eta <= 2.0 * 2.0


def test_a_job_joining_an_older_batch_is_not_priced_behind_younger_batches(url):
    # The oldest queued job is claimed with its batch: a job of that batch runs before every
    # batch whose oldest job is younger, even those submitted before it.
    store = _fresh(url)
    _measure(store, "m", seconds=2.0)  # 1 s a unit
    _worker(store, resident=["m"])
    _submit(store, "m", 1.0, batch_key="A")
    for _ in range(3):
        _submit(store, "m", 1.0, batch_key="B")
    job = _submit(store, "m", 1.0, batch_key="A")
    info = _fresh(url).queue_info(job)
    assert info.position == 1
    assert info.eta <= 2 * 2.0 * GUESS_MARGIN + 0.01, info  # its loop: two jobs of 2 s


def test_a_cold_eta_follows_the_worker_s_measured_speed(url, monkeypatch):
    """Nothing measured yet: work is priced at the worker's speed probe, so a machine three times
    slower (each probe's work done three times) gives a cold eta about three times longer."""
    cpu, f32 = torch.device("cpu"), torch.float32
    workload = speed_probe._workload

    def slower_machine(*tensors):
        return sum(workload(*tensors) for _ in range(3))

    here, slower = [], []  # alternately, so a change in this shared machine's load hits both
    for _ in range(3):
        here.append(speed_probe.seconds_per_unit(cpu, f32))
        with monkeypatch.context() as patch:
            patch.setattr(speed_probe, "_workload", slower_machine)
            slower.append(speed_probe.seconds_per_unit(cpu, f32))
    here, slower = sorted(here)[1], sorted(slower)[1]
    etas = []
    for probed in (here, slower):
        store = _fresh(url)
        _worker(store, resident=["m"], seconds_per_unit=probed)
        job = _submit(store, "m", 4.0)
        etas.append(_fresh(url).queue_info(job).eta)
        assert etas[-1] == pytest.approx(probed * 5.0, rel=0.01)  # its 4 units and a fixed one
        with store.session(write=True) as s:  # the next machine starts on an empty queue
            s.execute(delete(Job))
    assert 2.0 <= etas[1] / etas[0] <= 6.0, etas  # 3, give or take a shared machine


def test_a_warm_up_prices_the_first_jobs_but_not_how_full_their_batches_run(url):
    """A worker's warm-up (engine.images.warm_up) is measured as a job is: before any job has
    run, work is priced at its speed, other shapes with the wider margin of a guess. How full
    batches run is the traffic's: until jobs have shown it, a batch that waits for a worker is
    priced as COLD_BATCH_SIZE jobs."""
    store = _fresh(url)
    # A cost-1 job (two units with its fixed one) in 1 s, after a 2 s load: 0.5 s a unit.
    store.record_run("m", "text2img", "A", 1.0, 2, {"model_load": 2.0}, 1.0)
    _worker(store, resident=["m"])
    run, guess = ETA_MARGIN * 0.5 * 2, GUESS_MARGIN * 0.5 * 2  # a cost-1 job's own eta
    first = _submit(store, "m", 1.0, batch_key="A")  # the warm-up's shape
    assert _fresh(url).queue_info(first).eta == pytest.approx(run, abs=0.01)  # claimed at once
    second = _submit(store, "m", 1.0, batch_key="B")  # another shape, behind `first`
    expected = run + COLD_BATCH_SIZE * guess
    assert _fresh(url).queue_info(second).eta == pytest.approx(expected, abs=0.01)
    _worker(store, resident=[])
    assert _fresh(url).queue_info(first).eta == pytest.approx(2.0 + run, abs=0.01)  # its load


def test_a_lone_job_on_an_idle_worker_is_not_priced_with_jobs_that_might_join_it(url):
    # Batches have lately held three jobs, but a job an idle worker claims at once has no time
    # to gather any: it runs alone. A batch that waits gathers them.
    store = _fresh(url)
    for shape in ("A", "B"):  # a job's share of its loop: 1 s a unit
        _measure(store, "m", seconds=6.0, batch_key=shape, batch=3)
    _worker(store, resident=["m"])
    run = ETA_MARGIN * 1.0 * 2
    lone = _submit(store, "m", 1.0, batch_key="A")
    assert _fresh(url).queue_info(lone).eta == pytest.approx(run, abs=0.01)
    waiting = _submit(store, "m", 1.0, batch_key="B")
    assert _fresh(url).queue_info(waiting).eta == pytest.approx(run + 3 * run, abs=0.01)


def test_a_job_s_speed_counts_all_its_worker_spent_on_it(url):
    # Its stages (denoise, decode, ...) leave out encoding its files, storing them and the
    # bookkeeping: the speed is measured from its claim to its end.
    store = _fresh(url)
    job = _submit(store, "m", 1.0)
    store.claim_batch("w-measure", max_size=1, lease_seconds=30)
    time.sleep(0.5)
    assert store.complete(job.id, "w-measure", {"timings": {"batch_size": 1}}, 0.05)
    _worker(store, resident=["m"])
    later = _submit(store, "m", 1.0)
    assert _fresh(url).queue_info(later).eta >= 0.5 * ETA_MARGIN


def test_a_job_claimed_while_its_answer_is_made_is_counted_once(url):
    # The worker may claim a job between its insert and its eta (an idle worker, a busy API):
    # it is then running, not also work ahead of itself.
    store = _fresh(url)
    _measure(store, "m", seconds=2.0)  # 1 s a unit
    _worker(store, resident=["m"])
    job = _submit(store, "m", 1.0)  # as the API saw it: queued
    [claimed] = store.claim_batch("w-measure", max_size=1, lease_seconds=30)
    assert claimed.id == job.id
    assert _fresh(url).queue_info(job).eta == pytest.approx(2.0 * ETA_MARGIN, abs=0.01)

"""The durable job queue: submit, claim batches under a lease, progress, completion, ETA, webhooks."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import case, create_engine, event, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from sdserve.errors import JobNotFound, QuotaExceeded, RateLimited, StoreUnavailable
from sdserve.extras import require
from sdserve.jobs.db import (
    Job,
    KeyUsage,
    OutputFile,
    ServerConfig,
    StepTiming,
    Training,
    WebhookDelivery,
    WebhookOutbox,
    WorkerRecord,
)
from sdserve.jobs.eta import (
    MIN_LOAD_SECONDS,
    STEP_FLOOR_UNITS,
    Estimator,
    ModelTiming,
    Pending,
    eta_units,
    timing_key,
    unit_seconds,
)

ADMIN_OWNER = "admin"
FINISHED = ("success", "failed")
_FINISHED_CACHE_SIZE = 20_000
_DEFAULT_SECONDS_PER_UNIT = 0.1  # until a model has been measured
_TIMING_SMOOTHING = 0.3
_RATE_CACHE_SECONDS = 5.0
_LIVE_WORKER_SECONDS = 120.0  # as the metrics count live workers
# What eta.eta_units prices a job at, in SQL.
_ETA_UNITS = case(
    (Job.cost > STEP_FLOOR_UNITS * Job.total_steps, Job.cost),
    else_=STEP_FLOOR_UNITS * Job.total_steps,
)
_BATCH_PULL = 7  # later jobs a batch can take along (the default max_batch_size, less one)


@dataclass(frozen=True)
class JobView:
    """A detached snapshot of a job row."""

    id: int
    kind: str
    dialect: str
    status: str
    model_id: str
    batch_key: str
    owner: str
    params: dict
    result: dict | None
    error: str | None
    step: int
    total_steps: int
    cost: float
    track_id: str | None
    webhook: str | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    generation_time: float | None

    @classmethod
    def of(cls, job: Job) -> JobView:
        return cls(**{name: getattr(job, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class QueueInfo:
    position: int  # jobs ahead in the queue (0 = next or running)
    eta: float  # seconds until this job is expected to finish


def _visible(view: JobView, owner: str | None) -> JobView:
    if owner not in (None, ADMIN_OWNER) and view.owner != owner:
        raise JobNotFound()
    return view


def _finished_values(status: str, result: dict | None, error: str | None, now: float) -> dict:
    """The columns a job's end writes: its outcome, and its lease let go."""
    return {
        "status": status,
        "result": result,
        "error": error,
        "finished_at": now,
        "lease_owner": None,
        "lease_expires": None,
    }


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Let SQLAlchemy drive transactions; WAL lets readers run beside the one writer.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # Writers take the lock up front so two claimers never both read the same queued rows.
        immediate = conn.get_execution_options().get("sqlite_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


NEW_JOB_CHANNEL = "sdserve_jobs"  # PostgreSQL NOTIFY channel: a job was queued


def normalize_database_url(url: str) -> str:
    """`postgresql://` and `postgres://` URLs use psycopg 3, the driver sdserve installs."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


class JobStore:
    def __init__(self, database_url: str):
        database_url = normalize_database_url(database_url)
        self.url = database_url
        self.is_sqlite = database_url.startswith("sqlite")
        kwargs = (
            {"connect_args": {"timeout": 30, "check_same_thread": False}}
            if self.is_sqlite
            # As many pooled connections as the API has threadpool threads (40): past the pool,
            # each request would open and close its own, a PostgreSQL process each time. No
            # pre-ping round trip per checkout: after an outage the first use of a dropped
            # connection fails, and SQLAlchemy then discards every pooled connection at once.
            else {"pool_size": 40, "max_overflow": 10}
        )
        if database_url.startswith("postgresql+psycopg"):
            # SQLAlchemy would fail on first use with a bare ModuleNotFoundError; say which extra.
            require("psycopg", "A PostgreSQL job store (SDSERVE_DATABASE_URL)")
        self.engine = create_engine(database_url, **kwargs)
        if self.is_sqlite:
            _sqlite_setup(self.engine)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        # Finished jobs never change, so fetches of them (most fetches) skip the database.
        self._finished: OrderedDict[int, JobView] = OrderedDict()
        self._finished_lock = threading.Lock()
        self._eta_cache: tuple[Estimator, float] | None = None  # (estimator, expiry)
        self._timing_written: dict[str, float] = {}  # model_id -> when this process last wrote it
        self._write = sessionmaker(
            self.engine.execution_options(sqlite_immediate=True), expire_on_commit=False
        )

    def create_schema(self) -> None:
        """Create the tables, or upgrade an older data dir's, through the migrations."""
        from sdserve.jobs.schema import upgrade

        upgrade(self.engine)

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        try:
            with (self._write if write else self._read)() as session, session.begin():
                yield session
        except OperationalError as exc:
            raise StoreUnavailable(f"Job store unavailable: {exc.orig}") from exc

    def load_config(self, name: str) -> dict | None:
        """A server setting saved for every process (the S3 storage of `update_s3`)."""
        with self.session() as s:
            row = s.get(ServerConfig, name)
            return None if row is None else dict(row.value)

    def save_config(self, name: str, value: dict) -> None:
        with self.session(write=True) as s:
            row = s.get(ServerConfig, name)
            if row is None:
                s.add(ServerConfig(name=name, value=value, updated_at=time.time()))
            else:
                row.value, row.updated_at = value, time.time()

    # ---- submit and read -------------------------------------------------------------------

    def submit(
        self,
        *,
        kind: str,
        dialect: str,
        model_id: str,
        batch_key: str,
        owner: str,
        params: dict,
        total_steps: int,
        cost: float,
        track_id: str | None,
        webhook: str | None,
        queue_limit: int | None,
        key_id: int | None = None,
        monthly_quota: int | None = None,
    ) -> JobView:
        with self.session(write=True) as s:
            if key_id is not None:
                self._count_request(s, key_id, monthly_quota)
            return JobView.of(
                self._insert_job(
                    s,
                    kind=kind,
                    dialect=dialect,
                    model_id=model_id,
                    batch_key=batch_key,
                    owner=owner,
                    params=params,
                    total_steps=total_steps,
                    cost=cost,
                    track_id=track_id,
                    webhook=webhook,
                    queue_limit=queue_limit,
                )
            )

    def check_limits(
        self, owner: str, queue_limit: int | None, key_id: int | None, quota: int | None
    ) -> None:
        """Refuse now what `submit` would refuse (queue full, month used up), before a request
        does any work on its inputs. `submit` checks again, in its own transaction."""
        with self.session() as s:
            if queue_limit is not None:
                waiting = s.scalar(
                    select(func.count(Job.id)).where(
                        Job.owner == owner, Job.status.in_(("queued", "processing"))
                    )
                )
                if waiting >= queue_limit:
                    raise RateLimited(queue_limit)
            if key_id is not None and quota is not None:
                period = time.strftime("%Y-%m", time.gmtime())
                used = s.scalar(
                    select(KeyUsage.requests).where(
                        KeyUsage.key_id == key_id, KeyUsage.period == period
                    )
                )
                if (used or 0) >= quota:
                    raise QuotaExceeded(quota)

    def _count_request(self, s: Session, key_id: int, quota: int | None) -> None:
        """Count one accepted request against the key's month; refuse it past the quota."""
        period = time.strftime("%Y-%m", time.gmtime())
        insert = sqlite_insert if self.is_sqlite else pg_insert
        s.execute(
            insert(KeyUsage)
            .values(key_id=key_id, period=period, requests=1)
            .on_conflict_do_update(
                index_elements=["key_id", "period"], set_={"requests": KeyUsage.requests + 1}
            )
        )
        used = s.scalar(
            select(KeyUsage.requests).where(KeyUsage.key_id == key_id, KeyUsage.period == period)
        )
        if quota is not None and used > quota:
            raise QuotaExceeded(quota)  # the transaction rolls back, count included

    def usage(self, key_id: int) -> int:
        period = time.strftime("%Y-%m", time.gmtime())
        with self.session() as s:
            used = s.scalar(
                select(KeyUsage.requests).where(
                    KeyUsage.key_id == key_id, KeyUsage.period == period
                )
            )
            return used or 0

    def add_stored_file(self, owner: str, key: str, kind: str = "upload") -> JobView:
        """A finished job for a file a client uploaded: same id space, fetch and delete_image."""
        now = time.time()
        with self.session(write=True) as s:
            job = Job(
                kind=kind,
                dialect="v3",
                status="success",
                model_id="",
                batch_key=kind,
                owner=owner,
                params={"output_keys": [key]},
                result={"output_keys": [key], "meta": {}},
                total_steps=0,
                cost=0.0,
                created_at=now,
                started_at=now,
                finished_at=now,
                generation_time=0.0,
            )
            s.add(job)
            s.flush()
            self._record_outputs(s, job)
            return JobView.of(job)

    @staticmethod
    def _record_outputs(s: Session, job: Job) -> None:
        for key in (job.params or {}).get("output_keys", []):
            s.add(OutputFile(key=key, job_id=job.id, owner=job.owner))

    def output_owner(self, key: str) -> str | None:
        """The owner of the job that made output `key` (None: not an output of this server)."""
        with self.session() as s:
            return s.scalar(select(OutputFile.owner).where(OutputFile.key == key))

    def drop_outputs(self, job_id: int, owner: str) -> list[str]:
        """Forget a finished job's output files (the caller deletes them); return their keys."""
        self.get(job_id, owner)  # JobNotFound for someone else's job
        with self.session(write=True) as s:
            job = s.get(Job, job_id)
            if job.status not in FINISHED:
                raise JobNotFound("The request is still running; delete its images when done")
            keys = list((job.result or {}).get("output_keys", []))
            job.result = {**(job.result or {}), "output_keys": [], "deleted": True}
        with self._finished_lock:
            self._finished.pop(job_id, None)
        return keys

    def clear_queue(self, message: str) -> list[int]:
        """Fail every queued job (running ones finish); return their ids."""
        now = time.time()
        with self.session(write=True) as s:
            jobs = s.scalars(select(Job).where(Job.status == "queued")).all()
            for job in jobs:
                self._finish(job, "failed", None, message, now)
            return [job.id for job in jobs]

    @staticmethod
    def _insert_job(s: Session, *, owner: str, queue_limit: int | None, **fields) -> Job:
        if queue_limit is not None:
            waiting = s.scalar(
                select(func.count(Job.id)).where(
                    Job.owner == owner, Job.status.in_(("queued", "processing"))
                )
            )
            if waiting >= queue_limit:
                raise RateLimited(queue_limit)
        job = Job(owner=owner, status="queued", created_at=time.time(), **fields)
        s.add(job)
        s.flush()
        JobStore._record_outputs(s, job)
        if s.get_bind().dialect.name == "postgresql":  # delivered to LISTENing workers on commit
            s.execute(select(func.pg_notify(NEW_JOB_CHANNEL, "")))
        return job

    def get(self, job_id: int, owner: str | None = None) -> JobView:
        """The job, if `owner` may see it (None or the admin sees all). Others get JobNotFound."""
        view = self.get_finished(job_id, owner)
        if view is not None:
            return view
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobNotFound()
            view = JobView.of(job)
        if view.status in FINISHED:
            with self._finished_lock:
                self._finished[job_id] = view
                if len(self._finished) > _FINISHED_CACHE_SIZE:
                    self._finished.popitem(last=False)
        return _visible(view, owner)

    def get_finished(self, job_id: int, owner: str | None = None) -> JobView | None:
        """A finished job from memory, without touching the database; None if not cached."""
        with self._finished_lock:
            view = self._finished.get(job_id)
        return None if view is None else _visible(view, owner)

    def queue_info(self, job: JobView) -> QueueInfo:
        """Position and ETA: the work ahead of this job over the live workers, a cold worker's
        model load, and its own run at its model's measured speed (sdserve.jobs.eta)."""
        estimator = self._estimator()
        key = timing_key(job.model_id, job.kind)
        units = eta_units(job.cost, job.total_steps)
        if job.status == "processing":
            left = 1 - (job.step / job.total_steps if job.total_steps else 0)
            loading = job.step == 0 and job.model_id not in estimator.resident
            with self.session() as s:  # the jobs sharing its loop: it ends when the loop does
                count, cost = s.execute(
                    select(func.count(), func.coalesce(func.sum(_ETA_UNITS), 0.0)).where(
                        Job.status == "processing", Job.batch_key == job.batch_key
                    )
                ).one()
            count, cost = max(count, 1), max(cost, units)
            loop = Pending(job.model_id, key, cost / count, left, loading)
            eta = estimator.running(loop) + (count - 1) * estimator.running(
                Pending(job.model_id, key, cost / count, left)
            )
            return QueueInfo(0, round(eta, 2))
        before = Job.id < job.id
        with self.session() as s:  # the waiting jobs by batch, and the few running ones
            queued = s.execute(
                select(
                    Job.batch_key,
                    Job.model_id,
                    Job.kind,
                    func.count(case((before, 1))),
                    func.coalesce(func.sum(case((before, _ETA_UNITS), else_=0.0)), 0.0),
                    func.count(case((Job.id > job.id, 1))),
                    func.coalesce(func.sum(case((Job.id > job.id, _ETA_UNITS), else_=0.0)), 0.0),
                )
                .where(Job.status == "queued")
                .group_by(Job.batch_key, Job.model_id, Job.kind)
            ).all()
            running = s.execute(
                select(Job.model_id, Job.kind, _ETA_UNITS, Job.step, Job.total_steps).where(
                    Job.status == "processing"
                )
            ).all()
        ahead = [
            Pending(
                model_id,
                timing_key(model_id, kind),
                cost,
                1 - (step / total if total else 0),
                step == 0 and model_id not in estimator.resident,
            )
            for model_id, kind, cost, step, total in running
        ]
        batches_ahead = {row[0] for row in queued if row[3]} | {job.batch_key}
        position = 0
        for batch_key, model_id, kind, count, cost, later, later_cost in queued:
            position += count
            key_ahead = timing_key(model_id, kind)
            unit = (cost + later_cost) / (count + later) if count + later else units
            if batch_key in batches_ahead:
                # A batch that runs before this job ends takes later jobs of its kind along, in
                # its one loop: those queued now, or as many as batches have lately held (jobs
                # still arriving), up to a batch's worth.
                own = 1 if batch_key == job.batch_key else 0
                usual = estimator.batch_size(key_ahead)
                pulled = min(max(later, round(usual) - count - own), _BATCH_PULL)
                count += max(pulled, 0)
                cost = unit * count
            # One entry per job: each carries its fixed per-job work (eta.PER_JOB_UNITS).
            ahead.extend(Pending(model_id, key_ahead, cost / count) for _ in range(count))
        eta = estimator.waiting(Pending(job.model_id, key, units), ahead)
        return QueueInfo(position, round(eta, 2))

    def _estimator(self) -> Estimator:
        """Measured timings and the live workers' resident models, re-read every few seconds."""
        cached = self._eta_cache
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        now = time.time()
        with self.session() as s:
            timings = {
                row.model_id: ModelTiming(row.seconds_per_unit, row.load_seconds, row.batch_size)
                for row in s.scalars(select(StepTiming))
            }
            workers = s.execute(
                select(WorkerRecord.resident, WorkerRecord.state, WorkerRecord.device).where(
                    WorkerRecord.last_seen > now - _LIVE_WORKER_SECONDS
                )
            ).all()
        resident = {model for models, _, _ in workers for model in (models or [])}
        live = sum(1 for _, state, _ in workers if state != "draining")
        gpu = any(device.startswith("cuda") for _, _, device in workers)
        estimator = Estimator(timings, resident, live, gpu)
        self._eta_cache = (estimator, time.monotonic() + _RATE_CACHE_SECONDS)
        return estimator

    def queue_stats(self) -> tuple[int, float]:
        """(jobs waiting, seconds of work waiting) for `system_load`."""
        with self.session() as s:
            count, cost = s.execute(
                select(func.count(Job.id), func.coalesce(func.sum(Job.cost), 0.0)).where(
                    Job.status.in_(("queued", "processing"))
                )
            ).one()
            return int(count), cost * self._seconds_per_unit(s, None)

    def _seconds_per_unit(self, s: Session, model_id: str | None) -> float:
        query = select(StepTiming.seconds_per_unit)
        if model_id is not None:
            found = s.scalar(query.where(StepTiming.model_id == model_id))
        else:
            found = s.scalar(select(func.avg(StepTiming.seconds_per_unit)))
        return found or _DEFAULT_SECONDS_PER_UNIT

    @staticmethod
    def _record_timing(
        s: Session,
        model_id: str,
        seconds_per_unit: float,
        load_seconds: float | None = None,
        batch_size: float = 1.0,
    ) -> None:
        row = s.get(StepTiming, model_id)
        if row is None:
            s.add(
                StepTiming(
                    model_id=model_id,
                    seconds_per_unit=seconds_per_unit,
                    load_seconds=load_seconds,
                    batch_size=batch_size,
                    updated_at=time.time(),
                )
            )
            return
        row.seconds_per_unit += _TIMING_SMOOTHING * (seconds_per_unit - row.seconds_per_unit)
        previous_batch = row.batch_size or batch_size
        row.batch_size = previous_batch + _TIMING_SMOOTHING * (batch_size - previous_batch)
        if load_seconds is not None:
            # The slower of the last load and the smoothed ones: an eta that errs long.
            previous = row.load_seconds or load_seconds
            row.load_seconds = max(
                load_seconds, previous + _TIMING_SMOOTHING * (load_seconds - previous)
            )
        row.updated_at = time.time()

    # ---- workers ---------------------------------------------------------------------------

    def claim_batch(
        self,
        worker_id: str,
        max_size: int,
        lease_seconds: float,
        resident: list[str] | None = None,
        prefer_window: float = 2.0,
        max_cost: float | None = None,
        batch_key: str | None = None,
        kinds: list[str] | None = None,
    ) -> list[JobView]:
        """Lease the oldest claimable job and up to `max_size - 1` more with the same batch_key.

        Claimable: queued, or processing under an expired lease (its worker died). A worker
        passes the models it has `resident`: jobs for those come first, unless an older job has
        waited longer than `prefer_window` seconds (no job starves behind a busy model).
        The batch stops before its summed cost passes `max_cost` (its first job always goes).
        With `batch_key`, only jobs of that key are claimed (to grow a batch in hand); with
        `kinds`, only jobs of those kinds (the ones this worker has an engine for).
        """
        now = time.time()
        claimable = (Job.status == "queued") | (
            (Job.status == "processing") & (Job.lease_expires < now)
        )
        order = [Job.id]
        if resident:
            warm = Job.model_id.in_(resident) | (Job.created_at < now - prefer_window)
            order = [case((warm, 0), else_=1), Job.id]
        if batch_key is not None:
            claimable = claimable & (Job.batch_key == batch_key)
        if kinds is not None:
            claimable = claimable & Job.kind.in_(kinds)
        with self.session(write=True) as s:
            first = s.execute(
                select(Job.id, Job.batch_key, Job.cost)
                .where(claimable)
                .order_by(*order)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if first is None:
                return []
            picked = [first]
            if max_size > 1:
                picked += s.execute(
                    select(Job.id, Job.batch_key, Job.cost)
                    .where(claimable, Job.batch_key == first.batch_key, Job.id != first.id)
                    .order_by(Job.id)
                    .limit(max_size - 1)
                    .with_for_update(skip_locked=True)
                ).all()
            if max_cost is not None:
                total, kept = 0.0, []
                for job in picked:
                    total += job.cost
                    if kept and total > max_cost:
                        break
                    kept.append(job)
                picked = kept  # the rest stay locked only until this transaction ends
            ids = [job.id for job in picked]
            claimed = s.scalars(
                update(Job)
                .where(Job.id.in_(ids))
                .values(
                    status="processing",
                    lease_owner=worker_id,
                    lease_expires=now + lease_seconds,
                    attempts=Job.attempts + 1,
                    started_at=now,
                    step=0,
                )
                .returning(Job)
                .execution_options(synchronize_session=False)
            ).all()
            by_id = {job.id: JobView.of(job) for job in claimed}
            return [by_id[job_id] for job_id in ids]  # oldest first, as picked

    def fail_exhausted(self, max_attempts: int) -> list[int]:
        """Fail jobs whose lease expired after `max_attempts` claims (they keep killing workers)."""
        now = time.time()
        with self.session(write=True) as s:
            jobs = s.scalars(
                select(Job).where(
                    Job.status == "processing",
                    Job.lease_expires < now,
                    Job.attempts >= max_attempts,
                )
            ).all()
            for job in jobs:
                self._finish(job, "failed", None, f"Failed after {job.attempts} attempts", now)
            return [job.id for job in jobs]

    def heartbeat(self, worker_id: str, job_ids: list[int], lease_seconds: float) -> None:
        with self.session(write=True) as s:
            s.execute(
                update(Job)
                .where(
                    Job.id.in_(job_ids), Job.lease_owner == worker_id, Job.status == "processing"
                )
                .values(lease_expires=time.time() + lease_seconds)
            )

    def report_progress(self, worker_id: str, job_id: int, step: int, lease_seconds: float) -> None:
        with self.session(write=True) as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status == "processing")
                .values(step=step, lease_expires=time.time() + lease_seconds)
            )

    def complete(self, job_id: int, worker_id: str, result: dict, generation_time: float) -> bool:
        """Record success, in one statement; False if this worker lost the lease and the job
        ended elsewhere. The measured speed (for ETAs) is written at most once a second per
        model and process: every completion writing that one row would serialize the workers."""
        now = time.time()
        with self.session(write=True) as s:
            row = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == "processing", Job.lease_owner == worker_id)
                .values(
                    **_finished_values("success", result, None, now),
                    generation_time=generation_time,
                    step=Job.total_steps,
                )
                .returning(Job.webhook, Job.model_id, Job.kind, Job.cost, Job.total_steps)
                .execution_options(synchronize_session=False)
            ).first()
            if row is None:
                return False
            if row.webhook:
                self.add_webhook(s, job_id, row.webhook, None)
            timings = result.get("timings") or {}
            load = timings.get("model_load") or 0.0
            key = timing_key(row.model_id, row.kind)
            if load >= MIN_LOAD_SECONDS or self._timing_written.get(key, 0.0) < now - 1.0:
                self._timing_written[key] = now
                batch = float(timings.get("batch_size") or 1.0)
                per_unit = unit_seconds(
                    generation_time, eta_units(row.cost, row.total_steps), batch
                )
                self._record_timing(
                    s, key, per_unit, load if load >= MIN_LOAD_SECONDS else None, batch
                )
            return True

    def fail(self, job_id: int, worker_id: str, message: str) -> bool:
        with self.session(write=True) as s:
            job = s.get(Job, job_id)
            if job is None or job.status != "processing" or job.lease_owner != worker_id:
                return False
            self._finish(job, "failed", None, message, time.time())
            return True

    def requeue(self, job_ids: list[int], worker_id: str) -> None:
        """Give jobs back to the queue (a draining worker, or a retryable failure)."""
        with self.session(write=True) as s:
            s.execute(
                update(Job)
                .where(
                    Job.id.in_(job_ids), Job.lease_owner == worker_id, Job.status == "processing"
                )
                .values(status="queued", lease_owner=None, lease_expires=None, step=0)
            )

    @staticmethod
    def _finish(job: Job, status: str, result: dict | None, error: str | None, now: float) -> None:
        for name, value in _finished_values(status, result, error, now).items():
            setattr(job, name, value)
        if job.webhook:
            Session.object_session(job).add(
                WebhookOutbox(job_id=job.id, url=job.webhook, payload=None, next_at=now)
            )

    # ---- webhooks --------------------------------------------------------------------------

    def add_webhook(self, s: Session, job_id: int, url: str, payload: dict | None) -> None:
        s.add(WebhookOutbox(job_id=job_id, url=url, payload=payload, next_at=time.time()))

    def claim_webhooks(
        self, limit: int, hold_seconds: float
    ) -> list[tuple[int, str, dict | None, JobView]]:
        """Due webhooks as (outbox id, url, payload, job); pushed forward so no one else sends now."""
        now = time.time()
        with self.session(write=True) as s:
            rows = s.scalars(
                select(WebhookOutbox)
                .where(WebhookOutbox.state == "pending", WebhookOutbox.next_at <= now)
                .order_by(WebhookOutbox.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            due = []
            for row in rows:
                row.next_at = now + hold_seconds
                due.append((row.id, row.url, row.payload, JobView.of(s.get(Job, row.job_id))))
            return due

    def record_webhook_attempt(
        self,
        outbox_id: int,
        status_code: int | None,
        error: str | None,
        ok: bool,
        max_attempts: int,
        backoff_seconds: float,
    ) -> None:
        now = time.time()
        with self.session(write=True) as s:
            row = s.get(WebhookOutbox, outbox_id)
            row.attempts += 1
            s.add(
                WebhookDelivery(
                    job_id=row.job_id,
                    outbox_id=row.id,
                    attempt=row.attempts,
                    url=row.url,
                    sent_at=now,
                    status_code=status_code,
                    error=error,
                    ok=ok,
                )
            )
            if ok:
                row.state = "delivered"
            elif row.attempts >= max_attempts:
                row.state = "gave_up"
            else:
                row.next_at = now + backoff_seconds * 2 ** (row.attempts - 1)

    # ---- trainings ---------------------------------------------------------------------------

    def submit_training(
        self,
        *,
        training_id: str,
        kind: str,
        job_kind: str,
        base_model_id: str,
        instance_prompt: str,
        owner: str,
        params: dict,
        total_steps: int,
        webhook: str | None,
        queue_limit: int | None,
        key_id: int | None = None,
        monthly_quota: int | None = None,
        model_allowance: int | None = None,
    ) -> JobView:
        """The training row and its queued job in one transaction, at stage `deploying_gpu`."""
        with self.session(write=True) as s:
            if key_id is not None:
                self._count_request(s, key_id, monthly_quota)
            if model_allowance is not None:
                used = s.scalar(select(func.count()).where(Training.owner == owner))
                if used >= model_allowance:
                    raise ModelAllowanceUsed(model_allowance)
            job = self._insert_job(
                s,
                kind=job_kind,
                dialect="training",
                model_id=base_model_id,
                batch_key=f"train|{training_id}",
                owner=owner,
                params=params,
                total_steps=total_steps,
                cost=float(total_steps),
                track_id=None,
                webhook=None,  # training webhooks are owed per stage, see _stage
                queue_limit=queue_limit,
            )
            row = Training(
                training_id=training_id,
                job_id=job.id,
                owner=owner,
                kind=kind,
                base_model_id=base_model_id,
                instance_prompt=instance_prompt,
                stage="deploying_gpu",
                log="",
                created_at=time.time(),
            )
            s.add(row)
            self._stage(s, row, "deploying_gpu", "request received, waiting for a GPU", webhook)
            return JobView.of(job)

    def get_training(self, training_id: str, owner: str | None = None) -> dict:
        with self.session() as s:
            row = s.get(Training, training_id)
            if row is None or (owner not in (None, ADMIN_OWNER) and row.owner != owner):
                raise TrainingNotFound()
            return _training_dict(row)

    def list_trainings(self, owner: str) -> list[dict]:
        with self.session() as s:
            query = select(Training).order_by(Training.created_at)
            if owner != ADMIN_OWNER:
                query = query.where(Training.owner == owner)
            return [_training_dict(row) for row in s.scalars(query)]

    def _stage(self, s: Session, row: Training, stage: str, line: str, webhook: str | None) -> None:
        """Move to a stage, append to the readable log, and owe the webhook that stage."""
        row.stage = stage
        row.log += f" /n {stage}: {line}"
        if webhook:
            payload = {
                "status": "failed"
                if stage in ("training_failed", "training_cancelled")
                else "success",
                "training_status": stage,
                "logs": line,
                "model_id": row.training_id,
                "training_id": row.training_id,
            }
            self.add_webhook(s, row.job_id, webhook, payload)

    def set_job_stage(self, job_id: int, stage: str, line: str) -> None:
        """A running job's named stage: trainings record it (and owe its webhook); other jobs
        have no stages to keep."""
        with self.session(write=True) as s:
            row = s.scalar(select(Training).where(Training.job_id == job_id))
            if row is not None:
                job = s.get(Job, job_id)
                self._stage(s, row, stage, line, (job.params or {}).get("webhook"))

    def job_cancelled(self, job_id: int) -> bool:
        """True once a training's cancel (or delete, which removes its row) was asked for."""
        with self.session() as s:
            row = s.execute(
                select(Training.cancel_requested).where(Training.job_id == job_id)
            ).first()
            return row is None or bool(row[0])  # no row: the training was deleted

    def request_cancel(self, training_id: str, owner: str) -> dict:
        """Flag a training to stop; a queued one stops now, a running one within a step."""
        training = self.get_training(training_id, owner)
        with self.session(write=True) as s:
            row = s.get(Training, training_id)
            row.cancel_requested = True
            job = s.get(Job, row.job_id)
            if job.status == "queued":
                self._finish(job, "failed", None, "Training cancelled", time.time())
                webhook = (job.params or {}).get("webhook")
                self._stage(s, row, "training_cancelled", "cancelled before it started", webhook)
        return training

    def delete_training(self, training_id: str, owner: str) -> dict:
        training = self.request_cancel(training_id, owner)
        with self.session(write=True) as s:
            s.delete(s.get(Training, training_id))
        return training


class ModelAllowanceUsed(QuotaExceeded):
    def __init__(self, allowance: int):
        super().__init__(allowance)
        self.tip = (
            f"Your plan allows {allowance} trained models and all are used: delete one, or buy "
            "more with /api/v3/dreambooth/buy_model"
        )


class TrainingNotFound(JobNotFound):
    def __init__(self) -> None:
        super().__init__("Training not found")


def _training_dict(row: Training) -> dict:
    return {
        "training_id": row.training_id,
        "job_id": row.job_id,
        "kind": row.kind,
        "base_model_id": row.base_model_id,
        "instance_prompt": row.instance_prompt,
        "stage": row.stage,
        "log": row.log,
        "cancel_requested": row.cancel_requested,
        "created_at": row.created_at,
    }

"""The durable job queue: submit, claim batches under a lease, progress and completion. Quotas, ETA,
the webhook outbox and trainings are the store's other parts (quotas, estimates, outbox,
trainings), mixed into JobStore."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import case, create_engine, event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from sdserve.errors import JobNotFound, StoreUnavailable
from sdserve.extras import require
from sdserve.jobs.db import (
    Job,
    OutputFile,
    ServerConfig,
    WebhookOutbox,
)
from sdserve.jobs.estimates import Estimates
from sdserve.jobs.eta import Estimator
from sdserve.jobs.outbox import Webhooks
from sdserve.jobs.quotas import Quotas
from sdserve.jobs.trainings import Trainings
from sdserve.jobs.views import (
    FINISHED,
    JobView,
    _finished_values,
    _visible,
)

_FINISHED_CACHE_SIZE = 20_000


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


class JobStore(Quotas, Estimates, Webhooks, Trainings):
    """One database of jobs: the queue itself here; quotas, estimates, the webhook outbox and
    trainings in their own modules, mixed in."""

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

    def ping(self) -> None:
        """One round trip (readiness); StoreUnavailable when the database does not answer."""
        with self.session() as s:
            s.execute(select(1))

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
        training: dict | None = None,
        model_allowance: int | None = None,
    ) -> JobView:
        """Queue a job in one transaction: the key's request counted (refused past its quota or
        queue limit), the row inserted, and for a training its record (see trainings)."""
        with self.session(write=True) as s:
            if key_id is not None:
                self._count_request(s, key_id, monthly_quota)
            job = self._insert_job(
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
            if training is not None:
                self._add_training(s, job, training, model_allowance)
            return JobView.of(job)

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

    def _insert_job(self, s: Session, *, owner: str, queue_limit: int | None, **fields) -> Job:
        if queue_limit is not None:
            self.check_queue(s, owner, queue_limit)
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

    def report_partial(
        self, worker_id: str, job_id: int, partial: dict, lease_seconds: float
    ) -> None:
        """What a running job has made so far (a chat's text), kept as its result until the
        real one replaces it: a streaming answer follows it."""
        with self.session(write=True) as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status == "processing")
                .values(result={"partial": partial}, lease_expires=time.time() + lease_seconds)
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
                .returning(
                    Job.webhook,
                    Job.model_id,
                    Job.kind,
                    Job.cost,
                    Job.total_steps,
                    Job.batch_key,
                    Job.started_at,
                )
                .execution_options(synchronize_session=False)
            ).first()
            if row is None:
                return False
            if row.webhook:
                self.add_webhook(s, job_id, row.webhook, None)
            # Its speed is priced from the time since it was claimed, less a model load: all
            # its worker spent on it (PNG encoding, storage, bookkeeping as well as its stages).
            timings = result.get("timings") or {}
            spent = now - (row.started_at or now) - (timings.get("model_load") or 0.0)
            self._record_speeds(
                s,
                row.model_id,
                row.kind,
                row.batch_key,
                row.cost,
                row.total_steps,
                timings,
                max(spent, generation_time),
                now,
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
                .values(status="queued", lease_owner=None, lease_expires=None, step=0, result=None)
            )

    @staticmethod
    def _finish(job: Job, status: str, result: dict | None, error: str | None, now: float) -> None:
        for name, value in _finished_values(status, result, error, now).items():
            setattr(job, name, value)
        if job.webhook:
            Session.object_session(job).add(
                WebhookOutbox(job_id=job.id, url=job.webhook, payload=None, next_at=now)
            )

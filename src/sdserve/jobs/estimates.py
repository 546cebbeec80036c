"""The store's part that answers queue position and ETA from measured speeds (sdserve.jobs.eta)."""

from __future__ import annotations

import time

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from sdserve.jobs.db import (
    Job,
    StepTiming,
    WorkerRecord,
)
from sdserve.jobs.eta import (
    MIN_ETA_SECONDS,
    MIN_LOAD_SECONDS,
    SHAPE_PREFIX,
    STEP_FLOOR_UNITS,
    Estimator,
    ModelTiming,
    Pending,
    eta_units,
    shape_key,
    timing_key,
    unit_seconds,
)
from sdserve.jobs.views import (
    JobView,
    QueueInfo,
)

_DEFAULT_SECONDS_PER_UNIT = 0.1  # until a model has been measured
_TIMING_SMOOTHING = 0.3
_RATE_CACHE_SECONDS = 5.0
_LIVE_WORKER_SECONDS = 120.0  # as the metrics count live workers
# What eta.eta_units prices a job at, in SQL.
_ETA_UNITS = case(
    (Job.cost > STEP_FLOOR_UNITS * Job.total_steps, Job.cost),
    else_=STEP_FLOOR_UNITS * Job.total_steps,
)
_SHAPE_MEMORY_SECONDS = 86400.0  # however many sizes clients send, a day's worth is read
_BATCH_PULL = 7  # later jobs a batch can take along (the default max_batch_size, less one)


class Estimates:
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
            shape = shape_key(job.batch_key)
            loop = Pending(job.model_id, key, cost / count, left, loading, shape)
            eta = estimator.running(loop) + (count - 1) * estimator.running(
                Pending(job.model_id, key, cost / count, left, shape=shape)
            )
            return QueueInfo(0, round(max(eta, MIN_ETA_SECONDS), 2))
        before = Job.id < job.id
        with self.session() as s:  # the waiting jobs by batch, and the few running ones
            queued = s.execute(
                select(
                    Job.batch_key,
                    Job.model_id,
                    Job.kind,
                    func.min(Job.id),
                    func.count(case((before, 1))),
                    func.coalesce(func.sum(case((before, _ETA_UNITS), else_=0.0)), 0.0),
                    func.count(case((Job.id > job.id, 1))),
                    func.coalesce(func.sum(case((Job.id > job.id, _ETA_UNITS), else_=0.0)), 0.0),
                )
                .where(Job.status == "queued")
                .group_by(Job.batch_key, Job.model_id, Job.kind)
            ).all()
            running = s.execute(
                select(
                    Job.model_id, Job.kind, _ETA_UNITS, Job.step, Job.total_steps, Job.batch_key
                ).where(Job.status == "processing", Job.id != job.id)  # claimed since: once
            ).all()
        ahead = [
            Pending(
                model_id,
                timing_key(model_id, kind),
                cost,
                1 - (step / total if total else 0),
                step == 0 and model_id not in estimator.resident,
                shape_key(batch_key),
            )
            for model_id, kind, cost, step, total, batch_key in running
        ]
        # A worker claims the oldest queued job and the queued jobs of its batch: batches run in
        # the order of their oldest job. This job runs in its batch's loop, so a batch whose
        # oldest job is younger than that runs after it, however old its other jobs.
        own_first = min((row[3] for row in queued if row[0] == job.batch_key), default=job.id)
        position = 0
        # Idle workers claim the first batches at once; the others wait for a worker.
        free = estimator.workers - len({row[5] for row in running})
        for batch_key, model_id, kind, first, count, cost, later, later_cost in sorted(
            queued, key=lambda row: row[3]
        ):
            if first > own_first:
                continue
            position += count
            key_ahead, shape = timing_key(model_id, kind), shape_key(batch_key)
            unit = (cost + later_cost) / (count + later) if count + later else units
            # A batch that runs before this job ends takes later jobs of its kind along, in its
            # one loop: those queued now and, while it waits for a worker, as many more as
            # batches have lately held (jobs still arriving), up to a batch's worth.
            own = 1 if batch_key == job.batch_key else 0
            usual = estimator.batch_size(Pending(model_id, key_ahead, unit, shape=shape))
            arriving = 0 if free > 0 else round(usual) - count - own
            free -= 1
            pulled = min(max(later, arriving), _BATCH_PULL)
            count += max(pulled, 0)
            cost = unit * count
            # One entry per job: each carries its fixed per-job work (eta.PER_JOB_UNITS).
            ahead.extend(
                Pending(model_id, key_ahead, cost / count, shape=shape) for _ in range(count)
            )
        own = Pending(job.model_id, key, units, shape=shape_key(job.batch_key))
        eta = estimator.waiting(own, ahead)
        return QueueInfo(position, round(max(eta, MIN_ETA_SECONDS), 2))

    def _estimator(self) -> Estimator:
        """Measured timings and the live workers' resident models, re-read every few seconds."""
        cached = self._eta_cache
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        now = time.time()
        with self.session() as s:
            timings = {
                row.model_id: ModelTiming(row.seconds_per_unit, row.load_seconds, row.batch_size)
                for row in s.scalars(
                    select(StepTiming).where(  # shapes not seen lately fall back to their model
                        or_(
                            StepTiming.model_id.not_like(f"{SHAPE_PREFIX}%"),
                            StepTiming.updated_at > now - _SHAPE_MEMORY_SECONDS,
                        )
                    )
                )
            }
            workers = s.execute(
                select(
                    WorkerRecord.resident,
                    WorkerRecord.state,
                    WorkerRecord.device,
                    WorkerRecord.seconds_per_unit,
                ).where(WorkerRecord.last_seen > now - _LIVE_WORKER_SECONDS)
            ).all()
        resident = {model for models, _, _, _ in workers for model in (models or [])}
        live = sum(1 for _, state, _, _ in workers if state != "draining")
        gpu = any(device.startswith("cuda") for _, _, device, _ in workers)
        # The slowest live worker's speed probe prices unmeasured work (engine.speed_probe).
        probed = max((speed for _, _, _, speed in workers if speed), default=None)
        estimator = Estimator(timings, resident, live, gpu, probed)
        if timings or probed:  # a worker about to say its speed is not waited for
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
        else:  # over models (shapes are measured under their own keys too)
            found = s.scalar(
                select(func.avg(StepTiming.seconds_per_unit)).where(
                    StepTiming.model_id.not_like(f"{SHAPE_PREFIX}%")
                )
            )
        return found or _DEFAULT_SECONDS_PER_UNIT

    def record_run(
        self,
        model_id: str,
        kind: str,
        batch_key: str,
        cost: float,
        total_steps: int,
        timings: dict[str, float],
        generation_time: float,
    ) -> None:
        """A run outside the queue (a worker's warm-up), measured as a finished job is: until
        the first jobs end, their eta is priced at its speed."""
        with self.session(write=True) as s:
            self._record_speeds(
                s, model_id, kind, batch_key, cost, total_steps, timings, generation_time
            )

    def _record_speeds(
        self,
        s: Session,
        model_id: str,
        kind: str,
        batch_key: str,
        cost: float,
        total_steps: int,
        timings: dict[str, float],
        generation_time: float,
        now: float | None = None,
    ) -> None:
        """The speed a finished run measured, for its model (with its model load) and its shape
        of work. Without `now` every row is written; with it, a row at most once a second per
        process: every completion writing that one row would serialize the workers."""
        load = timings.get("model_load") or 0.0
        load = load if load >= MIN_LOAD_SECONDS else None
        batch = float(timings.get("batch_size") or 1.0)
        per_unit = unit_seconds(generation_time, eta_units(cost, total_steps), batch)
        # How full batches run is the traffic's, not the machine's: a warm-up does not say it.
        traffic = batch if now is not None else None
        keys = [(timing_key(model_id, kind), load), (shape_key(batch_key), None)]
        for key, key_load in keys:
            if key is None:
                continue
            written = self._timing_written.get(key, 0.0)
            if now is None or key_load is not None or written < now - 1.0:
                self._timing_written[key] = now or time.time()
                self._record_timing(s, key, per_unit, key_load, traffic)

    @staticmethod
    def _record_timing(
        s: Session,
        model_id: str,
        seconds_per_unit: float,
        load_seconds: float | None = None,
        batch_size: float | None = 1.0,
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
        if batch_size is not None:
            previous_batch = row.batch_size or batch_size
            row.batch_size = previous_batch + _TIMING_SMOOTHING * (batch_size - previous_batch)
        if load_seconds is not None:
            # The slower of the last load and the smoothed ones: an eta that errs long.
            previous = row.load_seconds or load_seconds
            row.load_seconds = max(
                load_seconds, previous + _TIMING_SMOOTHING * (load_seconds - previous)
            )
        row.updated_at = time.time()

"""What /metrics reads of the whole deployment at scrape time, in one read transaction."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from sdserve.jobs.db import Job, StepTiming, WebhookDelivery, WebhookOutbox, WorkerRecord
from sdserve.jobs.eta import SHAPE_PREFIX
from sdserve.jobs.store import JobStore

_LIVE_WORKER_SECONDS = 120.0


@dataclass
class Snapshot:
    by_status: list  # (status, kind, count)
    recent: list  # (generation_time, result) of the newest finished jobs
    timings: list  # (model_id, seconds_per_unit)
    workers: list  # live worker records
    failed_attempts: int
    given_up: int


def deployment_snapshot(
    store: JobStore, now: float, recent_seconds: float, recent_jobs: int
) -> Snapshot:
    with store.session() as s:
        by_status = s.execute(
            select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind)
        ).all()
        recent = s.execute(
            select(Job.generation_time, Job.result)
            .where(
                Job.status == "success",
                Job.finished_at > now - recent_seconds,
                Job.generation_time.is_not(None),
            )
            .order_by(Job.id.desc())
            .limit(recent_jobs)
        ).all()
        timings = s.execute(  # per model (the per-shape speeds would be a label per size)
            select(StepTiming.model_id, StepTiming.seconds_per_unit).where(
                StepTiming.model_id.not_like(f"{SHAPE_PREFIX}%")
            )
        ).all()
        workers = s.scalars(
            select(WorkerRecord).where(WorkerRecord.last_seen > now - _LIVE_WORKER_SECONDS)
        ).all()
        failed_attempts = s.scalar(
            select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.ok.is_(False))
        )
        given_up = s.scalar(
            select(func.count()).select_from(WebhookOutbox).where(WebhookOutbox.state == "gave_up")
        )
    return Snapshot(by_status, recent, timings, list(workers), failed_attempts or 0, given_up or 0)

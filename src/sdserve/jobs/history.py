"""Reads and operator actions over many jobs: a key's history, the jobs an event stream follows,
a job's webhook deliveries, cancelling, and the per-minute series the console charts."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import or_, select

from sdserve.engine.assets import ADMIN_OWNER
from sdserve.errors import JobNotFound
from sdserve.jobs.db import Job, WebhookDelivery
from sdserve.jobs.store import JobStore
from sdserve.jobs.views import FINISHED, JobView, _visible

ACTIVE = ("queued", "processing")
_CHART_BUCKETS = 60  # one a minute over the last hour
_FOLLOW_LIMIT = 500
_UPLOAD = "upload"  # the rows of files clients stored (store.add_stored_file): no work, no history


@dataclass(frozen=True)
class HistoryFilter:
    owner: str  # ADMIN_OWNER: every key's jobs
    kind: str | None = None
    status: str | None = None  # queued | processing | success | failed | active
    model_id: str | None = None
    before_id: int | None = None  # paging: jobs older than this id
    limit: int = 50


def list_jobs(store: JobStore, query: HistoryFilter) -> list[JobView]:
    """The newest jobs first, as the filter says; deleted jobs and stored uploads left out."""
    stmt = select(Job).where(Job.kind != _UPLOAD).order_by(Job.id.desc()).limit(query.limit)
    if query.owner != ADMIN_OWNER:
        stmt = stmt.where(Job.owner == query.owner)
    if query.kind:
        stmt = stmt.where(Job.kind == query.kind)
    if query.status == "active":
        stmt = stmt.where(Job.status.in_(ACTIVE))
    elif query.status:
        stmt = stmt.where(Job.status == query.status)
    if query.model_id:
        stmt = stmt.where(Job.model_id == query.model_id)
    if query.before_id:
        stmt = stmt.where(Job.id < query.before_id)
    with store.session() as s:
        views = [JobView.of(job) for job in s.scalars(stmt)]
    return [view for view in views if not (view.result or {}).get("deleted")]


def job_kinds(store: JobStore, owner: str) -> list[str]:
    """The kinds of job the owner has run (for a history filter)."""
    stmt = select(Job.kind).where(Job.kind != _UPLOAD).distinct()
    if owner != ADMIN_OWNER:
        stmt = stmt.where(Job.owner == owner)
    with store.session() as s:
        return sorted(s.scalars(stmt))


def jobs_to_follow(store: JobStore, owner: str, finished_since: float) -> list[JobView]:
    """What an event stream looks at each turn: the owner's (or, for ADMIN_OWNER, every) queued
    and running jobs, and the jobs that finished at or after `finished_since`; at most
    `_FOLLOW_LIMIT` of each (the oldest waiting, the newest finished), by id."""
    active = select(Job).where(Job.status.in_(ACTIVE)).order_by(Job.id).limit(_FOLLOW_LIMIT)
    ended = (
        select(Job)
        .where(Job.status.in_(FINISHED), Job.finished_at >= finished_since, Job.kind != _UPLOAD)
        .order_by(Job.id.desc())
        .limit(_FOLLOW_LIMIT)
    )
    if owner != ADMIN_OWNER:
        active, ended = active.where(Job.owner == owner), ended.where(Job.owner == owner)
    with store.session() as s:
        jobs = [*s.scalars(active), *s.scalars(ended)]
        return sorted((JobView.of(job) for job in jobs), key=lambda job: job.id)


def running_by_worker(store: JobStore) -> dict[str, list[int]]:
    """The ids of the jobs each worker holds now (its batch)."""
    with store.session() as s:
        rows = s.execute(
            select(Job.lease_owner, Job.id).where(Job.status == "processing").order_by(Job.id)
        ).all()
    held: dict[str, list[int]] = {}
    for worker_id, job_id in rows:
        held.setdefault(worker_id, []).append(job_id)
    return held


def webhook_deliveries(store: JobStore, job_id: int) -> list[dict]:
    with store.session() as s:
        rows = s.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.id)
        )
        return [
            {
                "attempt": row.attempt,
                "url": row.url,
                "sent_at": row.sent_at,
                "status_code": row.status_code,
                "ok": row.ok,
                "error": row.error,
            }
            for row in rows
        ]


def cancel_job(store: JobStore, job_id: int, owner: str, message: str) -> JobView:
    """Fail a queued or running job now. A running job's worker finishes its loop, and its
    result is then dropped (the job is no longer its to complete)."""
    with store.session(write=True) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise JobNotFound()
        _visible(JobView.of(job), owner)
        if job.status in FINISHED:
            raise JobNotFound("The request has already finished")
        store._finish(job, "failed", None, message, time.time())
        s.flush()
        return JobView.of(job)


def throughput_series(store: JobStore, now: float) -> dict:
    """Per minute over the last hour: images (and other outputs) made, and jobs waiting."""
    start = now - _CHART_BUCKETS * 60
    with store.session() as s:
        rows = s.execute(
            select(Job.created_at, Job.started_at, Job.finished_at, Job.status, Job.result).where(
                Job.kind != _UPLOAD,
                or_(Job.status.in_(ACTIVE), Job.finished_at >= start),
            )
        ).all()
    outputs = [0] * _CHART_BUCKETS
    depth = [0] * _CHART_BUCKETS
    for created, started, finished, status, result in rows:
        if status == "success" and finished is not None and finished >= start:
            index = min(int((finished - start) // 60), _CHART_BUCKETS - 1)
            outputs[index] += len((result or {}).get("output_keys") or []) or 1
        for index in range(_CHART_BUCKETS):
            moment = start + (index + 1) * 60  # the end of the minute
            left_queue = started if started is not None else finished
            if created <= moment and (left_queue is None or left_queue > moment):
                depth[index] += 1
    return {
        "start": start,
        "bucket_seconds": 60,
        "images_per_second": [round(count / 60, 4) for count in outputs],
        "outputs": outputs,
        "queue_depth": depth,
    }

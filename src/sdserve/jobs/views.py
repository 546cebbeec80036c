"""Detached views of job rows, shared by the store's parts."""

from __future__ import annotations

from dataclasses import dataclass

from sdserve.engine.assets import ADMIN_OWNER  # noqa: F401 - one definition, used here
from sdserve.errors import JobNotFound
from sdserve.jobs.db import (
    Job,
)

FINISHED = ("success", "failed")


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



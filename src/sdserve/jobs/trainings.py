"""The store's part that keeps trainings: their public ids, stages, readable logs and cancels."""

from __future__ import annotations

import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sdserve.errors import JobNotFound, QuotaExceeded
from sdserve.jobs.db import (
    Job,
    Training,
)
from sdserve.jobs.views import (
    ADMIN_OWNER,
)


class Trainings:
    def _add_training(
        self, s: Session, job: Job, training: dict, model_allowance: int | None
    ) -> None:
        """The training row of a job being submitted (same transaction), at `deploying_gpu`.
        `training`: training_id, kind, base_model_id, instance_prompt and the stage webhook."""
        if model_allowance is not None:
            used = s.scalar(select(func.count()).where(Training.owner == job.owner))
            if used >= model_allowance:
                raise ModelAllowanceUsed(model_allowance)
        row = Training(
            training_id=training["training_id"],
            job_id=job.id,
            owner=job.owner,
            kind=training["kind"],
            base_model_id=training["base_model_id"],
            instance_prompt=training["instance_prompt"],
            stage="deploying_gpu",
            log="",
            created_at=time.time(),
        )
        s.add(row)
        line = "request received, waiting for a GPU"
        self._stage(s, row, "deploying_gpu", line, training.get("webhook"))

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

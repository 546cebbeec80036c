"""SQLAlchemy tables for jobs, webhook deliveries, API keys and step timings (SQLite or PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    # One id space for every family, so any fetch path finds any job (reference §15.14).
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))  # text2img | img2img | inpaint | ...
    family: Mapped[str] = mapped_column(String(32))  # which wire family submitted it
    status: Mapped[str] = mapped_column(
        String(16), default="queued"
    )  # queued|processing|success|failed
    model_id: Mapped[str] = mapped_column(String(200))
    # Jobs with the same batch_key can share one denoising loop (model, kind, size, steps, scheduler).
    batch_key: Mapped[str] = mapped_column(String(400))
    owner: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict] = mapped_column(JSON)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[float] = mapped_column(Float, default=1.0)  # work units, for ETA
    track_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    webhook: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    generation_time: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        Index("ix_jobs_status_id", "status", "id"),
        Index("ix_jobs_owner_status", "owner", "status"),
    )


class WebhookOutbox(Base):
    """A webhook owed: a job's final answer (payload None: built when sent) or a training stage."""

    __tablename__ = "webhook_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending|delivered|gave_up
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_outbox_due", "state", "next_at"),)


class WebhookDelivery(Base):
    """Every delivery attempt of a job's webhook, kept for operators (and tests) to inspect."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    outbox_id: Mapped[int] = mapped_column(Integer, index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    sent_at: Mapped[float] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    ok: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_hash: Mapped[str] = mapped_column(
        String(64), unique=True
    )  # sha256 hex; keys are never stored
    prefix: Mapped[str] = mapped_column(String(12))  # first characters, to tell keys apart in lists
    label: Mapped[str] = mapped_column(String(200), default="")
    queue_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class StepTiming(Base):
    """Measured seconds per work unit for a model, smoothed; drives `eta` and `queue_time`."""

    __tablename__ = "step_timings"

    model_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    seconds_per_unit: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Training(Base):
    """A fine-tuning run (§4): its public 10-character id, stage, readable log, and what it made."""

    __tablename__ = "trainings"

    training_id: Mapped[str] = mapped_column(String(10), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # lora | dreambooth | sandbox
    base_model_id: Mapped[str] = mapped_column(String(200))
    instance_prompt: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(String(40))
    log: Mapped[str] = mapped_column(Text, default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)

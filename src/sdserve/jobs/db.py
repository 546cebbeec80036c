"""SQLAlchemy tables (SQLite or PostgreSQL): jobs, webhooks, keys and plans, models, workers."""

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
    # How the submitting era of clients is answered (v3, community, v4video, ...); the column
    # kept its first name, "family", which now names endpoint families (sdserve.families).
    dialect: Mapped[str] = mapped_column("family", String(32))
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


class OutputFile(Base):
    """Which job made an output key, and for whom: a job's own outputs may be its owner's inputs."""

    __tablename__ = "output_files"

    key: Mapped[str] = mapped_column(String(500), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(String(64))


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
    plan: Mapped[str | None] = mapped_column(String(64), nullable=True)
    parent_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the key that bought it
    purchased_models: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class StepTiming(Base):
    """Measured seconds per work unit for a model, or for a shape of work (`shape:<batch key>`),
    smoothed; drives `eta` and `queue_time`."""

    __tablename__ = "step_timings"

    model_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    seconds_per_unit: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    load_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # a cold load
    batch_size: Mapped[float | None] = mapped_column(Float, nullable=True)  # jobs per loop, lately


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


class ModelEntry(Base):
    """A model brought in by `load_model` / `load_vae` (or synced): registered only once it loaded."""

    __tablename__ = "models"

    model_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    # stable_diffusion | stable_diffusion_xl | controlnet | lora | embeddings | vae
    category: Mapped[str] = mapped_column(String(32))
    location: Mapped[str] = mapped_column(Text)  # a file or folder, or "hf:<repo>" for the hub
    # a local model whose configs a single file loads with (None: the shipped ones)
    config_model_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    url: Mapped[str] = mapped_column(Text, default="")  # where it came from
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    owned: Mapped[bool] = mapped_column(Boolean, default=True)  # delete_model removes the files
    owner: Mapped[str] = mapped_column(String(64), default="admin")
    name: Mapped[str] = mapped_column(String(200), default="")
    visibility: Mapped[str] = mapped_column(String(16), default="public")
    loaded_at: Mapped[float] = mapped_column(Float)


class Broadcast(Base):
    """An order for every worker (clear the cache, evict a model, reload storage, restart)."""

    __tablename__ = "broadcasts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    command: Mapped[str] = mapped_column(String(32))
    argument: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)


class WorkerRecord(Base):
    """What a worker process advertises: its device and the models it has resident."""

    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200))
    device: Mapped[str] = mapped_column(String(200))
    gpu_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    gpu_memory_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    resident: Mapped[list] = mapped_column(JSON, default=list)
    state: Mapped[str] = mapped_column(String(16), default="idle")  # idle|busy|draining
    model_loads: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Its speed probe's seconds per work unit (engine.speed_probe): the eta of unmeasured work.
    seconds_per_unit: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_seen: Mapped[float] = mapped_column(Float, index=True)


class ServerConfig(Base):
    """Settings changed at run time through the API (the S3 storage of `update_s3`)."""

    __tablename__ = "server_config"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict] = mapped_column(JSON)
    updated_at: Mapped[float] = mapped_column(Float)


class Plan(Base):
    """A local plan that keys are sold on: a monthly request quota and a queue limit."""

    __tablename__ = "plans"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    requests_per_month: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: no cap
    queue_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    included_models: Mapped[int] = mapped_column(Integer, default=0)  # trainings allowed
    self_service: Mapped[bool] = mapped_column(Boolean, default=False)  # any key may buy it


class KeyUsage(Base):
    """Requests a key made in one calendar month (UTC), counted as jobs are accepted."""

    __tablename__ = "key_usage"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    period: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    requests: Mapped[int] = mapped_column(Integer, default=0)

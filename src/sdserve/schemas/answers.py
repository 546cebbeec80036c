"""The shapes of the answers, for the OpenAPI document: handlers build their bodies (api/envelope.py)
and send them as they are, rendered once; these models say what a client gets back, so that
/docs shows it and the fuzz run checks every answer against it. Extra fields are allowed, as
clients of the hosted API ignore what they do not know."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- the envelope every route may answer -------------------------------------------------------


class ErrorAnswer(Answer):
    """An error. With `SDSERVE_ERROR_STATUS=legacy` (the default) it comes with HTTP 200, as the
    hosted API's did (429 for a full queue); with `http`, with the error's own 4xx status."""

    status: Literal["error"]
    message: str
    messege: str | dict[str, list[str]] = Field(
        description="`message` again, or for a validation error the failing fields' messages"
    )
    tip: str | None = None
    tips: str | None = None
    retry_after: float | None = Field(None, description="seconds, when the queue limit is hit")


class MessageAnswer(Answer):
    """A plain answer: its status and one message, under both of the wire's spellings."""

    status: Literal["success"]
    message: str
    messege: str


# ---- a job (every family's submission and every fetch) ------------------------------------------


class Progress(Answer):
    step: int
    total_steps: int


class JobSuccess(Answer):
    status: Literal["success"]
    id: int
    generationTime: float
    output: list[str] | str = Field(description="the output URLs; one string on legacy paths")
    proxy_links: list[str]
    nsfw_content_detected: bool
    meta: dict[str, Any]
    track_id: str | None = None
    webhook_status: str = ""
    tip: str = ""
    timings: dict[str, float] = Field(
        default_factory=dict, description="sdserve: where the time went, in seconds"
    )
    output_url: str | None = Field(None, description="v7 paths: the first output")


class JobProcessing(Answer):
    status: Literal["processing"]
    id: int
    eta: float = Field(description="seconds until the result, queue wait and model load included")
    message: str
    messege: str
    fetch_result: str
    output: list[str]
    future_links: list[str]
    proxy_links: list[str]
    meta: dict[str, Any]
    track_id: str | None = None
    tip: str = ""
    webhook_status: str = ""
    queue_position: int = Field(description="sdserve: jobs ahead of this one")
    progress: Progress
    output_url: None = None


class JobFailed(Answer):
    status: Literal["failed"]
    id: int
    message: str
    messege: str
    output: list[str]
    tip: str
    meta: dict[str, Any]
    track_id: str | None = None


JobAnswer = Annotated[
    JobSuccess | JobProcessing | JobFailed | ErrorAnswer, Field(discriminator="status")
]


# ---- models and the server (admin) --------------------------------------------------------------


class ImportStarted(MessageAnswer):
    id: int
    model_id: str
    fetch_result: str


class ModelVerdict(Answer):
    status: Literal["success", "error"]
    message: str
    messege: str
    model_id: str


class ModelOnServer(Answer):
    load_data: str = Field(description="MM/DD/YYYY HH:MM:SS, UTC")
    model_id: str
    source: str
    model_category: str | None = None
    model_name: str | None = None
    url: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    visibility: str | None = None
    config_model_id: str | None = None
    file: bool | None = None


class AllModels(Answer):
    status: Literal["success"]
    models: list[ModelOnServer]


class ModelDeleted(MessageAnswer):
    model_id: str


class Skipped(Answer):
    model_id: str
    reason: str


class ModelsSynced(MessageAnswer):
    model_list: list[str]
    skipped: list[Skipped]


class Gpu(Answer):
    name: str
    memory_mb: int | None
    worker: str


class WorkerDetails(Answer):
    worker_id: str
    hostname: str
    device: str
    state: str
    resident: list[str]
    last_seen: float


class SystemDetails(Answer):
    status: Literal["ok"]
    model_count: int
    queue_time: int
    queue_num: int
    version: str
    gpu: list[Gpu]
    cpu: dict[str, Any]
    ram: dict[str, int]
    disk: dict[str, Any]
    loaded_models: list[str]
    workers: list[WorkerDetails]
    storage: dict[str, Any]


class QueueCleared(MessageAnswer):
    cleared: int


class StorageUpdated(MessageAnswer):
    s3: dict[str, Any] = Field(description="the bucket settings, secret left out")


class Schedulers(Answer):
    status: Literal["success"]
    schedulers: list[str]


class SystemLoad(Answer):
    status: Literal["ok"]
    queue_num: int
    queue_time: int = Field(description="seconds of work waiting")


class ModelListEntry(Answer):
    model_id: str
    status: Literal["model_ready", "downloadable", "unavailable"]
    model_name: str
    description: str
    source: str
    availability: Literal["ready", "downloadable", "unavailable"]
    created_at: str | None = None
    instance_prompt: str = ""
    screenshots: str = ""
    hub_repo: str | None = None
    size_bytes: int | None = None


class ReloadStarted(MessageAnswer):
    id: int


# ---- training ------------------------------------------------------------------------------------


class TrainingStarted(MessageAnswer):
    data: str
    training_id: str
    model_id: str


class TrainingProgress(Answer):
    step: int
    total_steps: int
    text: str = Field(description='"40/200"')


class TrainingStatus(Answer):
    status: Literal["success", "failed"]
    message: str = Field(description="the stage: deploying_gpu, training_started, ...")
    messege: str
    data: str = Field(description="the training's log")
    training_id: str
    model_id: str
    progress: TrainingProgress
    eta: float | None = Field(description="seconds left; null before the first step")


class TrainingDone(MessageAnswer):
    training_id: str


class TrainingEntry(Answer):
    training_id: str
    model_id: str
    status: str
    training_type: str
    base_model_id: str
    instance_prompt: str | None = None
    created_at: float


class Trainings(MessageAnswer):
    data: list[TrainingEntry]


# ---- utilities -----------------------------------------------------------------------------------


class ImageStored(MessageAnswer):
    link: str
    request_id: int


class TemporaryUrl(Answer):
    status: Literal["success"]
    id: int
    output: list[str]


class ImageUploaded(MessageAnswer):
    image_url: str
    id: int


class NsfwVerdict(Answer):
    """The hosted API's exact shape: no `status` field."""

    images: str
    has_nsfw_concept: list[bool]


class PromptVerdict(Answer):
    status: Literal["success"]
    is_cp: bool
    is_nsfw: bool
    original_prompt: str
    filtered_prompt: str


# ---- plans ---------------------------------------------------------------------------------------


class NewKey(Answer):
    key: str
    plan: str


class SubscriptionBought(MessageAnswer):
    data: NewKey


class ModelsBought(MessageAnswer):
    purchased_models: int
    used_models: int
    available_models: int


class Usage(Answer):
    plan: str | None
    total_api_call: int | None
    api_call_used: int
    api_call_remaining: int | None
    percentage_used: int


class Products(Answer):
    imagen: Usage


class SubscribedProducts(Answer):
    status: Literal["success"]
    data: Products


class PlanEntry(Answer):
    name: str
    requests_per_month: int | None
    queue_limit: int | None
    included_models: int
    self_service: bool


class Plans(Answer):
    status: Literal["success"]
    plans: list[PlanEntry]


# ---- operations ----------------------------------------------------------------------------------


class Health(Answer):
    status: Literal["ok"]


class Readiness(Answer):
    status: Literal["ready", "not_ready"]
    database: str = Field(description='"ok", or why not')
    storage: str = Field(description='"ok", or why not')


class OperationError(Answer):
    status: Literal["error"]
    message: str

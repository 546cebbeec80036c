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


# ---- chat: ModelsLab's routes (a chat job answered with its text) --------------------------------


class ChatUsage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatSuccess(Answer):
    status: Literal["success"]
    message: str = Field(description="the answer's text")
    generationTime: float
    chat_id: int
    id: int
    meta: dict[str, Any]
    track_id: str | None = None
    usage: ChatUsage
    finish_reason: str | None


class ChatProcessing(Answer):
    status: Literal["processing"]
    message: str
    messege: str
    eta: float
    fetch_result: str = Field(description="get_queued_response, to call with this chat_id")
    tip: str
    chat_id: int
    id: int
    meta: dict[str, Any]
    track_id: str | None = None


class ChatFailed(Answer):
    status: Literal["failed"]
    message: str
    messege: str
    chat_id: int
    id: int
    meta: dict[str, Any]
    track_id: str | None = None


ChatJobAnswer = Annotated[
    ChatSuccess | ChatProcessing | ChatFailed | ErrorAnswer, Field(discriminator="status")
]


class ChatTurn(Answer):
    role: str
    content: str


class ChatConversation(Answer):
    status: Literal["success"]
    chat_id: int
    chat_status: str = Field(description="the chat job's status: queued, processing, ...")
    messages: list[ChatTurn]
    track_id: str | None = None


# ---- chat: OpenAI's routes (OpenAI's objects, and OpenAI's errors with real status codes) --------


class OpenAIErrorDetail(Answer):
    message: str
    type: str = Field(description="invalid_request_error, insufficient_quota, server_error, ...")
    param: str | None
    code: str | None = Field(description="invalid_api_key, model_not_found, invalid_value, ...")


class OpenAIError(Answer):
    """An OpenAI error object, with its HTTP status (400, 401, 404, 429, 502, 504, ...)."""

    error: OpenAIErrorDetail


class V7Error(OpenAIError):
    """v7's error: OpenAI's, with ModelsLab's `status` and `message` for its clients."""

    status: Literal["error"]
    message: str


class CompletionMessage(Answer):
    role: str
    content: str | None


class ChatCompletionChoice(Answer):
    index: int
    message: CompletionMessage
    finish_reason: str | None
    logprobs: Any = None


class ChatCompletion(Answer):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: ChatUsage | None = None
    system_fingerprint: str | None = None


class V7ChatCompletion(ChatCompletion):
    """v7's completion: OpenAI's, with ModelsLab's `status` and the answer's text as `message`."""

    status: Literal["success"]
    message: str | None


class TextCompletionChoice(Answer):
    index: int
    text: str
    finish_reason: str | None
    logprobs: Any = None


class TextCompletion(Answer):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextCompletionChoice]
    usage: ChatUsage | None = None
    system_fingerprint: str | None = None


class ModelCard(Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelCards(Answer):
    object: Literal["list"]
    data: list[ModelCard]


# ---- the console ---------------------------------------------------------------------------------


class Me(Answer):
    status: Literal["success"]
    is_admin: bool
    plan: str | None
    queue_limit: int | None
    monthly_quota: int | None = Field(description="requests a month; null: no cap")
    used_this_month: int


class PickerModel(Answer):
    model_id: str
    status: str
    source: str


class ConsoleOptions(Answer):
    status: Literal["success"]
    models: list[PickerModel]
    loras: list[str]
    embeddings: list[str]
    vaes: list[str]
    controlnets: list[str]
    schedulers: list[str]
    default_model: str


class JobSummary(Answer):
    id: int
    kind: str
    status: str = Field(description="queued, processing, success or failed")
    model_id: str
    prompt: str | None
    step: int
    total_steps: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    generation_time: float | None
    output: list[str]
    error: str | None
    owner: str | None = Field(None, description="to the admin key only")


class Jobs(Answer):
    status: Literal["success"]
    jobs: list[JobSummary]
    kinds: list[str] = Field(description="the kinds of job this key has run")


class WebhookDelivery(Answer):
    attempt: int
    url: str
    sent_at: float
    status_code: int | None
    ok: bool
    error: str | None


class JobDetail(JobSummary):
    request: dict[str, Any]
    inputs: dict[str, str]
    meta: dict[str, Any]
    timings: dict[str, Any]
    webhook: str | None
    webhook_deliveries: list[WebhookDelivery]
    track_id: str | None
    attempts: int
    queue_position: int | None = Field(None, description="while queued or running")
    eta: float | None = Field(None, description="while queued or running")


class JobDetails(Answer):
    status: Literal["success"]
    job: JobDetail


class JobDone(MessageAnswer):
    id: int


class ConsoleTraining(Answer):
    training_id: str
    job_id: int
    kind: str
    base_model_id: str
    instance_prompt: str | None
    stage: str
    log: list[str] = Field(description="the log's last 20 lines")
    cancel_requested: bool
    created_at: float
    status: str
    step: int
    total_steps: int


class ConsoleTrainings(Answer):
    status: Literal["success"]
    trainings: list[ConsoleTraining]


class QueuedJob(JobSummary):
    queue_position: int
    eta: float
    batch_key: str


class AdminQueue(Answer):
    status: Literal["success"]
    jobs: list[QueuedJob]


class ConsoleWorker(Answer):
    worker_id: str
    hostname: str
    device: str
    gpu_name: str | None
    gpu_memory_mb: int | None
    resident: list[str]
    state: str
    last_seen: float
    model_loads: int
    running: list[int] = Field(description="the ids of the jobs it holds now")
    batch_size: int


class AdminWorkers(Answer):
    status: Literal["success"]
    workers: list[ConsoleWorker]


class WorkerOrdered(MessageAnswer):
    worker_id: str


class Throughput(Answer):
    status: Literal["success"]
    start: float
    bucket_seconds: int
    images_per_second: list[float]
    outputs: list[int]
    queue_depth: list[int]


class KeyEntry(Answer):
    id: int
    prefix: str
    label: str
    queue_limit: int | None
    plan: str | None
    created_at: float
    revoked: bool
    used_this_month: int


class AdminKeys(Answer):
    status: Literal["success"]
    keys: list[KeyEntry]


class KeyCreated(MessageAnswer):
    key: str = Field(description="the new key, shown this once")
    prefix: str
    plan: str | None


class KeyPlanSet(MessageAnswer):
    id: int
    plan: str | None

"""The ModelsLab envelope, written in one place: error bodies, job answers (success, processing,
failed) and plain `ok` answers. It is the only module that writes the wire's `messege`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from fastapi.responses import JSONResponse

from sdserve.errors import FieldError, RateLimited, SdserveError, ValidationFailed
from sdserve.jobs.views import JobView, QueueInfo
from sdserve.settings import Settings

UrlOf = Callable[[str], str]  # storage key -> public URL
_DEFAULT_FETCH_PATH = "/api/v3/fetch/{id}"
_DEFAULT_PROCESSING_MESSAGE = "Try to fetch request after seconds estimated"
_PROCESSING_TIP = "Your image is processing in background, you can get this image using fetch API"


class FastJSON(JSONResponse):
    """JSON rendered by orjson: several times quicker than the standard library on job answers."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def answer(body: dict[str, Any]) -> JSONResponse:
    """A finished answer as a response: FastAPI's encoder walks every value of a returned dict
    again (a third of a fetch's time); these bodies are plain JSON already."""
    return FastJSON(body)


def message_body(status: str, message: str, **extra: Any) -> dict[str, Any]:
    """A plain answer: its status and one message, under both of the wire's spellings."""
    return {"status": status, "message": message, "messege": message, **extra}


def ok(message: str, **extra: Any) -> dict[str, Any]:
    return message_body("success", message, **extra)


def error_body(exc: SdserveError) -> dict[str, Any]:
    if isinstance(exc, ValidationFailed | FieldError):
        # Go clients decode `messege` as a field -> list map; JS/Python SDKs read `message` text.
        fields = exc.fields if isinstance(exc, ValidationFailed) else {exc.field: [exc.message]}
        body: dict[str, Any] = {"status": "error", "messege": fields, "message": exc.message}
    else:
        body = {"status": "error", "message": exc.message, "messege": exc.message}
    if exc.tip:
        body["tip"] = exc.tip
    if isinstance(exc, RateLimited):
        body["tips"] = "you are sending too many requests at once, please wait and try again"
        body["retry_after"] = exc.retry_after
    return body


def error_response(exc: SdserveError, settings: Settings) -> JSONResponse:
    if settings.error_status == "http":
        status = exc.http_status
    else:  # legacy: the hosted API answered application errors with 200, queue limits with 429
        status = 429 if isinstance(exc, RateLimited) else 200
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


def http_error_body(status_code: int, detail: str) -> dict[str, Any]:
    message = "Not found" if status_code == 404 else detail
    return {"status": "error", "message": message, "messege": message}


# ---- job answers (reference §1.3, §1.4) --------------------------------------------------------


def _answer(job: JobView) -> dict[str, Any]:
    """How the job's dialect is answered, fixed when it was accepted (see submit)."""
    return job.params.get("answer", {})


def fetch_url(base_url: str, job: JobView) -> str:
    return base_url + _answer(job).get("fetch_path", _DEFAULT_FETCH_PATH).format(id=job.id)


def job_meta(job: JobView) -> dict[str, Any]:
    """The echo of effective parameters: what was fixed at submit, plus what the engine added.
    Long values the params hold already (the prompt) are stored once, as references."""
    meta = {
        key: job.params.get(value["$param"]) if isinstance(value, dict) and "$param" in value else value
        for key, value in job.params.get("meta", {}).items()
    }
    return meta | (job.result or {}).get("meta", {})


def success_body(job: JobView, url_of: UrlOf) -> dict[str, Any]:
    result = job.result or {}
    output = [url_of(key) for key in result.get("output_keys", [])]
    body = {
        "status": "success",
        "generationTime": round(job.generation_time or 0.0, 3),
        "id": job.id,
        "output": output,
        "proxy_links": output,
        "nsfw_content_detected": result.get("nsfw_content_detected", False),
        "webhook_status": "",
        "tip": "",
        "meta": job_meta(job),
        "track_id": job.track_id,
        # Not in the hosted API: where the time went (seconds).
        "timings": result.get("timings", {}),
    }
    answer = _answer(job)
    if answer.get("output_url"):
        body["output_url"] = output[0] if output else None
    if answer.get("whole_seconds"):
        body["generationTime"] = round(job.generation_time or 0.0)
    if answer.get("single_output"):  # legacy endpoints answer one URL string
        body["output"] = output[0] if output else ""
    return body


def processing_body(job: JobView, info: QueueInfo, base_url: str, url_of: UrlOf) -> dict[str, Any]:
    message = _answer(job).get("processing_message", _DEFAULT_PROCESSING_MESSAGE)
    links = [url_of(key) for key in job.params.get("output_keys", [])]
    body = {
        "status": "processing",
        "tip": _PROCESSING_TIP,
        "eta": info.eta,
        "messege": message,
        "message": message,
        "webhook_status": "",
        "fetch_result": fetch_url(base_url, job),
        "id": job.id,
        "output": [],
        "future_links": links,
        "proxy_links": links,
        "meta": job_meta(job),
        "track_id": job.track_id,
        # Not in the hosted API; harmless to every client found (reference §1.4).
        "queue_position": info.position,
        "progress": {"step": job.step, "total_steps": job.total_steps},
    }
    if _answer(job).get("output_url"):
        body["output_url"] = None
    return body


def failed_body(job: JobView) -> dict[str, Any]:
    reason = job.error or "Failed, Try Again"
    return {
        "status": "failed",
        "id": job.id,
        "messege": reason,
        "message": reason,
        "output": [],
        "tip": "Failed, Try Again",
        "track_id": job.track_id,
        "meta": job_meta(job),
    }


def job_body(job: JobView, info: QueueInfo | None, base_url: str, url_of: UrlOf) -> dict[str, Any]:
    if job.status == "success":
        return success_body(job, url_of)
    if job.status == "failed":
        return failed_body(job)
    assert info is not None
    return processing_body(job, info, base_url, url_of)

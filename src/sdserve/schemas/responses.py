"""The ModelsLab response envelope for jobs: success, processing, failed, as the wire expects them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdserve.jobs.store import JobView, QueueInfo

# Where each family's `fetch_result` points (reference §1.4): clients POST {key} to it verbatim.
FETCH_PATHS = {
    "v3": "/api/v3/fetch/{id}",
    "community": "/api/v3/dreambooth/fetch/{id}",
    "images": "/api/v6/images/fetch/{id}",
    "realtime": "/api/v6/realtime/fetch/{id}",
    "v4video": "/api/v3/dreambooth/fetch/{id}",
    "v5video": "/api/v3/fetch/{id}",
    "video": "/api/v6/video/fetch/{id}",
    "enterprise": "/api/v1/enterprise/video/fetch/{id}",
}
_PROCESSING_MESSAGES = {
    "v3": "Try to fetch request after given estimated time",
    "v4video": "Try to fetch request after given estimated time",
}
_DEFAULT_PROCESSING_MESSAGE = "Try to fetch request after seconds estimated"
_PROCESSING_TIP = "Your image is processing in background, you can get this image using fetch API"


def fetch_url(base_url: str, job: JobView) -> str:
    return base_url + FETCH_PATHS.get(job.family, "/api/v3/fetch/{id}").format(id=job.id)


UrlOf = Callable[[str], str]  # storage key -> public URL


def future_links(job: JobView, url_of: UrlOf) -> list[str]:
    """The URLs the outputs will have: names are fixed when the job is accepted."""
    return [url_of(key) for key in job.params.get("output_keys", [])]


def success_body(job: JobView, url_of: UrlOf) -> dict[str, Any]:
    result = job.result or {}
    output = [url_of(key) for key in result.get("output_keys", [])]
    return {
        "status": "success",
        "generationTime": round(job.generation_time or 0.0, 3),
        "id": job.id,
        "output": output,
        "proxy_links": output,
        "nsfw_content_detected": result.get("nsfw_content_detected", False),
        "webhook_status": "",
        "tip": "",
        "meta": result.get("meta", job.params.get("meta", {})),
        "track_id": job.track_id,
        # Not in the hosted API: where the time went (seconds).
        "timings": result.get("timings", {}),
    }


def processing_body(job: JobView, info: QueueInfo, base_url: str, url_of: UrlOf) -> dict[str, Any]:
    message = _PROCESSING_MESSAGES.get(job.family, _DEFAULT_PROCESSING_MESSAGE)
    links = future_links(job, url_of)
    return {
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
        "meta": job.params.get("meta", {}),
        "track_id": job.track_id,
        # Not in the hosted API; harmless to every client found (reference §1.4).
        "queue_position": info.position,
        "progress": {"step": job.step, "total_steps": job.total_steps},
    }


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
        "meta": job.params.get("meta", {}),
    }


def job_body(job: JobView, info: QueueInfo | None, base_url: str, url_of: UrlOf) -> dict[str, Any]:
    if job.status == "success":
        return success_body(job, url_of)
    if job.status == "failed":
        return failed_body(job)
    assert info is not None
    return processing_body(job, info, base_url, url_of)

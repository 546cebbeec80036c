"""Named errors raised inside sdserve; `sdserve.api.envelope` turns them into ModelsLab error bodies."""

from __future__ import annotations


class SdserveError(Exception):
    """Base class: `message` is what the client reads; `http_status` is used by the `http` status policy."""

    http_status = 400

    def __init__(self, message: str, *, tip: str | None = None):
        super().__init__(message)
        self.message = message
        self.tip = tip


class InvalidKey(SdserveError):
    http_status = 401

    def __init__(self, message: str = "Invalid Api Key"):
        super().__init__(
            message,
            tip="1. Make sure you are passing Content-Type: application/json in header. "
            "2. Make sure you are doing POST request. 3. Make sure your request body is valid JSON. "
            "4. Make sure your API key is valid.",
        )


class InvalidRequest(SdserveError):
    """The body is not JSON, not an object, or too large."""


class ValidationFailed(SdserveError):
    """Field-level problems, reported as a field -> list of messages map (Laravel style)."""

    http_status = 422

    def __init__(self, fields: dict[str, list[str]]):
        super().__init__("; ".join(m for msgs in fields.values() for m in msgs))
        self.fields = fields


class FieldError(SdserveError):
    """A problem with one request field, named by `field`: reported like ValidationFailed."""

    http_status = 422
    field = "body"

    def __init__(self, message: str, *, field: str | None = None, tip: str | None = None):
        super().__init__(message, tip=tip)
        if field is not None:
            self.field = field


class ModelMismatch(FieldError):
    """The model exists but cannot do what the request asks (an SDXL model for AnimateDiff)."""

    field = "model_id"


class ModelNotFound(SdserveError):
    http_status = 404

    def __init__(self, model_id: str):
        super().__init__("Model not found")
        self.model_id = model_id


class ModelUnavailable(SdserveError):
    """The model is known but its weights cannot be had here (offline, missing file)."""

    http_status = 503


class JobNotFound(SdserveError):
    http_status = 404

    def __init__(self, message: str = "Request not found"):
        super().__init__(message)


class RateLimited(SdserveError):
    http_status = 429

    def __init__(self, limit: int, retry_after: int = 30):
        super().__init__(f"Rate limit exceeded. Maximum {limit} queued requests allowed.")
        self.retry_after = retry_after


class BadImage(SdserveError):
    """An input image that cannot be fetched, decoded, or is over the limits."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class SchedulerNotSupported(SdserveError):
    def __init__(self, name: str, supported: list[str]):
        super().__init__(
            f"Scheduler {name!r} cannot be used with latent diffusion models. "
            f"Use one of: {', '.join(supported)}"
        )
        self.supported = supported


class EngineError(SdserveError):
    """A generation failed inside the engine; the job is marked failed with this message."""

    http_status = 500


class StoreUnavailable(SdserveError):
    """The job database cannot be reached right now."""

    http_status = 503


class S3Unavailable(SdserveError):
    """The S3 bucket cannot be used right now; the message never holds a secret."""

    http_status = 503


class QuotaExceeded(SdserveError):
    """The key's plan allows no more requests this month (or no more trained models)."""

    http_status = 402

    def __init__(self, quota: int):
        super().__init__(
            "Insufficient credits. Please add more credits to continue.",
            tip=f"Your plan allows {quota} API calls a month and they are used up; the count "
            "starts again on the 1st (UTC), or ask the operator for a bigger plan.",
        )


class NotAvailable(SdserveError):
    """Something this server knows about but cannot do in its current setup."""

    http_status = 400

"""Wire models of the requests that are no family's (fetch, models, admin, utilities, plans, the
console), for the OpenAPI document. Their handlers read the caller's merged fields (api/deps.py) and
check them with the hosted API's own messages; these say what those fields are."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sdserve.schemas.models import LoadModelRequest


class KeyOnly(BaseModel):
    """Only the key (it may also come as `Authorization: Bearer <key>` or a `key` header)."""

    model_config = ConfigDict(extra="allow")

    key: str | None = Field(None, description="your API key")


class FetchRequest(KeyOnly):
    request_id: int | str | None = Field(None, description="the job's id")
    id: int | str | None = Field(None, description="the job's id (older spelling)")


class ModelIdRequest(KeyOnly):
    model_id: str


class LoadModelBody(LoadModelRequest):
    key: str | None = Field(None, description="your API key")


class SyncModelsRequest(KeyOnly):
    sync_url: str = Field(description="the other sdserve server's base URL")
    sync_key: str = Field(description="the other server's admin key")


class UpdateS3Request(KeyOnly):
    image_directory: str = Field(description="bucket, or bucket/prefix")
    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    public_url: str | None = Field(None, description="the base URL outputs are served from")


class Base64CropRequest(KeyOnly):
    image: str = Field(description="a data URL or base64 image")
    crop: str | bool | None = Field(None, description="true: its centre square at 512x512")


class Base64ToUrlRequest(KeyOnly):
    base64_string: str = Field(description="a data URL or base64 image, up to 5 MB")


class UploadImageRequest(KeyOnly):
    base64_image: str
    image_type: str | None = Field(None, description="png (default), jpeg, jpg or webp")


class DeleteImageRequest(KeyOnly):
    request_id: int | str
    type: str | None = Field(None, description="image (default), video, voice or 3d")


class NsfwImageCheckRequest(KeyOnly):
    init_image: str = Field(description="an image URL or base64 image")


class PromptCheckRequest(KeyOnly):
    prompt: str


class BuySubscriptionRequest(KeyOnly):
    plan_name: str


class CancelSubscriptionRequest(KeyOnly):
    key_to_cancel: str


class BuyModelRequest(KeyOnly):
    quantity: int | str


class PlansRequest(KeyOnly):
    """With `plan_name`, that plan is created or changed first."""

    plan_name: str | None = None
    requests_per_month: int | str | None = None
    queue_limit: int | str | None = None
    included_models: int | str | None = None
    self_service: str | bool | None = None


# ---- the console's ------------------------------------------------------------------------------


class JobsQuery(KeyOnly):
    kind: str | None = Field(None, description="text2img, img2img, chat, ...")
    status: Literal["queued", "processing", "success", "failed", "active"] | None = None
    model_id: str | None = None
    before_id: int | None = Field(None, description="older than this job: the next page")
    limit: int | None = Field(None, ge=1, le=200, description="50 by default")


class NewKeyRequest(KeyOnly):
    label: str | None = Field(None, description="up to 200 characters")
    plan: str | None = Field(None, description="a plan's name; none: no plan")


class KeyPlanRequest(KeyOnly):
    plan: str | None = Field(None, description="a plan's name; none: off any plan")

"""The utility ("MIS") endpoints of reference §7: uploads, crops, deletes and NSFW checks.

Uploaded images are finished jobs of kind `upload`: their id is a request id like any other, so
`fetch` shows them and `delete_image` removes them (or a generation's images) by that id.
"""

from __future__ import annotations

import io
import uuid

from fastapi import APIRouter, Request
from PIL import Image, ImageOps
from starlette.concurrency import run_in_threadpool

from sdserve.api.chaining import OwnOutputs
from sdserve.api.deps import CallerDep
from sdserve.api.envelope import ok
from sdserve.api.openapi import answers, body
from sdserve.api.state import ServerState
from sdserve.engine.prompt_filter import check_prompt
from sdserve.engine.safety import NsfwChecker
from sdserve.errors import InvalidKey, JobNotFound, ValidationFailed
from sdserve.ids import is_decimal, parse_job_id
from sdserve.media.images import decode_base64_image, encode_png, load_image_input
from sdserve.schemas import answers as wire
from sdserve.schemas.admin import (
    Base64CropRequest,
    Base64ToUrlRequest,
    DeleteImageRequest,
    NsfwImageCheckRequest,
    PromptCheckRequest,
    UploadImageRequest,
)

router = APIRouter(tags=["utilities"])
_BASE64_TO_URL_LIMIT = 5 * 1024 * 1024  # the hosted API's 5 MB
_CROP_SIZE = 512


def _text(body: dict, field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ValidationFailed({field: [f"The {field} field is required."]})
    return value.strip()


async def _store_png(state: ServerState, owner: str, image: Image.Image, folder: str):
    key = state.storage.new_key(f"{folder}/{uuid.uuid4().hex}.png")
    await run_in_threadpool(state.storage.put, key, encode_png(image))
    job = await run_in_threadpool(state.store.add_stored_file, owner, key)
    return job, state.output_url(key)


@router.post(
    "/api/v3/base64_crop",
    summary="Store a base64 image (centre-cropped)",
    responses=answers(wire.ImageStored),
    openapi_extra=body(Base64CropRequest),
)
async def base64_crop(found: CallerDep):
    """Store an image (a data URL); with crop, its centre square at 512x512, as training wants."""
    state, body, principal = found.state, found.body, found.principal
    image = decode_base64_image(_text(body, "image"), "image", state.settings)
    if str(body.get("crop", "")).strip().lower() in ("true", "yes", "1"):
        image = ImageOps.fit(image, (_CROP_SIZE, _CROP_SIZE), Image.Resampling.LANCZOS)
    job, url = await _store_png(state, principal.owner, image, "uploads")
    message = "image uploaded"
    return ok(message, link=url, request_id=job.id)


@router.post(
    "/api/v6/base64_to_url",
    summary="Turn a base64 image into a temporary URL",
    responses=answers(wire.TemporaryUrl),
    openapi_extra=body(Base64ToUrlRequest),
)
async def base64_to_url(found: CallerDep):
    """A temporary URL (24 h, like `temp` outputs) for a base64 image."""
    state, body, principal = found.state, found.body, found.principal
    value = _text(body, "base64_string")
    if len(value) > _BASE64_TO_URL_LIMIT * 4 // 3 + 1024:
        raise ValidationFailed({"base64_string": ["The base64_string may not be over 5 MB."]})
    image = decode_base64_image(value, "base64_string", state.settings)
    job, url = await _store_png(state, principal.owner, image, "temp")
    return {"status": "success", "id": job.id, "output": [url]}


@router.post(
    "/api/v1/enterprise/upload_image",
    tags=["enterprise"],
    summary="Upload a base64 image",
    responses=answers(wire.ImageUploaded),
    openapi_extra=body(UploadImageRequest),
)
@router.post("/api/v1/enterprise/{product}/upload_image", include_in_schema=False)
async def upload_image(found: CallerDep):
    state, body, principal = found.state, found.body, found.principal
    if not principal.is_admin:
        raise InvalidKey()
    image_type = str(body.get("image_type") or "png").strip().lower()
    if image_type not in ("png", "jpeg", "jpg", "webp"):
        raise ValidationFailed({"image_type": ["The image_type must be png, jpeg or jpg."]})
    image = decode_base64_image(_text(body, "base64_image"), "base64_image", state.settings)
    suffix = "jpg" if image_type in ("jpeg", "jpg") else image_type
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if suffix == "jpg" else suffix.upper())
    key = state.storage.new_key(f"uploads/{uuid.uuid4().hex}.{suffix}")
    await run_in_threadpool(state.storage.put, key, buffer.getvalue())
    job = await run_in_threadpool(state.store.add_stored_file, principal.owner, key)
    message = "image uploaded"
    return ok(message, image_url=state.output_url(key), id=job.id)


@router.post(
    "/api/v3/delete_image",
    summary="Delete a request's images",
    responses=answers(wire.MessageAnswer),
    openapi_extra=body(DeleteImageRequest),
)
async def delete_image(found: CallerDep):
    """Delete an uploaded image, or a finished request's outputs, by request id."""
    state, body, principal = found.state, found.body, found.principal
    raw = body.get("request_id", body.get("id"))
    job_id = parse_job_id(raw)
    if job_id is None:
        if is_decimal(raw):
            raise JobNotFound("Image not found")  # a number, of no job (2^64 included)
        raise ValidationFailed({"request_id": ["The request id must be an integer."]})
    kind = str(body.get("type") or "image").strip().lower()
    if kind not in ("image", "video", "voice", "3d"):
        raise ValidationFailed({"type": ["The type must be image, video, voice or 3d."]})
    try:
        keys = await run_in_threadpool(state.store.drop_outputs, job_id, principal.owner)
    except JobNotFound as exc:
        if exc.message == "Request not found":
            raise JobNotFound("Image not found") from None
        raise
    for key in keys:
        await run_in_threadpool(state.storage.delete, key)
        await run_in_threadpool(state.storage.delete, key + ".base64")
    message = f"{kind} deleted"
    return ok(message)


_NSFW_CHECK = {
    "summary": "Check an image for nudity",
    "responses": answers(wire.NsfwVerdict),
    "openapi_extra": body(NsfwImageCheckRequest),
}


@router.post("/api/v3/nsfw_image_check", **_NSFW_CHECK)
@router.post("/api/v1/enterprise/nsfw_image_check", tags=["enterprise"], **_NSFW_CHECK)
@router.post("/api/v1/enterprise/{product}/nsfw_image_check", include_in_schema=False)
async def nsfw_image_check(request: Request, found: CallerDep):
    """NudeNet's verdict on one image; the exact hosted shape (no `status` field)."""
    state, body, principal = found.state, found.body, found.principal
    if request.url.path.startswith("/api/v1/enterprise") and not principal.is_admin:
        raise InvalidKey()
    value = _text(body, "init_image")
    own = OwnOutputs.of(state, principal)
    image = await load_image_input(value, "init_image", state.settings, own)
    checker = NsfwChecker(state.settings.nsfw_threshold)
    flagged = await run_in_threadpool(checker.is_nsfw, image)
    if value.lower().startswith(("http://", "https://")):
        url = value
    else:
        key = state.storage.new_key(f"temp/{uuid.uuid4().hex}.png")
        await run_in_threadpool(state.storage.put, key, encode_png(image))
        url = state.output_url(key)
    return {"images": url, "has_nsfw_concept": [flagged]}


@router.post(
    "/api/check_nsfw_cp",
    summary="Check a prompt against the word lists",
    responses=answers(wire.PromptVerdict),
    openapi_extra=body(PromptCheckRequest),
)
async def check_nsfw_cp(found: CallerDep):
    """A word-list check of a prompt (see sdserve.engine.prompt_filter for what it is, and is not)."""
    _state, body, _principal = found.state, found.body, found.principal
    prompt = _text(body, "prompt")
    result = check_prompt(prompt)
    return {
        "status": "success",
        "is_cp": result.is_cp,
        "is_nsfw": result.is_nsfw,
        "original_prompt": prompt,
        "filtered_prompt": result.filtered_prompt,
    }

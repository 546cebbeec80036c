"""Turns a validated request into a queued job, then waits briefly for it (the request-to-job step)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from sdserve.api.state import ServerState
from sdserve.engine.prompts import enhance_prompt
from sdserve.engine.schedulers import resolve_scheduler_name
from sdserve.errors import ValidationFailed
from sdserve.jobs.keys import Principal
from sdserve.jobs.store import JobView
from sdserve.media.images import encode_png, load_image_input, read_input_bytes
from sdserve.media.video import decode_video
from sdserve.schemas.images import (
    Family,
    GenerationParams,
    Kind,
    build_meta,
    normalize_image_request,
    parse_image_request,
)
from sdserve.schemas.responses import job_body
from sdserve.schemas.video import (
    VideoFamily,
    VideoKind,
    VideoParams,
    build_video_meta,
    normalize_video_request,
    parse_video_request,
)
from sdserve.storage.chaining import OwnOutputs

_POLL_SECONDS = 0.25  # re-check for workers in other processes, which cannot wake us


async def submit_image_job(
    state: ServerState, principal: Principal, body: dict[str, Any], kind: Kind, family: Family
) -> dict[str, Any]:
    settings = state.settings
    req = parse_image_request(body)
    model_id = req.model_id if family in ("community", "images") and req.model_id else None
    params = normalize_image_request(
        req, kind, family, settings, model_id=model_id or settings.default_model
    )
    if params.enhance_prompt:
        params.prompt, params.negative_prompt = enhance_prompt(
            params.prompt, params.negative_prompt
        )

    # Everything that can be checked before queueing is checked now, so a bad request is an
    # immediate error, never a failed job.
    source = state.registry.resolve(params.model_id, principal.owner)
    state.registry.check_available(source)
    choice = resolve_scheduler_name(
        params.scheduler, params.use_karras_sigmas, params.algorithm_type
    )
    for lora_id, _ in params.loras:
        state.registry.resolve_lora(lora_id, principal.owner)
    if params.embeddings_model:
        state.registry.resolve_embedding(params.embeddings_model, principal.owner)
    if params.vae:
        state.registry.resolve_vae(params.vae, principal.owner)

    input_keys = {}
    for field in ("init_image", "mask_image"):
        value = getattr(req, field)
        if value and kind != "text2img" and (field == "init_image" or kind == "inpaint"):
            image = await load_image_input(value, field, settings, OwnOutputs.of(state, principal))
            key = state.storage.new_key(f"inputs/{params.file_prefix}/{field}.png")
            await run_in_threadpool(state.storage.put, key, encode_png(image))
            input_keys[field] = key

    model_label = source.location if source.kind == "hub" else params.model_id
    stored = params.model_dump(mode="json")
    stored["meta"] = build_meta(params, model_label=model_label, scheduler=choice.class_name)
    stored["output_keys"] = [
        state.storage.new_key(f"{params.output_folder}/{name}") for name in params.output_names()
    ]
    stored["input_keys"] = input_keys

    return await _queue_and_wait(state, principal, kind, family, params, stored)


async def _queue_and_wait(
    state: ServerState,
    principal: Principal,
    kind: str,
    family: str,
    params: GenerationParams | VideoParams,
    stored: dict[str, Any],
) -> dict[str, Any]:
    """Insert the job row, wake the in-process worker, and answer per the response timing."""
    job = await run_in_threadpool(
        state.store.submit,
        kind=kind,
        family=family,
        model_id=params.model_id,
        batch_key=params.batch_key,
        owner=principal.owner,
        params=stored,
        total_steps=params.steps,
        cost=params.cost,
        track_id=None if params.track_id is None else str(params.track_id),
        webhook=params.webhook,
        queue_limit=principal.queue_limit,
        key_id=principal.key_id,
        monthly_quota=principal.monthly_quota,
    )
    state.bus.work_available.set()
    wait = 0.0 if params.instant_response else state.settings.sync_wait_seconds
    return await respond_when_done(state, job, wait)


async def respond_when_done(
    state: ServerState, job: JobView, wait_seconds: float
) -> dict[str, Any]:
    """`success` if the job ends within `wait_seconds`, else `processing` with eta and fetch_result."""
    deadline = time.monotonic() + wait_seconds
    event = state.bus.subscribe(job.id)
    try:
        while job.status in ("queued", "processing"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or state.shutting_down.is_set():  # a restart answers `processing`
                break
            try:
                await asyncio.wait_for(event.wait(), timeout=min(remaining, _POLL_SECONDS))
            except TimeoutError:
                pass
            event.clear()
            job = await run_in_threadpool(state.store.get, job.id)
    finally:
        state.bus.unsubscribe(job.id, event)
    return await run_in_threadpool(job_response, state, job)


def job_response(state: ServerState, job: JobView) -> dict[str, Any]:
    info = state.store.queue_info(job) if job.status in ("queued", "processing") else None
    return job_body(job, info, state.settings.base_url, state.output_url)


async def submit_video_job(
    state: ServerState,
    principal: Principal,
    body: dict[str, Any],
    family: VideoFamily,
    *,
    image_to_video: bool = False,
) -> dict[str, Any]:
    settings = state.settings
    req = parse_video_request(body)
    if image_to_video:
        model_id = req.model_id or settings.default_svd_model
    elif family in ("v4video", "enterprise"):
        if not req.model_id:
            raise ValidationFailed({"model_id": ["The model id field is required."]})
        model_id = req.model_id
    else:
        model_id = req.model_id or settings.default_t2v_model

    source = state.registry.resolve(model_id, principal.owner)
    state.registry.check_available(source)
    model_family = state.registry.family(source)
    kind = _video_kind(model_id, model_family, image_to_video)
    params = normalize_video_request(req, kind, family, settings, model_id=model_id)
    if req.enhance_prompt and params.prompt:
        params.prompt, params.negative_prompt = enhance_prompt(
            params.prompt, params.negative_prompt
        )
    choice = resolve_scheduler_name(params.scheduler, None, None)
    for lora_id, _ in params.loras:
        state.registry.resolve_lora(lora_id, principal.owner)

    input_keys = {}
    if kind == "svd" or (req.init_image and not req.init_video):
        image = await load_image_input(
            req.init_image, "init_image", settings, OwnOutputs.of(state, principal)
        )
        input_keys["init_image"] = state.storage.new_key(
            f"inputs/{params.file_prefix}/init_image.png"
        )
        await run_in_threadpool(state.storage.put, input_keys["init_image"], encode_png(image))
    elif req.init_video:
        data = await read_input_bytes(
            req.init_video, "init_video", settings, OwnOutputs.of(state, principal)
        )
        await run_in_threadpool(decode_video, data, "init_video", settings.max_video_frames)
        input_keys["init_video"] = state.storage.new_key(f"inputs/{params.file_prefix}/init_video")
        await run_in_threadpool(state.storage.put, input_keys["init_video"], data)

    stored = params.model_dump(mode="json")
    stored["meta"] = build_video_meta(params, scheduler=choice.class_name)
    stored["output_keys"] = [state.storage.new_key(params.output_key)]
    stored["input_keys"] = input_keys
    return await _queue_and_wait(state, principal, kind, family, params, stored)


def _video_kind(model_id: str, model_family: str | None, image_to_video: bool) -> VideoKind:
    if image_to_video:
        if model_family not in (None, "svd"):
            raise ValidationFailed(
                {"model_id": [f"Model {model_id} is not an image-to-video (SVD) model."]}
            )
        return "svd"
    if model_family == "t2v":
        return "t2v"
    if model_family in ("sdxl", "sd2", "svd"):
        raise ValidationFailed(
            {
                "model_id": [
                    f"Model {model_id} is not an SD1.5-family model; text2video animates SD1.5 models only."
                ]
            }
        )
    return "animatediff"  # sd15, or a single file checked when it loads

"""The one way a job enters the queue: a family's job spec is checked against the key's limits,
its inputs are stored, its row is inserted and the workers are woken; then the answer waits
briefly for the job to finish (the request-to-job step of every family)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import asdict
from typing import Any

from starlette.concurrency import run_in_threadpool

from sdserve.api.chaining import OwnOutputs
from sdserve.api.envelope import job_body
from sdserve.api.state import ServerState
from sdserve.errors import ValidationFailed
from sdserve.jobs.keys import Principal
from sdserve.jobs.store import JobView
from sdserve.media.images import encode_png, load_image_input, read_input_bytes
from sdserve.media.video import decode_video
from sdserve.schemas.common import Dialect, JobSpec

_POLL_SECONDS = 0.25  # re-check for workers in other processes, which cannot wake us
_SHARED_BELOW = 64  # shorter meta strings are not worth a reference


async def submit_spec(
    state: ServerState, principal: Principal, spec: JobSpec, dialect: Dialect
) -> dict[str, Any]:
    """Queue the job `spec` describes and answer as its dialect does."""
    job = await queue_spec(state, principal, spec, dialect)
    wait = 0.0 if spec.instant_response else state.settings.sync_wait_seconds
    return await respond_when_done(state, job, wait)


async def queue_spec(
    state: ServerState,
    principal: Principal,
    spec: JobSpec,
    dialect: Dialect,
    *,
    limited: bool = True,
    counted: bool = True,
) -> JobView:
    """Insert the job and wake the workers. `limited`: it takes a place in the key's queue
    limit; `counted`: it counts against the key's monthly quota (a model reload, which only
    warms a worker, does neither; a model import only the first)."""
    queue_limit = principal.queue_limit if limited else None
    key_id = principal.key_id if counted else None
    if spec.inputs:  # the key's limits first: no input is fetched or stored for a refused job
        await run_in_threadpool(
            state.store.check_limits, principal.owner, queue_limit, key_id, principal.monthly_quota
        )
    input_keys = await _store_inputs(state, principal, spec)
    params = {
        **spec.params,
        "meta": _shared_once(spec.meta, spec.params),
        "output_keys": [state.storage.new_key(name) for name in spec.output_names],
        "input_keys": input_keys,
        # how the dialect answers (envelope reads it): fixed now, whatever is registered later
        "answer": {k: v for k, v in asdict(dialect).items() if k != "name"},
    }
    try:
        job = await run_in_threadpool(
            state.store.submit,
            kind=spec.kind,
            dialect=dialect.name,
            model_id=spec.model_id,
            batch_key=spec.batch_key,
            owner=principal.owner,
            params=params,
            total_steps=spec.total_steps,
            cost=spec.cost,
            track_id=None if spec.track_id is None else str(spec.track_id),
            webhook=spec.webhook,
            queue_limit=queue_limit,
            key_id=key_id,
            monthly_quota=principal.monthly_quota,
            training=spec.training,
            model_allowance=principal.model_allowance if spec.counts_as_model else None,
        )
    except BaseException:  # refused after all (a race on the limits): leave nothing behind
        for key in input_keys.values():
            await run_in_threadpool(state.storage.delete, key)
        raise
    state.bus.work_available.set()
    return job


async def _store_inputs(state: ServerState, principal: Principal, spec: JobSpec) -> dict[str, str]:
    """Every input decoded and checked before any is stored, so a bad one leaves nothing."""
    settings = state.settings
    own = OwnOutputs.of(state, principal)  # this server's own output URLs come from storage
    decoded: dict[str, tuple[str, bytes]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for name, given in spec.inputs.items():
        if given.type == "video":
            data = await read_input_bytes(given.value, name, settings, own)
            await run_in_threadpool(decode_video, data, name, settings.max_video_frames)
            decoded[name] = (_file_name(name), data)
        else:
            image = await load_image_input(given.value, name, settings, own)
            sizes[name] = image.size
            decoded[name] = (f"{_file_name(name)}.png", await run_in_threadpool(encode_png, image))
    for name, given in spec.inputs.items():
        other = given.same_size_as
        if other in sizes and sizes[name] != sizes[other]:
            (w, h), (ow, oh) = sizes[name], sizes[other]
            label, other_label = name.replace("_", " "), other.replace("_", " ")
            raise ValidationFailed(
                {name: [f"The {label} is {w}x{h}; it must have the {other_label}'s size, {ow}x{oh}."]}
            )
    folder = state.storage.new_key(f"inputs/{uuid.uuid4().hex}")
    keys = {}
    for name, (file_name, data) in decoded.items():
        keys[name] = f"{folder}/{file_name}"
        await run_in_threadpool(state.storage.put, keys[name], data)
    return keys


def _file_name(name: str) -> str:
    """A storage-safe file name for an input: `images[3]` is stored as `images_3_`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _shared_once(meta: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Meta with long values the params hold already (the prompt) stored as references, so the
    job row holds each once; `envelope.job_meta` puts them back."""
    return {
        key: {"$param": key}
        if isinstance(value, str) and len(value) >= _SHARED_BELOW and params.get(key) == value
        else value
        for key, value in meta.items()
    }


async def respond_when_done(
    state: ServerState, job: JobView, wait_seconds: float
) -> dict[str, Any]:
    """`success` if the job ends within `wait_seconds`, else `processing` with eta and fetch_result."""
    job = await wait_until_done(state, job, wait_seconds)
    return await run_in_threadpool(job_response, state, job)


async def wait_until_done(state: ServerState, job: JobView, wait_seconds: float) -> JobView:
    """The job once it has ended, or as it stands after `wait_seconds` (or at a restart)."""
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
    return job


def job_response(state: ServerState, job: JobView) -> dict[str, Any]:
    info = state.store.queue_info(job) if job.status in ("queued", "processing") else None
    return job_body(job, info, state.settings.base_url, state.output_url)

"""Queue load, the public model list, model reload, and the output files themselves."""

from __future__ import annotations

import math

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from sdserve.api.deps import CallerDep
from sdserve.api.envelope import ok
from sdserve.api.openapi import answers, body
from sdserve.api.state import get_state
from sdserve.api.submit import queue_spec
from sdserve.engine.batching import batch_key
from sdserve.errors import ValidationFailed
from sdserve.schemas import answers as wire
from sdserve.schemas.admin import KeyOnly, ModelIdRequest
from sdserve.schemas.common import JobSpec
from sdserve.schemas.images import COMMUNITY
from sdserve.storage.local import PUBLIC_FOLDERS, InvalidStorageKey

router = APIRouter()


@router.post(
    "/api/v3/system_load",
    tags=["v3"],
    summary="Queue length and wait",
    responses=answers(wire.SystemLoad),
    openapi_extra=body(KeyOnly),
)
async def system_load(found: CallerDep):
    state = found.state
    queue_num, queue_time = await run_in_threadpool(state.store.queue_stats)
    return {"queue_num": queue_num, "queue_time": math.ceil(queue_time), "status": "ok"}


# model_list `status`: the hosted API's `model_ready` only for models whose weights are here.
_LIST_STATUS = {
    "ready": "model_ready",
    "downloadable": "downloadable",
    "unavailable": "unavailable",
}


@router.post(
    "/api/v4/dreambooth/model_list",
    tags=["community"],
    summary="List the models (bare array)",
    responses=answers(list[wire.ModelListEntry]),
    openapi_extra=body(KeyOnly),
)
@router.post("/api/v3/model_list", tags=["community"], include_in_schema=False)
@router.post("/api/v3/dreambooth/model_list", tags=["community"], include_in_schema=False)
@router.post("/api/v4/model_list", tags=["community"], include_in_schema=False)
async def model_list(found: CallerDep):
    """A bare JSON array, as the hosted API answers (clients forward it verbatim).

    `status` is `model_ready` when the weights are here (built in, imported, on disk, in the
    Hugging Face cache), `downloadable` for a hub model the first request downloads, and
    `unavailable` when it cannot be had (offline, or a path that is gone). Beyond the hosted
    fields: `source`, `availability` (ready | downloadable | unavailable), and `hub_repo` and
    `size_bytes` where known.
    """
    state = found.state
    models = await run_in_threadpool(state.registry.list_models, found.principal.owner)
    return [_list_entry(m) for m in models]


def _list_entry(model: dict) -> dict:
    entry = {
        "model_id": model["model_id"],
        "status": _LIST_STATUS[model["status"]],
        "created_at": None,
        "instance_prompt": "",
        "model_name": model["model_id"],
        "description": f"{model['source']} model: {model['note']}",
        "screenshots": "",
        "source": model["source"],
        "availability": model["status"],
    }
    entry.update({k: model[k] for k in ("hub_repo", "size_bytes") if k in model})
    return entry


_MODEL_RELOAD = {
    "summary": "Load a model ahead of use",
    "responses": answers(wire.ReloadStarted),
    "openapi_extra": body(ModelIdRequest),
}


@router.post("/api/v4/dreambooth/model_reload", tags=["community"], **_MODEL_RELOAD)
@router.post("/api/v6/images/model_reload", tags=["images"], **_MODEL_RELOAD)
async def model_reload(found: CallerDep):
    """Queue a load of the model on a worker, so the next generation finds it resident."""
    state, body, principal = found.state, found.body, found.principal
    model_id = body.get("model_id")
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValidationFailed({"model_id": ["The model id field is required."]})
    source = state.registry.resolve(model_id.strip(), principal.owner)
    state.registry.check_available(source)
    spec = JobSpec(
        kind="model_reload",
        model_id=source.model_id,
        params={"model_id": source.model_id},
        batch_key=batch_key("model_reload", source.model_id),
        cost=0.0,
        total_steps=1,
        output_names=[],
        meta={"model_id": source.model_id},
    )
    job = await queue_spec(state, principal, spec, COMMUNITY, limited=False, counted=False)
    message = f"Model {source.model_id} reload started"
    return ok(message, id=job.id)


def _serve_file(folder: str):
    async def serve(request: Request, name: str):
        state = get_state(request)
        # A file URL answers 404 when there is no file (whatever the API's error policy), as
        # browsers and <img> tags expect.
        try:
            path = state.storage.path(f"{folder}/{name}")
        except InvalidStorageKey:
            raise HTTPException(404) from None
        if not path.is_file():
            raise HTTPException(404)
        media = "text/plain" if path.suffix == ".base64" else None
        return FileResponse(path, media_type=media)

    return serve


for _folder in PUBLIC_FOLDERS:
    router.add_api_route(
        f"/{_folder}/{{name:path}}", _serve_file(_folder), methods=["GET"], include_in_schema=False
    )

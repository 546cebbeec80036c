"""Queue load, the public model list, model reload, and the output files themselves."""

from __future__ import annotations

import math

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from sdserve.api.envelope import authenticate, read_json_body
from sdserve.api.state import get_state
from sdserve.errors import ValidationFailed
from sdserve.storage.local import PUBLIC_FOLDERS, InvalidStorageKey

router = APIRouter()


@router.post("/api/v3/system_load", tags=["v3"])
async def system_load(request: Request):
    state = get_state(request)
    body = await read_json_body(request, state.settings)
    authenticate(request, body, state.keys)
    queue_num, queue_time = await run_in_threadpool(state.store.queue_stats)
    return {"queue_num": queue_num, "queue_time": math.ceil(queue_time), "status": "ok"}


@router.post("/api/v4/dreambooth/model_list", tags=["community"])
@router.post("/api/v3/model_list", tags=["community"], include_in_schema=False)
@router.post("/api/v4/model_list", tags=["community"], include_in_schema=False)
async def model_list(request: Request):
    """A bare JSON array, as the hosted API answers (clients forward it verbatim)."""
    state = get_state(request)
    body = await read_json_body(request, state.settings)
    principal = authenticate(request, body, state.keys)
    models = await run_in_threadpool(state.registry.list_models, principal.owner)
    return [
        {
            "model_id": m["model_id"],
            "status": "model_ready",
            "created_at": None,
            "instance_prompt": "",
            "model_name": m["model_id"],
            "description": f"{m['source']} model",
            "screenshots": "",
        }
        for m in models
    ]


@router.post("/api/v4/dreambooth/model_reload", tags=["community"])
@router.post("/api/v6/images/model_reload", tags=["images"])
async def model_reload(request: Request):
    """Queue a load of the model on a worker, so the next generation finds it resident."""
    state = get_state(request)
    body = await read_json_body(request, state.settings)
    principal = authenticate(request, body, state.keys)
    model_id = body.get("model_id")
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValidationFailed({"model_id": ["The model id field is required."]})
    source = state.registry.resolve(model_id.strip(), principal.owner)
    state.registry.check_available(source)
    job = await run_in_threadpool(
        state.store.submit,
        kind="model_reload",
        family="community",
        model_id=source.model_id,
        batch_key=f"reload|{source.model_id}",
        owner=principal.owner,
        params={"model_id": source.model_id},
        total_steps=1,
        cost=0.0,
        track_id=None,
        webhook=None,
        queue_limit=None,
    )
    state.bus.work_available.set()
    message = f"Model {source.model_id} reload started"
    return {"status": "success", "message": message, "messege": message, "id": job.id}


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

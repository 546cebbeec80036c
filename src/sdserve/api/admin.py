"""Model management and the enterprise admin endpoints (reference §9): the admin key only.

Every route is served at `/api/v1/enterprise/<name>` and `/api/v1/enterprise/<product>/<name>`
(era B's per-product servers). `/api/v3/load_model` is open to every key: a key's import is
owned by it, and private to it when `model_visibility` is private.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter
from fastapi.responses import FileResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from sdserve import __version__
from sdserve.api.deps import AdminDep, CallerDep
from sdserve.api.envelope import fetch_url, message_body, ok
from sdserve.api.openapi import answers, body, query
from sdserve.api.state import ServerState
from sdserve.api.submit import queue_spec
from sdserve.engine import tiny
from sdserve.engine.batching import solo_key
from sdserve.engine.imports import offline_message, remove_files
from sdserve.engine.registry import safe_id
from sdserve.engine.schedulers import SUPPORTED_SCHEDULERS
from sdserve.errors import (
    ModelNotFound,
    ModelUnavailable,
    NotAvailable,
    S3Unavailable,
    SdserveError,
    ValidationFailed,
)
from sdserve.jobs.catalogue import DuplicateModel
from sdserve.jobs.keys import Principal
from sdserve.net import BlockedUrl, acheck_public_url, arequire_public_url, check_url_syntax
from sdserve.schemas import answers as wire
from sdserve.schemas.admin import (
    KeyOnly,
    LoadModelBody,
    ModelIdRequest,
    SyncModelsRequest,
    UpdateS3Request,
)
from sdserve.schemas.common import JobSpec
from sdserve.schemas.images import V3
from sdserve.schemas.models import ImportRequest, parse_load_model

router = APIRouter(tags=["enterprise"])
_LOAD_DATA_FORMAT = "%m/%d/%Y %H:%M:%S"  # the hosted API's `load_data`, e.g. 01/25/2023 11:52:22


# What each enterprise verb does, for /docs.
_SUMMARIES = {
    "load_model": "import a model, LoRA, embedding or VAE (queued)",
    "load_model_v2": "import a model, LoRA, embedding or VAE (queued)",
    "load_vae": "import a VAE (queued)",
    "verify_model": "whether a model id exists here",
    "get_all_models": "every model on this server",
    "delete_model": "delete an imported model and its files",
    "model_file": "download an imported model's file (for sync_models)",
    "sync_models": "copy another server's imported models here",
    "system_details": "queue, GPUs, memory, disk and storage",
    "clear_cache": "unload every worker's resident models",
    "clear_queue": "fail every queued job",
    "restart_server": "restart gracefully",
    "update_server": "restart, re-reading the settings",
    "update": "restart, re-reading the settings",
    "update_s3": "switch output storage to an S3 bucket",
    "schedulers_list": "the schedulers this server runs",
    "text2img": "text to image (community endpoint, admin key)",
    "img2img": "image to image (community endpoint, admin key)",
    "inpaint": "inpainting (community endpoint, admin key)",
}


def _enterprise(
    name: str,
    request: type[BaseModel],
    answer: Any,
    methods: tuple[str, ...] = ("POST",),
    responses: dict | None = None,
):
    """Register a handler at both enterprise paths, its body `request` and its `answer`."""

    def register(handler):
        for path in (f"/api/v1/enterprise/{name}", f"/api/v1/enterprise/{{product}}/{name}"):
            for method in methods:  # one route per method: each gets its own OpenAPI operation id
                router.add_api_route(
                    path,
                    handler,
                    methods=[method],
                    summary=f"{name}: {_SUMMARIES[name]}",
                    include_in_schema=not path.count("{"),
                    responses=responses or answers(answer),
                    openapi_extra=body(request) if method == "POST" else query(request),
                )
        return handler

    return register


# ---- loading models -------------------------------------------------------------------------


async def _queue_import(
    state: ServerState,
    principal: Principal,
    req: ImportRequest,
    started: str,
    headers: dict[str, str] | None = None,
) -> dict:
    """Check what can be checked now, then queue the import as a job."""
    safe_id(req.model_id, "model_id")
    if req.model_id in tiny.TINY_MODELS:
        raise ValidationFailed({"model_id": [f"{req.model_id} is a built-in model id."]})
    existing = await run_in_threadpool(state.catalogue.get, req.model_id)
    if existing is not None and not req.replace:
        raise DuplicateModel(req.model_id)
    if existing is not None and not (principal.is_admin or existing.owner == principal.owner):
        raise DuplicateModel(req.model_id)
    await arequire_public_url(req.webhook, state.settings, "webhook")
    if req.source_kind == "url":
        try:
            check_url_syntax(req.source)
            if not state.settings.allow_private_urls:
                await acheck_public_url(req.source)
        except BlockedUrl as exc:
            raise ValidationFailed({"url": [f"The url {exc}."]}) from None
    elif req.source_kind == "hub" and state.registry.offline():
        raise ModelUnavailable(offline_message(req.source))
    elif req.source_kind == "trained":
        await run_in_threadpool(state.store.get_training, req.source, principal.owner)
    if req.config_model_id:
        await run_in_threadpool(state.registry.config_folder, req.config_model_id, principal.owner)
    spec = {
        "model_id": req.model_id,
        "source": req.source,
        "source_kind": req.source_kind,
        "category": req.category,
        "category_known": req.category_known,
        "model_format": req.model_format,
        "revision": req.revision,
        "replace": req.replace,
        "name": req.name,
        "visibility": req.visibility,
        "owner": principal.owner,
        "config_model_id": req.config_model_id,
    }
    if headers:  # what the download sends (another sdserve's key, for sync_models)
        spec["headers"] = headers
    job = await queue_spec(
        state,
        principal,
        JobSpec(
            kind="model_load",
            model_id=req.model_id,
            params={"import": spec},
            batch_key=solo_key("model_load", req.model_id),
            cost=1.0,
            total_steps=100,
            output_names=[],
            meta={"model_id": req.model_id, "url": req.source},
            webhook=req.webhook,
            track_id=req.track_id,
        ),
        V3,
        counted=False,
    )
    return ok(
        started,
        id=job.id,
        model_id=req.model_id,
        fetch_result=fetch_url(state.settings.base_url, job),
    )


@router.post(
    "/api/v3/load_model",
    tags=["models"],
    summary="Import a model for this key",
    responses=answers(wire.ImportStarted),
    openapi_extra=body(LoadModelBody),
)
async def load_model_v3(found: CallerDep):
    state, body, principal = found.state, found.body, found.principal
    return await _queue_import(state, principal, parse_load_model(body), "model load started")


@_enterprise("load_model", LoadModelBody, wire.ImportStarted)
@_enterprise("load_model_v2", LoadModelBody, wire.ImportStarted)
async def load_model(found: AdminDep):
    state, body, principal = found.state, found.body, found.principal
    return await _queue_import(state, principal, parse_load_model(body), "model load started")


@_enterprise("load_vae", LoadModelBody, wire.ImportStarted)
async def load_vae(found: AdminDep):
    state, body, principal = found.state, found.body, found.principal
    req = parse_load_model(body, vae=True)
    return await _queue_import(state, principal, req, "VAE load started")


# ---- the catalogue --------------------------------------------------------------------------


def _model_id(body: dict, field: str = "model_id") -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ValidationFailed({field: [f"The {field} field is required."]})
    return safe_id(value.strip(), field)


@_enterprise("verify_model", ModelIdRequest, wire.ModelVerdict)
async def verify_model(found: AdminDep):
    state, body = found.state, found.body
    model_id = _model_id(body)
    exists = await run_in_threadpool(_model_exists, state, model_id)
    if not exists:
        message = "Model does not exist on server"
        return message_body("error", message, model_id=model_id)
    return ok("Model exists on server", model_id=model_id)


def _model_exists(state: ServerState, model_id: str) -> bool:
    if state.catalogue.get(model_id) is not None:
        return True
    try:
        source = state.registry.resolve(model_id)
        state.registry.check_available(source)
    except (ModelNotFound, ModelUnavailable, ValidationFailed):
        return False
    return True


@_enterprise("get_all_models", KeyOnly, wire.AllModels)
async def get_all_models(found: AdminDep):
    state, _body, _principal = found.state, found.body, found.principal
    return {"models": await run_in_threadpool(_all_models, state), "status": "success"}


def _all_models(state: ServerState) -> list[dict]:
    """Models on this server: built-in, imported, and model files put in the data dir."""
    models = []
    imported = {entry.model_id: entry for entry in state.catalogue.list()}
    for listed in state.registry.list_models():
        model_id, kind = listed["model_id"], listed["source"]
        if kind == "hub" or model_id in imported:
            continue  # catalogue ids that were never downloaded are not on the server
        location = state.settings.models_dir / model_id
        loaded_at = location.stat().st_mtime if location.exists() else time.time()
        models.append({"load_data": _load_data(loaded_at), "model_id": model_id, "source": kind})
    for entry in imported.values():
        models.append(
            {
                "load_data": _load_data(entry.loaded_at),
                "model_id": entry.model_id,
                "source": "imported",
                "model_category": entry.category,
                "model_name": entry.name,
                "url": entry.url,
                "sha256": entry.sha256,
                "size_bytes": entry.size_bytes,
                "visibility": entry.visibility,
                "config_model_id": entry.config_model_id,
                "file": Path(entry.location).suffix in (".safetensors", ".ckpt", ".pt"),
            }
        )
    return models


def _load_data(timestamp: float) -> str:
    return time.strftime(_LOAD_DATA_FORMAT, time.gmtime(timestamp))


@_enterprise("delete_model", ModelIdRequest, wire.ModelDeleted)
async def delete_model(found: AdminDep):
    state, body, _principal = found.state, found.body, found.principal
    model_id = _model_id(body)
    entry = await run_in_threadpool(state.catalogue.remove, model_id)
    if entry is None:
        if model_id in tiny.TINY_MODELS:
            raise ValidationFailed({"model_id": [f"{model_id} is built in and cannot be deleted."]})
        raise ModelNotFound(model_id)
    # Workers drop it (and anything loaded with it) before its files go.
    await run_in_threadpool(state.control.publish, "clear_cache")
    await run_in_threadpool(remove_files, entry, state.settings, state.storage)
    return ok("Model deleted on server", model_id=model_id)


@_enterprise(
    "model_file",
    ModelIdRequest,
    None,
    methods=("GET", "POST"),
    responses=answers(
        wire.ErrorAnswer,
        with_error=False,
        content={"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    ),
)
async def model_file(found: AdminDep):
    """The weights file of an imported model, for `sync_models` on another sdserve server."""
    state, body, _principal = found.state, found.body, found.principal
    model_id = _model_id(body)  # the query string is part of the body (deps.read_body)
    entry = await run_in_threadpool(state.catalogue.get, model_id)
    path = None if entry is None else state.registry.entry_path(entry.location)
    if path is None or not await run_in_threadpool(state.registry.fetch_missing_file, path):
        raise ModelNotFound(model_id)
    return FileResponse(path, media_type="application/octet-stream")


@_enterprise("sync_models", SyncModelsRequest, wire.ModelsSynced)
async def sync_models(found: AdminDep):
    """Copy the imported models of another sdserve server, given its URL and admin key."""
    state, body, principal = found.state, found.body, found.principal
    peer = body.get("sync_url") or body.get("server_url") or body.get("url")
    sync_key = body.get("sync_key")
    errors = {}
    if not isinstance(peer, str) or not peer.strip():
        errors["sync_url"] = ["The sync_url field is required (the other server's base URL)."]
    if not isinstance(sync_key, str) or not sync_key.strip():
        errors["sync_key"] = ["The sync_key field is required (the other server's admin key)."]
    if errors:
        raise ValidationFailed(errors)
    peer = peer.strip().rstrip("/")
    listing_url = f"{peer}/api/v1/enterprise/get_all_models"
    await arequire_public_url(listing_url, state.settings, "sync_url")
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(listing_url, json={"key": sync_key})
        listing = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise NotAvailable(f"Could not read the model list of {peer}: {exc}") from None
    if not isinstance(listing, dict) or listing.get("status") != "success":
        message = listing.get("message") if isinstance(listing, dict) else None
        raise NotAvailable(f"{peer} refused the model list: {message or 'unexpected answer'}")

    synced, skipped = [], []
    for model in listing.get("models", []):
        model_id = model.get("model_id")
        if model.get("source") != "imported" or not isinstance(model_id, str):
            continue
        if await run_in_threadpool(state.catalogue.get, model_id) is not None:
            skipped.append({"model_id": model_id, "reason": "already on this server"})
            continue
        if not model.get("file"):
            skipped.append({"model_id": model_id, "reason": "a folder model: copy it by hand"})
            continue
        req = ImportRequest(
            model_id=model_id,
            source=f"{peer}/api/v1/enterprise/model_file?model_id={model_id}",
            source_kind="url",
            category=model.get("model_category", "stable_diffusion"),
            category_known=True,
            model_format=None,
            revision=None,
            replace=False,
            name=model.get("model_name") or model_id,
            visibility=model.get("visibility", "public"),
            webhook=None,
            track_id=None,
            config_model_id=model.get("config_model_id"),
        )
        try:
            await _queue_import(
                state, principal, req, "model load started", headers={"key": sync_key}
            )
        except SdserveError as exc:
            skipped.append({"model_id": model_id, "reason": exc.message})
            continue
        synced.append(model_id)
    return ok(f"{len(synced)} Models synced successfully", model_list=synced, skipped=skipped)


# ---- the server -----------------------------------------------------------------------------


@_enterprise("system_details", KeyOnly, wire.SystemDetails)
@router.post("/api/v6/video/system_details", include_in_schema=False)
async def system_details(found: AdminDep):
    state, _body, _principal = found.state, found.body, found.principal
    return await run_in_threadpool(_system_details, state)


def _system_details(state: ServerState) -> dict:
    queue_num, queue_time = state.store.queue_stats()
    workers = state.control.workers()
    disk = shutil.disk_usage(state.settings.data_dir)
    return {
        "status": "ok",
        "model_count": len(_all_models(state)),
        "queue_time": math.ceil(queue_time),
        "queue_num": queue_num,
        "version": __version__,
        "gpu": [
            {"name": w.gpu_name, "memory_mb": w.gpu_memory_mb, "worker": w.worker_id}
            for w in workers
            if w.gpu_name
        ],
        "cpu": {
            "model": platform.processor() or platform.machine(),
            "count": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "ram": _memory(),
        "disk": {
            "path": str(state.settings.data_dir.resolve()),
            "total_gb": round(disk.total / 2**30, 1),
            "free_gb": round(disk.free / 2**30, 1),
        },
        "loaded_models": sorted({m for w in workers for m in w.resident}),
        "workers": [
            {
                "worker_id": w.worker_id,
                "hostname": w.hostname,
                "device": w.device,
                "state": w.state,
                "resident": w.resident,
                "last_seen": round(w.last_seen, 3),
            }
            for w in workers
        ],
        "storage": state.storage.describe(),
    }


def _memory() -> dict:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total = int(fields["MemTotal"].split()[0]) // 1024
        available = int(fields["MemAvailable"].split()[0]) // 1024
        return {"total_mb": total, "available_mb": available}
    except (OSError, KeyError, ValueError):
        return {}


@_enterprise("clear_cache", KeyOnly, wire.MessageAnswer)
async def clear_cache(found: AdminDep):
    state, _body, _principal = found.state, found.body, found.principal
    await run_in_threadpool(state.control.publish, "clear_cache")
    return ok("Cache cleared successfully")


@router.get(
    "/api/v5/clear_cache",
    tags=["utilities"],
    summary="Unload resident models",
    responses=answers(wire.MessageAnswer),
    openapi_extra=query(KeyOnly),
)
@router.post(
    "/api/v5/clear_cache",
    tags=["utilities"],
    summary="Unload resident models",
    responses=answers(wire.MessageAnswer),
    openapi_extra=body(KeyOnly),
)
@router.post("/api/v3/clear_cache", include_in_schema=False)
@router.post("/api/v6/video/clear_cache", include_in_schema=False)
async def clear_cache_v5(found: CallerDep):
    """Any key: models are loaded again on their next use, nothing else changes."""
    state, _body, _principal = found.state, found.body, found.principal
    await run_in_threadpool(state.control.publish, "clear_cache")
    return ok("Cache cleared")


@_enterprise("clear_queue", KeyOnly, wire.QueueCleared)
async def clear_queue(found: AdminDep):
    state, _body, _principal = found.state, found.body, found.principal
    ids = await run_in_threadpool(state.store.clear_queue, "Queue cleared by the server operator")
    for job_id in ids:
        state.bus.publish(job_id)
    return ok(f"Queue cleared: {len(ids)} queued requests failed", cleared=len(ids))


@_enterprise("restart_server", KeyOnly, wire.MessageAnswer)
async def restart_server(found: AdminDep):
    state, _body, _principal = found.state, found.body, found.principal
    return _restart(state, "server restarting")


@_enterprise("update_server", KeyOnly, wire.MessageAnswer)
@_enterprise("update", KeyOnly, wire.MessageAnswer)
async def update_server(found: AdminDep):
    """A graceful restart that re-reads the settings (environment and DATA/sdserve.env) and the
    catalogue. It does not replace code: upgrade the package, then call this."""
    state, _body, _principal = found.state, found.body, found.principal
    return _restart(state, "server updating")


def _restart(state: ServerState, message: str):
    from fastapi.responses import JSONResponse

    if state.request_shutdown is None:
        raise NotAvailable("This server was not started by `sdserve serve` and cannot restart")

    def restart() -> None:
        state.control.publish("restart")  # standalone workers drain and restart too
        state.request_shutdown(True)

    # The answer goes out first; then the server drains and re-executes itself.
    return JSONResponse(ok(message), background=BackgroundTask(restart))


@_enterprise("update_s3", UpdateS3Request, wire.StorageUpdated)
async def update_s3(found: AdminDep):
    from sdserve.storage.s3config import S3Config

    state, body = found.state, found.body
    bucket = body.get("image_directory") or body.get("bucket")
    if not isinstance(bucket, str) or not bucket.strip():
        raise ValidationFailed({"image_directory": ["The image_directory (bucket) is required."]})
    bucket, _, prefix = bucket.strip().strip("/").partition("/")

    def text(name: str) -> str | None:
        value = body.get(name)
        return value.strip() if isinstance(value, str) and value.strip() else None

    endpoint = text("endpoint_url")
    # boto3 calls the endpoint from every process later: the same guard as a webhook's
    await arequire_public_url(endpoint, state.settings, "endpoint_url")
    config = S3Config(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=endpoint,
        region_name=text("region_name"),
        access_key_id=text("aws_access_key_id"),
        secret_access_key=text("aws_secret_access_key"),
        public_url=text("public_url"),
    )
    try:
        await asyncio.wait_for(run_in_threadpool(state.storage.configure_s3, config), 60)
    except S3Unavailable as exc:
        raise NotAvailable(f"The bucket cannot be used: {exc}") from None
    except TimeoutError:
        raise NotAvailable("The bucket did not answer within 60 seconds") from None
    await run_in_threadpool(state.control.publish, "storage")
    return ok("S3 storage updated: new outputs are stored in the bucket", s3=config.redacted())


@_enterprise("schedulers_list", KeyOnly, wire.Schedulers)
async def schedulers_list(found: AdminDep):
    return {"status": "success", "schedulers": list(SUPPORTED_SCHEDULERS)}

"""The web console at `/` (static files shipped in `sdserve/console/`) and the small JSON endpoints
it reads: the caller, pickers, a key's job history and details; for the admin key the queue of
every key, workers, keys and the throughput chart. Every job endpoint is scoped to its owner."""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from sdserve.api.deps import AdminDep, CallerDep
from sdserve.api.envelope import job_meta, ok
from sdserve.api.openapi import answers, body, query
from sdserve.api.state import ServerState
from sdserve.engine.schedulers import SUPPORTED_SCHEDULERS
from sdserve.errors import JobNotFound, ValidationFailed
from sdserve.ids import parse_job_id
from sdserve.jobs.history import (
    ACTIVE,
    HistoryFilter,
    cancel_job,
    job_kinds,
    list_jobs,
    running_by_worker,
    throughput_series,
    webhook_deliveries,
)
from sdserve.jobs.views import JobView
from sdserve.schemas import answers as wire
from sdserve.schemas.admin import JobsQuery, KeyOnly, KeyPlanRequest, NewKeyRequest

CONSOLE_DIR = Path(str(files("sdserve") / "console"))
STATIC_URL = "/console-static"
router = APIRouter(tags=["console"])
# What a job's params hold for the server itself, not what the client asked for.
_INTERNAL_PARAMS = {"answer", "output_keys", "input_keys", "meta"}
_STATUSES = ("queued", "processing", "success", "failed", "active")


def mount_console(app: FastAPI) -> None:
    app.mount(STATIC_URL, StaticFiles(directory=CONSOLE_DIR), name="console-static")

    async def index() -> FileResponse:
        return FileResponse(CONSOLE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)


def _job_id(raw: str) -> int:
    job_id = parse_job_id(raw)
    if job_id is None:
        raise JobNotFound()
    return job_id


def job_summary(state: ServerState, job: JobView, with_owner: bool = False) -> dict:
    result = job.result or {}
    keys = result.get("output_keys") if job.status == "success" else []
    summary = {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "model_id": job.model_id,
        "prompt": job.params.get("prompt") if isinstance(job.params.get("prompt"), str) else None,
        "step": job.step,
        "total_steps": job.total_steps,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "generation_time": job.generation_time,
        "output": [state.output_url(key) for key in keys or []],
        "error": job.error,
    }
    if with_owner:
        summary["owner"] = job.owner
    return summary


# ---- the caller and the pickers -----------------------------------------------------------------


@router.get(
    "/api/v1/me",
    summary="Who this key is: admin or not, plan and usage",
    responses=answers(wire.Me),
    openapi_extra=query(KeyOnly),
)
async def me(found: CallerDep):
    state, principal = found.state, found.principal
    used = await run_in_threadpool(state.store.usage, principal.key_id) if principal.key_id else 0
    return {
        "status": "success",
        "is_admin": principal.is_admin,
        "plan": principal.plan,
        "queue_limit": principal.queue_limit,
        "monthly_quota": principal.monthly_quota,
        "used_this_month": used,
    }


@router.get(
    "/api/v1/console/options",
    summary="Models, LoRAs and schedulers for pickers",
    responses=answers(wire.ConsoleOptions),
    openapi_extra=query(KeyOnly),
)
async def options(found: CallerDep):
    state, owner = found.state, found.principal.owner
    return await run_in_threadpool(_options, state, owner)


def _options(state: ServerState, owner: str) -> dict:
    models = [
        {"model_id": m["model_id"], "status": m["status"], "source": m["source"]}
        for m in state.registry.list_models(owner)
    ]
    assets: dict[str, set[str]] = {"lora": set(), "embeddings": set(), "vae": set()}
    assets["controlnet"] = set()
    for entry in state.catalogue.list():
        if entry.category in assets and entry.visible_to(owner):
            assets[entry.category].add(entry.model_id)
    folders = {
        "lora": "loras",
        "embeddings": "embeddings",
        "vae": "vae",
        "controlnet": "controlnet",
    }
    for category, folder in folders.items():
        base = state.settings.data_dir / folder
        if base.is_dir():
            assets[category].update(p.stem for p in base.iterdir() if not p.name.startswith("."))
    return {
        "status": "success",
        "models": models,
        "loras": sorted(assets["lora"]),
        "embeddings": sorted(assets["embeddings"]),
        "vaes": sorted(assets["vae"]),
        "controlnets": sorted(assets["controlnet"]),
        "schedulers": list(SUPPORTED_SCHEDULERS),
        "default_model": state.settings.default_model,
    }


# ---- a key's jobs -------------------------------------------------------------------------------


def _history_filter(owner: str, body: dict) -> HistoryFilter:
    errors: dict[str, list[str]] = {}
    status = body.get("status") or None
    if status is not None and status not in _STATUSES:
        errors["status"] = [f"The status must be one of {', '.join(_STATUSES)}."]
    numbers = {}
    for field, default, top in (("limit", 50, 200), ("before_id", None, None)):
        raw = body.get(field)
        if raw in (None, ""):
            numbers[field] = default
            continue
        value = parse_job_id(raw)
        if value is None or (top and not 1 <= value <= top):
            errors[field] = [
                f"The {field} must be a whole number" + (f", 1 to {top}." if top else ".")
            ]
        numbers[field] = value
    if errors:
        raise ValidationFailed(errors)
    return HistoryFilter(
        owner=owner,
        kind=body.get("kind") or None,
        status=status,
        model_id=body.get("model_id") or None,
        before_id=numbers["before_id"],
        limit=numbers["limit"] or 50,
    )


@router.get(
    "/api/v1/jobs",
    summary="This key's jobs, newest first (filters: kind, status, model_id)",
    responses=answers(wire.Jobs),
    openapi_extra=query(JobsQuery),
)
async def jobs(found: CallerDep):
    state, principal = found.state, found.principal
    query = _history_filter(principal.owner, found.body)
    views = await run_in_threadpool(list_jobs, state.store, query)
    return {
        "status": "success",
        "jobs": [job_summary(state, job, principal.is_admin) for job in views],
        "kinds": await run_in_threadpool(job_kinds, state.store, principal.owner),
    }


@router.get(
    "/api/v1/jobs/{job_id}",
    summary="One job: request, meta, timings, webhook deliveries",
    responses=answers(wire.JobDetails),
    openapi_extra=query(KeyOnly),
)
async def job_detail(found: CallerDep, job_id: str):
    state, principal = found.state, found.principal
    job = await run_in_threadpool(state.store.get, _job_id(job_id), principal.owner)
    return await run_in_threadpool(_detail, state, job, principal.is_admin)


def _detail(state: ServerState, job: JobView, is_admin: bool) -> dict:
    result = job.result or {}
    detail = job_summary(state, job, is_admin)
    detail["request"] = {k: v for k, v in job.params.items() if k not in _INTERNAL_PARAMS}
    detail["inputs"] = {
        name: state.output_url(key) for name, key in (job.params.get("input_keys") or {}).items()
    }
    detail["meta"] = job_meta(job)
    detail["timings"] = result.get("timings", {})
    detail["webhook"] = job.webhook
    detail["webhook_deliveries"] = webhook_deliveries(state.store, job.id)
    detail["track_id"] = job.track_id
    detail["attempts"] = job.attempts
    if job.status in ACTIVE:
        info = state.store.queue_info(job)
        detail["queue_position"], detail["eta"] = info.position, info.eta
    return {"status": "success", "job": detail}


@router.delete(
    "/api/v1/jobs/{job_id}",
    summary="Delete a finished job's outputs and hide it",
    responses=answers(wire.JobDone),
    openapi_extra=query(KeyOnly),
)
async def delete_job(found: CallerDep, job_id: str):
    state, principal, number = found.state, found.principal, _job_id(job_id)
    keys = await run_in_threadpool(state.store.drop_outputs, number, principal.owner)
    for key in keys:
        await run_in_threadpool(state.storage.delete, key)
        await run_in_threadpool(state.storage.delete, key + ".base64")
    return ok("Job deleted", id=number)


@router.post(
    "/api/v1/jobs/{job_id}/cancel",
    summary="Cancel a queued or running job",
    responses=answers(wire.JobDone),
    openapi_extra=body(KeyOnly),
)
async def cancel(found: CallerDep, job_id: str):
    """A key cancels its own jobs; the admin key any job."""
    state, principal = found.state, found.principal
    who = "the server operator" if principal.is_admin else "its owner"
    job = await run_in_threadpool(
        cancel_job, state.store, _job_id(job_id), principal.owner, f"Cancelled by {who}"
    )
    state.bus.publish(job.id)
    return ok("Job cancelled", id=job.id)


@router.get(
    "/api/v1/trainings",
    summary="This key's trainings: stage and step progress",
    responses=answers(wire.ConsoleTrainings),
    openapi_extra=query(KeyOnly),
)
async def trainings(found: CallerDep):
    state, owner = found.state, found.principal.owner

    def listing() -> list[dict]:
        listed = []
        for training in state.store.list_trainings(owner):
            job = state.store.get(training["job_id"])
            listed.append(
                {
                    **{k: v for k, v in training.items() if k != "log"},
                    "log": training["log"].splitlines()[-20:],
                    "status": job.status,
                    "step": job.step,
                    "total_steps": job.total_steps,
                }
            )
        return listed

    return {"status": "success", "trainings": await run_in_threadpool(listing)}


# ---- the admin's view -----------------------------------------------------------------------


@router.get(
    "/api/v1/admin/queue",
    summary="Queued and running jobs of every key",
    responses=answers(wire.AdminQueue),
    openapi_extra=query(KeyOnly),
)
async def admin_queue(found: AdminDep):
    state = found.state
    views = await run_in_threadpool(
        list_jobs, state.store, HistoryFilter(owner="admin", status="active", limit=200)
    )
    views = sorted(views, key=lambda job: job.id)

    def with_position(job: JobView) -> dict:
        summary = job_summary(state, job, True)
        info = state.store.queue_info(job)
        summary["queue_position"], summary["eta"] = info.position, info.eta
        summary["batch_key"] = job.batch_key
        return summary

    listed = [await run_in_threadpool(with_position, job) for job in views]
    return {"status": "success", "jobs": listed}


@router.get(
    "/api/v1/admin/workers",
    summary="Workers: device, resident models, state, batch",
    responses=answers(wire.AdminWorkers),
    openapi_extra=query(KeyOnly),
)
async def admin_workers(found: AdminDep):
    state = found.state
    workers = await run_in_threadpool(state.control.workers)
    running = await run_in_threadpool(running_by_worker, state.store)
    listed = []
    for worker in workers:
        held = running.get(worker.worker_id, [])
        listed.append(
            {
                "worker_id": worker.worker_id,
                "hostname": worker.hostname,
                "device": worker.device,
                "gpu_name": worker.gpu_name,
                "gpu_memory_mb": worker.gpu_memory_mb,
                "resident": worker.resident,
                "state": worker.state,
                "last_seen": worker.last_seen,
                "model_loads": worker.model_loads,
                "running": held,
                "batch_size": len(held),
            }
        )
    return {"status": "success", "workers": listed}


@router.post(
    "/api/v1/admin/workers/{worker_id}/drain",
    summary="Stop a worker claiming jobs",
    responses=answers(wire.WorkerOrdered),
    openapi_extra=body(KeyOnly),
)
async def drain_worker(found: AdminDep, worker_id: str):
    return await _order_worker(found, worker_id, "drain")


@router.post(
    "/api/v1/admin/workers/{worker_id}/resume",
    summary="Let a drained worker claim again",
    responses=answers(wire.WorkerOrdered),
    openapi_extra=body(KeyOnly),
)
async def resume_worker(found: AdminDep, worker_id: str):
    return await _order_worker(found, worker_id, "resume")


async def _order_worker(found, worker_id: str, command: str) -> dict:
    state = found.state
    known = {w.worker_id for w in await run_in_threadpool(state.control.workers)}
    if worker_id not in known:
        raise ValidationFailed({"worker_id": [f"No live worker {worker_id}."]})
    await run_in_threadpool(state.control.publish, command, worker_id)
    return ok(f"Worker {worker_id}: {command} sent", worker_id=worker_id)


@router.get(
    "/api/v1/admin/throughput",
    summary="Images/s and queue depth per minute, last hour",
    responses=answers(wire.Throughput),
    openapi_extra=query(KeyOnly),
)
async def throughput(found: AdminDep):
    state = found.state
    series = await run_in_threadpool(throughput_series, state.store, time.time())
    return {"status": "success", **series}


# ---- keys ---------------------------------------------------------------------------------------


def _key_id(raw: str) -> int:
    key_id = parse_job_id(raw)  # the same rules: a decimal number below 2^63
    if key_id is None:
        raise ValidationFailed({"key_id": ["The key id must be a whole number."]})
    return key_id


@router.get(
    "/api/v1/admin/keys",
    summary="Every key: prefix, label, plan, usage this month",
    responses=answers(wire.AdminKeys),
    openapi_extra=query(KeyOnly),
)
async def list_keys(found: AdminDep):
    state = found.state

    def listing() -> list[dict]:
        keys = state.keys.list()
        for key in keys:
            key["used_this_month"] = state.store.usage(key["id"])
        return keys

    return {"status": "success", "keys": await run_in_threadpool(listing)}


@router.post(
    "/api/v1/admin/keys",
    summary="Create a key (shown once)",
    responses=answers(wire.KeyCreated),
    openapi_extra=body(NewKeyRequest),
)
async def create_key(found: AdminDep):
    state, body = found.state, found.body
    label = str(body.get("label") or "").strip()[:200]
    plan = str(body.get("plan") or "").strip() or None
    if plan is not None and await run_in_threadpool(state.keys.plan, plan) is None:
        raise ValidationFailed({"plan": [f"No plan named {plan}."]})
    key = await run_in_threadpool(state.keys.create, label, None, plan)
    return ok("Key created: it is shown this once", key=key, prefix=key[:8], plan=plan)


@router.post(
    "/api/v1/admin/keys/{key_id}/revoke",
    summary="Revoke a key",
    responses=answers(wire.JobDone),
    openapi_extra=body(KeyOnly),
)
async def revoke_key(found: AdminDep, key_id: str):
    key_id = _key_id(key_id)
    if not await run_in_threadpool(found.state.keys.revoke_id, key_id):
        raise ValidationFailed({"key_id": [f"No live key {key_id}."]})
    return ok("Key revoked", id=key_id)


@router.post(
    "/api/v1/admin/keys/{key_id}/plan",
    summary="Put a key on a plan",
    responses=answers(wire.KeyPlanSet),
    openapi_extra=body(KeyPlanRequest),
)
async def key_plan(found: AdminDep, key_id: str):
    state, body, key_id = found.state, found.body, _key_id(key_id)
    plan = str(body.get("plan") or "").strip() or None
    if plan is not None and await run_in_threadpool(state.keys.plan, plan) is None:
        raise ValidationFailed({"plan": [f"No plan named {plan}."]})
    if not await run_in_threadpool(state.keys.set_key_plan, key_id, plan):
        raise ValidationFailed({"key_id": [f"No live key {key_id}."]})
    return ok("Plan set", id=key_id, plan=plan)

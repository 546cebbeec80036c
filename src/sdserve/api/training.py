"""Training routes (§4, §10): LoRA and Dreambooth fine-tunes, status, list, cancel, delete, sandbox."""

from __future__ import annotations

import shutil
import time
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from sdserve.api.deps import Caller, CallerDep
from sdserve.api.envelope import message_body, ok
from sdserve.api.openapi import answers, body, query
from sdserve.api.state import ServerState
from sdserve.api.submit import queue_spec
from sdserve.engine.batching import solo_key
from sdserve.errors import BadImage, ValidationFailed
from sdserve.ids import is_token_id
from sdserve.jobs.keys import Principal
from sdserve.jobs.store import JobView
from sdserve.jobs.trainings import TrainingNotFound
from sdserve.schemas import answers as wire
from sdserve.schemas.admin import KeyOnly
from sdserve.schemas.common import Dialect, Input, JobSpec
from sdserve.schemas.training import (
    TrainingKind,
    TrainingRequest,
    normalize_training_request,
    parse_training_request,
)

router = APIRouter(tags=["training"])

_WAIT_TEXT = {
    "lora": "it will take upto 30 minutes.",
    "dreambooth": "it will take upto 25 minutes.",
}


_TRAINING = Dialect("training")  # trainings are polled with fine_tune_status; fetch works too


async def submit_training(
    state: ServerState, principal: Principal, body: dict[str, Any], kind: TrainingKind
) -> dict[str, Any]:
    settings = state.settings
    req = parse_training_request(body)
    if kind == "dreambooth":
        if not req.base_model_id:
            raise ValidationFailed({"base_model_id": ["The base model id field is required."]})
        base_model_id = req.base_model_id
    elif req.base_model_id:
        base_model_id = req.base_model_id
    else:
        sdxl = (req.base_model_type or "normal").strip().lower() == "sdxl"
        base_model_id = settings.default_train_model_xl if sdxl else settings.default_train_model
    if kind != "sandbox":
        source = state.registry.resolve(
            base_model_id, principal.owner
        )  # unknown base model: "Model not found"
        state.registry.check_available(source)
        if state.registry.architecture(source) in ("t2v", "svd"):
            raise ValidationFailed(
                {"base_model_id": [f"Model {base_model_id} cannot be fine-tuned here."]}
            )
    params = normalize_training_request(req, kind, settings, base_model_id=base_model_id)

    inputs = {}
    for index, value in enumerate(req.images or []):
        if not isinstance(value, str) or not value.strip():
            raise BadImage(f"images[{index}]", f"images[{index}] is empty")
        inputs[f"images[{index}]"] = Input(value)  # the engine reads them in this order
    spec = JobSpec(
        kind=f"train_{kind}",
        model_id=base_model_id,
        params=params.model_dump(mode="json"),
        batch_key=solo_key("train", params.training_id),
        cost=float(params.max_train_steps),
        total_steps=params.max_train_steps,
        output_names=[],
        meta={},
        inputs=inputs,
        training={
            "training_id": params.training_id,
            "kind": kind,
            "base_model_id": base_model_id,
            "instance_prompt": params.instance_prompt,
            "webhook": params.webhook,  # posted at every stage, not only at the end
        },
        counts_as_model=kind != "sandbox",
    )
    await queue_spec(state, principal, spec, _TRAINING)
    return ok(
        "deploying_gpu",
        data=_WAIT_TEXT.get(kind, "sandbox: stages are simulated, no GPU is used."),
        training_id=params.training_id,
        model_id=params.training_id,
    )


def _make_create(kind: TrainingKind):
    async def create(found: CallerDep):
        return await submit_training(found.state, found.principal, found.body, kind)

    return create


def _caller(found: Caller, training_id: str | None = None) -> tuple[ServerState, Principal]:
    if training_id is not None and not is_token_id(training_id):
        raise TrainingNotFound()  # ids are short ASCII tokens; nothing else reaches the store
    return found.state, found.principal


async def training_status(found: CallerDep, training_id: str):
    state, principal = _caller(found, training_id)
    training = await run_in_threadpool(state.store.get_training, training_id, principal.owner)
    stage = training["stage"]
    status = "failed" if stage in ("training_failed", "training_cancelled") else "success"
    job = await run_in_threadpool(state.store.get, training["job_id"])
    return message_body(
        status,
        stage,
        data=training["log"],
        training_id=training_id,
        model_id=training_id,
        # Not in the hosted API, as in fetch: how far it is and how long it has left.
        **await run_in_threadpool(training_progress, state, job, stage == "model_ready"),
    )


def training_progress(state: ServerState, job: JobView, ready: bool) -> dict[str, Any]:
    """`progress` (steps done of total, also as "40/200") and `eta` in seconds: the queue's
    estimate while it waits, then this run's own pace so far (model load and class images
    included, so it errs long), and 0 once it has ended. `ready`: the model is saved, which
    the training's stage says before the job row has its last step."""
    step, total = job.step, job.total_steps
    eta: float | None
    if ready:
        step, eta = total, 0.0
    elif job.status == "queued":
        eta = state.store.queue_info(job).eta
    elif job.status == "processing":
        elapsed = time.time() - (job.started_at or time.time())
        eta = round(elapsed / step * (total - step), 1) if step > 0 else None
    else:
        eta = 0.0
    progress = {"step": step, "total_steps": total, "text": f"{step}/{total}"}
    return {"progress": progress, "eta": eta}


async def cancel_training(found: CallerDep, training_id: str):
    state, principal = _caller(found, training_id)
    await run_in_threadpool(state.store.request_cancel, training_id, principal.owner)
    return ok("Training cancelled", training_id=training_id)


async def delete_training(found: CallerDep, training_id: str):
    """Stop it if running, then remove the model id and every file the training made."""
    state, principal = _caller(found, training_id)
    await run_in_threadpool(state.store.delete_training, training_id, principal.owner)
    data_dir = state.settings.data_dir
    lora = data_dir / "loras" / f"{training_id}.safetensors"
    for made in (lora, state.settings.models_dir / training_id):
        await run_in_threadpool(state.storage.delete_model_files, made)
    lora.unlink(missing_ok=True)
    for folder in (
        state.settings.models_dir / training_id,
        data_dir / "training" / training_id,
        state.storage.path(f"inputs/train/{training_id}"),
    ):
        shutil.rmtree(folder, ignore_errors=True)
    return ok("Training deleted", training_id=training_id)


@router.post(
    "/api/v3/finetune_list",
    summary="List this key's trainings",
    responses=answers(wire.Trainings),
    openapi_extra=body(KeyOnly),
)
async def finetune_list(found: CallerDep):
    state, principal = _caller(found)
    trainings = await run_in_threadpool(state.store.list_trainings, principal.owner)
    data = [
        {
            "training_id": t["training_id"],
            "model_id": t["training_id"],
            "status": t["stage"],
            "training_type": t["kind"],
            "base_model_id": t["base_model_id"],
            "instance_prompt": t["instance_prompt"],
            "created_at": t["created_at"],
        }
        for t in trainings
    ]
    return ok("model list", data=data)


for _path, _kind, _summary in (
    ("/api/v3/lora_fine_tune", "lora", "Train a LoRA (queued)"),
    ("/api/v3/fine_tune", "dreambooth", "Train a Dreambooth model (queued)"),
    ("/api/v3/fine_tune_v2", "dreambooth", "Train a Dreambooth model, v2 fields (queued)"),
    ("/api/sandbox/v3/fine_tune", "sandbox", "Simulate a training (no GPU)"),
):
    router.add_api_route(
        _path,
        _make_create(_kind),
        methods=["POST"],
        summary=_summary,
        responses=answers(wire.TrainingStarted),
        openapi_extra=body(TrainingRequest),
    )
for _path in (
    "/api/v3/fine_tune_status/{training_id}",
    "/api/sandbox/v3/fine_tune_status/{training_id}",
):
    for _method in ("POST", "GET"):  # a route each: distinct OpenAPI operation ids
        router.add_api_route(
            _path,
            training_status,
            methods=[_method],
            summary="A training's stage and log",
            responses=answers(wire.TrainingStatus),
            openapi_extra=body(KeyOnly) if _method == "POST" else query(KeyOnly),
        )
for _path in ("/api/v3/cancle_training/{training_id}", "/api/v3/cancel_training/{training_id}"):
    router.add_api_route(
        _path,
        cancel_training,
        methods=["POST"],
        summary="Cancel a training",
        responses=answers(wire.TrainingDone),
        openapi_extra=body(KeyOnly),
    )
for _path in ("/api/v3/finetune/delete/{training_id}", "/api/v3/delete/{training_id}"):
    router.add_api_route(
        _path,
        delete_training,
        methods=["POST"],
        summary="Delete a training and what it made",
        responses=answers(wire.TrainingDone),
        openapi_extra=body(KeyOnly),
    )

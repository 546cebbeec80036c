"""Every fetch form of reference §1.4 / §14.5, over POST and GET: one id space, one handler."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from sdserve.api.deps import Caller, CallerDep
from sdserve.api.envelope import answer, job_body
from sdserve.api.openapi import answers, body, query
from sdserve.api.submit import job_response
from sdserve.errors import JobNotFound
from sdserve.ids import parse_job_id
from sdserve.schemas.admin import FetchRequest, KeyOnly
from sdserve.schemas.answers import JobAnswer

router = APIRouter(tags=["fetch"])

# Fetch paths clients use that are no dialect's own (those come with each family's routes,
# see api/families.py). Every one reaches every job: one id space.
ID_PATHS = [
    "/api/v4/dreambooth/fetch/{job_id}",
    "/api/v5/images/fetch/{job_id}",
    "/api/v6/3d/fetch/{job_id}",
    "/api/v1/enterprise/{product}/fetch/{job_id}",
]
REQUEST_ID_PATHS = [
    "/api/v4/dreambooth/fetch",
    "/api/v6/images/fetch",
    "/api/v1/enterprise/fetch",
    "/api/v1/enterprise/{product}/fetch",
]


def _parse_id(value) -> int:
    job_id = parse_job_id(value)
    if job_id is None:
        raise JobNotFound()
    return job_id


async def _fetch(found: Caller, raw_id) -> JSONResponse:
    state, principal = found.state, found.principal
    if raw_id is None:
        raw_id = found.body.get("request_id", found.body.get("id"))
    job_id = _parse_id(raw_id)
    job = state.store.get_finished(job_id, principal.owner)
    if job is not None:  # the common case, answered from memory
        return answer(job_body(job, None, state.settings.base_url, state.output_url))
    job = await run_in_threadpool(state.store.get, job_id, principal.owner)
    return answer(await run_in_threadpool(job_response, state, job))


async def fetch_by_path(found: CallerDep, job_id: str):
    return await _fetch(found, job_id)


async def fetch_by_request_id(found: CallerDep):
    return await _fetch(found, None)


# What the OpenAPI document says of each form (declared only: the answer is sent as it is).
ANSWERS = answers(JobAnswer, with_error=False)
BY_PATH = {"POST": body(KeyOnly), "GET": query(KeyOnly)}
BY_REQUEST_ID = {"POST": body(FetchRequest), "GET": query(FetchRequest)}

# One route per method, so that each gets its own OpenAPI operation id.
for _method in ("POST", "GET"):
    for _path in ID_PATHS:
        router.add_api_route(
            _path,
            fetch_by_path,
            methods=[_method],
            summary="Fetch a job",
            responses=ANSWERS,
            openapi_extra=BY_PATH[_method],
        )
    for _path in REQUEST_ID_PATHS:
        router.add_api_route(
            _path,
            fetch_by_request_id,
            methods=[_method],
            summary="Fetch a job by request_id",
            responses=ANSWERS,
            openapi_extra=BY_REQUEST_ID[_method],
        )

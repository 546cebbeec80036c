"""The routes of every registered family: each path turns its body into a job spec (the family's
schema) and submits it; nothing here knows any one family."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from sdserve.api import fetch
from sdserve.api.deps import AdminDep, Caller, CallerDep
from sdserve.api.envelope import answer
from sdserve.api.openapi import body
from sdserve.api.submit import submit_spec
from sdserve.families import Family
from sdserve.schemas.common import Context, Route


def family_router(families: tuple[Family, ...]) -> APIRouter:
    """Every family's routes, and a fetch route at each of its dialects' fetch paths."""
    router = APIRouter()
    fetch_paths = {
        r.dialect.fetch_path.replace("{id}", "{job_id}") for f in families for r in f.routes
    }
    for path in sorted(fetch_paths - set(fetch.ID_PATHS)):
        for method in ("POST", "GET"):  # one route per method: each its own operation id
            router.add_api_route(
                path,
                fetch.fetch_by_path,
                methods=[method],
                summary="Fetch a job",
                tags=["fetch"],
                responses=fetch.ANSWERS,
                openapi_extra=fetch.BY_PATH[method],
            )
    for family in families:
        for route in family.routes:
            router.add_api_route(
                route.path,
                _endpoint(route),
                methods=["POST"],
                summary=route.summary,
                tags=list(route.tags) or [family.name],
                # Every family answers a job's envelope (declared once, here, for all of them).
                responses=fetch.ANSWERS,
                openapi_extra=body(route.request),
                include_in_schema=not route.hidden,
            )
    return router


def _endpoint(route: Route):
    async def submit(found: Caller):
        state = found.state
        context = Context(state.settings, state.registry, found.principal.owner)
        spec = await run_in_threadpool(route.build, found.body, context)
        return answer(await submit_spec(state, found.principal, spec, route.dialect))

    if route.admin_only:

        async def submit_as_admin(found: AdminDep):
            return await submit(found)

        return submit_as_admin

    async def submit_as_key(found: CallerDep):
        return await submit(found)

    return submit_as_key

"""The FastAPI application: routes, the error envelope, and the in-process worker and webhook threads."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdserve import __version__
from sdserve.api import (
    admin,
    console,
    events,
    fetch,
    operations,
    plans,
    system,
    training,
    utilities,
)
from sdserve.api.docs import mount_docs
from sdserve.api.envelope import error_response, http_error_body, job_body
from sdserve.api.failures import InternalErrors, internal_error_response, record_internal_error
from sdserve.api.families import family_router
from sdserve.api.state import ServerState
from sdserve.engine.base import Runtime
from sdserve.engine.registry import ModelRegistry
from sdserve.errors import InvalidRequest, SdserveError
from sdserve.families import build_engines, lanes, registered
from sdserve.jobs.catalogue import ModelCatalogue
from sdserve.jobs.control import ControlChannel
from sdserve.jobs.keys import KeyRing
from sdserve.jobs.notify import CompletionBus
from sdserve.jobs.store import JobStore
from sdserve.jobs.webhooks import WebhookDispatcher
from sdserve.jobs.worker import Worker
from sdserve.settings import Settings
from sdserve.storage.router import StorageRouter

log = logging.getLogger(__name__)
_WARM_UP_WAIT_SECONDS = 120.0


def build_state(settings: Settings) -> ServerState:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.resolved_database_url)
    store.create_schema()
    catalogue = ModelCatalogue(store)
    storage = StorageRouter(settings, store)
    return ServerState(
        settings=settings,
        store=store,
        keys=KeyRing(store, settings.admin_key, settings.queue_limit_per_key),
        catalogue=catalogue,
        control=ControlChannel(store),
        registry=ModelRegistry(settings, catalogue, storage),
        storage=storage,
        bus=CompletionBus(),
    )


def webhook_dispatcher(state: ServerState) -> WebhookDispatcher:
    def final_answer(job, base_url, url_of):
        return job_body(job, None, base_url, url_of)

    return WebhookDispatcher(state.settings, state.store, state.storage, final_answer)


def build_worker(
    state: ServerState,
    bus: CompletionBus | None = None,
    on_restart=None,
    lane: str | None = None,
    runtime: Runtime | None = None,
) -> Worker:
    """A worker with every registered family's engine on one device and memory budget (or only
    a lane's, sharing `runtime` with the main worker)."""
    runtime = runtime or Runtime.create(state.settings, state.registry)
    engines = build_engines(state.settings, runtime, lane)
    return Worker(
        state.settings,
        state.store,
        state.storage,
        runtime,
        engines,
        bus,
        on_restart=on_restart,
        advertised=lane is None,
    )


def _start_background(
    state: ServerState, stop: threading.Event
) -> tuple[list[threading.Thread], Worker | None]:
    threads = [
        threading.Thread(
            target=webhook_dispatcher(state).run,
            args=(stop,),
            name="webhooks",
            daemon=True,
        )
    ]
    worker = None
    if state.settings.in_process_worker:
        worker = build_worker(state, state.bus)
        for lane in lanes(state.settings):  # a lane's jobs never wait behind the others'
            lane_worker = build_worker(state, state.bus, lane=lane, runtime=worker.runtime)
            threads.append(
                threading.Thread(
                    target=lane_worker.run, args=(stop,), name=f"worker-{lane}", daemon=True
                )
            )
        threads.append(
            threading.Thread(target=worker.run, args=(stop,), name="worker", daemon=True)
        )
    for thread in threads:
        thread.start()
    # The API serves once its worker has warmed up (a cold eta is priced at the warm-up's
    # speed), but no longer waits for a default model still downloading.
    if worker is not None and not worker.warmed_up.wait(_WARM_UP_WAIT_SECONDS):
        log.warning("serving before the warm-up has ended (%.0f s)", _WARM_UP_WAIT_SECONDS)
    return threads, worker


def create_app(settings: Settings) -> FastAPI:
    state = build_state(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = threading.Event()
        threads, worker = _start_background(state, stop)
        yield
        # Shutdown or restart: the job running finishes within the grace period, or goes back
        # to the queue; queued jobs stay queued. Nothing accepted is lost either way.
        state.shutting_down.set()
        stop.set()
        state.bus.work_available.set()
        deadline = time.monotonic() + state.settings.shutdown_grace_seconds
        for thread in threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if worker is not None and threads[-1].is_alive():
            worker.give_back_current()

    app = FastAPI(
        title="sdserve",
        version=__version__,
        description="Self-hosted Stable Diffusion API, wire-compatible with ModelsLab "
        "(stablediffusionapi.com). Every endpoint takes a JSON body with your `key`.",
        lifespan=lifespan,
    )
    app.state.sdserve = state
    mount_docs(app)  # /docs and /redoc without a CDN
    console.mount_console(app)  # the web console at /

    @app.exception_handler(SdserveError)
    async def _sdserve_error(_request: Request, exc: SdserveError):
        return error_response(exc, settings)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        body = http_error_body(exc.status_code, str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, _exc: RequestValidationError):
        return error_response(InvalidRequest("Invalid API Request"), settings)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        record_internal_error(request.scope, exc)
        return internal_error_response(settings)

    app.add_middleware(InternalErrors, settings=settings)

    # Routes go straight onto the app, in this order (fetch first: most requests are fetches).
    # Included routers are matched through an extra layer per request in FastAPI 0.16x.
    families = registered(settings)
    routers = [fetch.router, family_router(families), training.router, system.router]
    routers += [family.router for family in families if family.router is not None]
    routers += [admin.router, utilities.router, plans.router, operations.router]
    routers += [events.router, console.router]
    for router in routers:
        app.router.routes.extend(router.routes)
    return app

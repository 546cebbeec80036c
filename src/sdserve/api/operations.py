"""Operations: liveness, readiness and Prometheus metrics (read from the shared database, so any
API process reports the whole deployment: every worker and every job). prometheus-client is the
optional `metrics` extra, imported by the first scrape."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from sdserve.api.failures import internal_error_count
from sdserve.api.openapi import answers
from sdserve.api.state import ServerState, get_state
from sdserve.errors import SdserveError
from sdserve.extras import require
from sdserve.jobs.stats import deployment_snapshot
from sdserve.schemas.answers import Health, OperationError, Readiness

router = APIRouter(tags=["operations"])
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, float("inf"))
_RECENT_SECONDS = 3600.0
_RECENT_JOBS = 5000  # the newest finished jobs the timing metrics are computed over


@router.get(
    "/healthz",
    summary="Liveness: the process answers",
    responses=answers(Health, with_error=False),
)
async def healthz():
    """The process is up (liveness)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: database, storage and a worker",
    responses={
        200: {"model": Readiness, "description": "Ready"},
        503: {"model": Readiness, "description": "Not ready"},
    },
)
async def readyz(request: Request):
    """The database and the output storage answer (readiness: send traffic here)."""
    state = get_state(request)
    checks = await run_in_threadpool(_readiness, state)
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ready" if ready else "not_ready", **checks}
    return JSONResponse(body, status_code=200 if ready else 503)


def _readiness(state: ServerState) -> dict[str, str]:
    checks = {}
    try:
        state.store.ping()
        checks["database"] = "ok"
    except SdserveError as exc:
        checks["database"] = exc.message
    try:
        state.storage.exists(state.storage.new_key("temp/.ready"))
        checks["storage"] = "ok"
    except SdserveError as exc:
        checks["storage"] = exc.message
    return checks


_METRICS_TEXT = {"text/plain": {"schema": {"type": "string"}}}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    responses={
        200: {"description": "The metrics, in Prometheus' text format", "content": _METRICS_TEXT},
        "5XX": {"model": OperationError, "description": "prometheus-client is not installed"},
    },
)
async def metrics(request: Request):
    state = get_state(request)
    try:
        prometheus = require("prometheus_client", "The /metrics endpoint")
    except SdserveError as exc:
        return JSONResponse({"status": "error", "message": exc.message}, status_code=501)
    registry = prometheus.CollectorRegistry()
    registry.register(_DatabaseCollector(state))
    try:
        payload = await run_in_threadpool(prometheus.generate_latest, registry)
    except SdserveError as exc:
        return JSONResponse({"status": "error", "message": exc.message}, status_code=503)
    return Response(payload, media_type=prometheus.CONTENT_TYPE_LATEST)


class _DatabaseCollector:
    """Reads the deployment's state at scrape time."""

    def __init__(self, state: ServerState):
        self.state = state

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            SummaryMetricFamily,
        )

        now = time.time()
        snapshot = deployment_snapshot(self.state.store, now, _RECENT_SECONDS, _RECENT_JOBS)
        by_status, recent, timings = snapshot.by_status, snapshot.recent, snapshot.timings
        workers, failed_attempts = snapshot.workers, snapshot.failed_attempts
        given_up = snapshot.given_up
        durations = [duration for duration, _ in recent]

        queued = sum(count for status, _kind, count in by_status if status == "queued")
        yield GaugeMetricFamily("sdserve_queue_depth", "Jobs waiting for a worker", value=queued)
        jobs = GaugeMetricFamily(
            "sdserve_jobs", "Jobs by status and kind", labels=["status", "kind"]
        )
        for status, kind, count in by_status:
            jobs.add_metric([status, kind], count)
        yield jobs

        buckets = []
        for bound in _DURATION_BUCKETS:
            buckets.append(
                (
                    str(bound) if bound != float("inf") else "+Inf",
                    sum(d <= bound for d in durations),
                )
            )
        total = sum(durations)
        yield HistogramMetricFamily(
            "sdserve_job_seconds",
            "Worker time of jobs finished in the last hour",
            buckets=buckets,
            sum_value=total,
        )
        stages: dict[str, list[float]] = {}
        for _, result in recent:
            for stage, seconds in ((result or {}).get("timings") or {}).items():
                stages.setdefault(stage, []).append(seconds)
        batch_sizes = stages.pop("batch_size", [])
        by_stage = SummaryMetricFamily(
            "sdserve_stage_seconds",
            "Where recent jobs' time went: queue_wait, model_load, denoise, decode, nsfw, upload",
            labels=["stage"],
        )
        for stage, values in sorted(stages.items()):
            by_stage.add_metric([stage], count_value=len(values), sum_value=sum(values))
        yield by_stage
        yield SummaryMetricFamily(
            "sdserve_batch_size",
            "Jobs sharing a denoising loop, over recent jobs",
            count_value=len(batch_sizes),
            sum_value=sum(batch_sizes),
        )
        steps = GaugeMetricFamily(
            "sdserve_seconds_per_step",
            "Measured seconds per work unit (a step at 512x512)",
            labels=["model_id"],
        )
        for model_id, seconds in timings:
            steps.add_metric([model_id], seconds)
        yield steps

        loads = CounterMetricFamily(
            "sdserve_model_loads", "Models loaded by each worker", labels=["worker"]
        )
        live = GaugeMetricFamily(
            "sdserve_workers", "Workers seen in the last 2 minutes", labels=["state"]
        )
        states: dict[str, int] = {}
        for worker in workers:
            loads.add_metric([worker.worker_id], worker.model_loads)
            states[worker.state] = states.get(worker.state, 0) + 1
        for name, count in states.items():
            live.add_metric([name], count)
        yield loads
        yield live
        yield CounterMetricFamily(
            "sdserve_webhook_failures", "Failed webhook delivery attempts", value=failed_attempts
        )
        yield CounterMetricFamily(
            "sdserve_webhooks_given_up", "Webhooks dropped after every retry failed", value=given_up
        )
        yield CounterMetricFamily(
            "sdserve_internal_errors",
            "Unhandled exceptions in this API process, each answered as an internal error",
            value=internal_error_count(),
        )

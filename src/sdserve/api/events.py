"""The job event stream: Server-Sent Events of a key's jobs (queued, started, step, done, failed)
with progress, queue position and ETA. Any client can follow it; docs/events.md describes it.

The stream reads the job store on a short timer, so it sees the jobs of every worker and API
process alike. A reconnect sends `Last-Event-ID`: the jobs that finished since then are sent,
then the current state of the ones still queued or running.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from sdserve.api.deps import CallerDep
from sdserve.api.state import ServerState
from sdserve.engine.assets import ADMIN_OWNER
from sdserve.errors import ValidationFailed
from sdserve.ids import parse_job_id
from sdserve.jobs.history import jobs_to_follow
from sdserve.jobs.views import JobView

router = APIRouter(tags=["events"])

POLL_SECONDS = 0.3
_RETRY_MS = 2000  # how long EventSource waits before it reconnects
_POSITION_SECONDS = 1.0
_POSITION_REFRESH_MAX = 50
_OVERLAP_SECONDS = 2.0  # finished jobs are looked for a little before the cursor (clock skew)
_MAX_SECONDS = 3600.0  # a stream ends after an hour; clients reconnect (and proxies reset)
# Sent so that proxies pass each event on at once (nginx buffers otherwise) and nothing caches it.
STREAM_HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


def job_event(state: ServerState, job: JobView, position: int | None, eta: float | None) -> dict:
    """What every event says of its job: enough to draw a progress bar and show the result."""
    result = job.result or {}
    event: dict[str, Any] = {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "model_id": job.model_id,
        "step": job.step,
        "total_steps": job.total_steps,
        "queue_position": position,
        "eta": eta,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }
    if job.status == "success":
        event["output"] = [state.output_url(key) for key in result.get("output_keys", [])]
        event["generation_time"] = round(job.generation_time or 0.0, 3)
        event["timings"] = result.get("timings", {})
    if job.status == "failed":
        event["error"] = job.error or "Failed, Try Again"
    return event


def _with_owner(event: dict, job: JobView) -> dict:
    return {**event, "owner": job.owner}


def _transitions(before: tuple[str, int] | None, job: JobView) -> list[str]:
    """The event names that take a watcher from what it saw (`before`) to `job`, in order. A job
    that moved on between two looks still shows each stage once: queued, started, done."""
    if before is not None and before[0] == "new":
        return ["queued", *([] if job.status == "queued" else _transitions(("queued", 0), job))]
    status, step = job.status, job.step
    if status == "queued":
        return [] if before is not None and before[0] == "queued" else ["queued"]
    if status == "processing":
        names = [] if before is not None and before[0] == "processing" else ["started"]
        if step > 0 and (before is None or before[0] != "processing" or before[1] != step):
            names.append("step")
        return names
    # Seen waiting, now finished: it started in between. Never seen: only how it ended.
    ran = job.started_at is not None
    names = ["started"] if ran and before is not None and before[0] == "queued" else []
    return [*names, "done" if status == "success" else "failed"]


def _sse(name: str, data: dict, event_id: str) -> bytes:
    return b"event: %s\nid: %s\ndata: %s\n\n" % (
        name.encode(),
        event_id.encode(),
        orjson.dumps(data),
    )


class EventStream:
    """One client's stream: what it has been told of each job, and where to look next."""

    def __init__(self, state: ServerState, owner: str, job_id: int | None, since: float):
        self.state = state
        self.owner = owner
        self.job_id = job_id
        self.since = since
        self.seen: dict[int, tuple[str, int]] = {}  # job id -> (status, step) last sent
        self.positions: dict[int, int | None] = {}
        self.done: set[int] = set()
        self.next_refresh = 0.0
        self.opened = time.time()

    def turn(self) -> list[bytes]:
        """One look at the store (in a thread): the events since the last look. A waiting job's
        `queued` event is sent again when its place in the queue changes (looked at each second)."""
        started = time.time()
        refresh = started >= self.next_refresh
        if refresh:
            self.next_refresh = started + _POSITION_SECONDS
        jobs = jobs_to_follow(self.state.store, self.owner, self.since - _OVERLAP_SECONDS)
        refreshes = 0
        events = []
        cursor = f"{started:.3f}"
        for job in jobs:
            if (self.job_id is not None and job.id != self.job_id) or job.id in self.done:
                continue
            before = self.seen.get(job.id)
            if before is None and job.created_at >= self.opened:
                before = ("new", 0)  # queued while watched: every stage is shown, from queued
            names = _transitions(before, job)
            if not names:
                # A waiting job's place is looked up again, for the first jobs of the queue only
                # (each look is a query, and a place far back changes nothing a watcher sees).
                if not (refresh and job.status == "queued" and refreshes < _POSITION_REFRESH_MAX):
                    continue
                refreshes += 1
            position = eta = None
            if job.status in ("queued", "processing"):
                info = self.state.store.queue_info(job)
                position, eta = info.position, info.eta
            if not names:
                if self.positions.get(job.id) == position:
                    continue
                names = ["queued"]
            data = job_event(self.state, job, position, eta)
            if self.owner == ADMIN_OWNER:  # the admin follows every key's jobs: say whose
                data = _with_owner(data, job)
            events.extend(_sse(name, data, cursor) for name in names)
            self.seen[job.id] = (job.status, job.step)
            self.positions[job.id] = position
            if job.status in ("success", "failed"):
                self.done.add(job.id)
                self.seen.pop(job.id, None)
                self.positions.pop(job.id, None)
        self.since = started
        if len(self.done) > 10_000:  # long streams: finished ids older than the overlap suffice
            self.done = set(sorted(self.done)[-1000:])
        return events


def _since(request: Request, body: dict) -> float:
    """Where a stream starts: `Last-Event-ID` (a reconnect) or `since`, else now."""
    raw = request.headers.get("last-event-id") or body.get("since")
    if raw in (None, ""):
        return time.time()
    value = _number(raw)
    if value is None:
        raise ValidationFailed({"since": ["The since must be a Unix time in seconds."]})
    return min(max(value, 0.0), time.time())


def _heartbeat(body: dict) -> float:
    seconds = _number(body.get("heartbeat", 15))
    if seconds is None:
        raise ValidationFailed({"heartbeat": ["The heartbeat must be seconds (1 to 60)."]})
    return min(max(seconds, 1.0), 60.0)


def _number(raw: object) -> float | None:
    try:
        value = float(str(raw))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# Not in the OpenAPI schema: a stream that never ends by itself reads there as an ordinary JSON
# operation (generic clients and fuzzers would wait on it). docs/events.md documents it.
@router.get("/api/v1/jobs/events", include_in_schema=False)
async def job_events(request: Request, found: CallerDep):
    """A `text/event-stream` of the key's jobs: `queued`, `started`, `step`, `done`, `failed`.
    The key may be sent as `?key=` (EventSource cannot set headers) or `Authorization: Bearer`.
    `job_id` follows one job. The admin key follows every key's jobs."""
    state, body, principal = found.state, found.body, found.principal
    job_id = None
    if body.get("job_id") not in (None, ""):
        job_id = parse_job_id(body.get("job_id"))
        if job_id is None:
            raise ValidationFailed({"job_id": ["The job_id must be a request id."]})
        await run_in_threadpool(state.store.get, job_id, principal.owner)  # JobNotFound
    stream = EventStream(state, principal.owner, job_id, _since(request, body))
    heartbeat = _heartbeat(body)
    return StreamingResponse(
        _run(request, stream, heartbeat), media_type="text/event-stream", headers=STREAM_HEADERS
    )


async def _run(request: Request, stream: EventStream, heartbeat: float) -> AsyncIterator[bytes]:
    state = stream.state
    yield b"retry: %d\n: sdserve job events\n\n" % _RETRY_MS
    opened = last_sent = time.monotonic()
    while not state.shutting_down.is_set() and time.monotonic() - opened < _MAX_SECONDS:
        events = await run_in_threadpool(stream.turn)
        if events:
            yield b"".join(events)
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= heartbeat:
            yield b": keep-alive\n\n"  # a comment: keeps proxies and load balancers from timing out
            last_sent = time.monotonic()
        if await request.is_disconnected():
            break
        await asyncio.sleep(POLL_SECONDS)

"""In-process wake-ups: a finished job wakes the requests waiting on it; a new job wakes the worker."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict


class CompletionBus:
    """Lets a worker thread wake the asyncio requests waiting on a job, without polling.

    Workers in other processes cannot reach this bus, so waiters also re-check the store on a
    short timer; the bus only removes that latency for the in-process worker.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = (
            defaultdict(list)
        )
        self.work_available = threading.Event()

    def subscribe(self, job_id: int) -> asyncio.Event:
        event = asyncio.Event()
        with self._lock:
            self._waiters[job_id].append((asyncio.get_running_loop(), event))
        return event

    def unsubscribe(self, job_id: int, event: asyncio.Event) -> None:
        with self._lock:
            waiters = self._waiters.get(job_id, [])
            self._waiters[job_id] = [w for w in waiters if w[1] is not event]
            if not self._waiters[job_id]:
                del self._waiters[job_id]

    def publish(self, job_id: int) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, []))
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

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


def listen_for_jobs(database_url: str, wake: threading.Event, stop: threading.Event) -> None:
    """Set `wake` whenever PostgreSQL says a job was queued (LISTEN/NOTIFY); runs in a thread.

    Reconnects after the database goes away; meanwhile the worker polls on its timer.
    """
    import logging

    import psycopg

    from sdserve.jobs.store import NEW_JOB_CHANNEL

    log = logging.getLogger(__name__)
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    while not stop.is_set():
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
                connection.execute(f"LISTEN {NEW_JOB_CHANNEL}")
                wake.set()  # jobs may have arrived while we were not listening
                while not stop.is_set():
                    for _ in connection.notifies(timeout=1.0, stop_after=1):
                        wake.set()
        except psycopg.Error as exc:
            log.warning("job notifications lost (%s); retrying", exc)
            stop.wait(1.0)

"""Webhook delivery: POST the final job object plus track_id, retried with backoff, every attempt recorded."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import httpx

from sdserve.jobs.store import JobStore, JobView
from sdserve.settings import Settings
from sdserve.storage.router import StorageRouter

log = logging.getLogger(__name__)


class WebhookDispatcher:
    """Runs in its own thread so a slow receiver never blocks a worker.

    Delivery state lives on the job row, so a webhook owed by a process that died is sent by
    any other process running a dispatcher.
    """

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        storage: StorageRouter,
        answer: Callable[[JobView, str, Callable[[str], str]], dict],
    ):
        self._settings = settings
        self._store = store
        self._storage = storage
        self._answer = answer  # the job's final answer, as fetch gives it (api.envelope.job_body)
        self._client = httpx.Client(timeout=settings.webhook_timeout, follow_redirects=False)

    def _url_of(self, key: str) -> str:
        return self._storage.url(key, self._settings.base_url)

    def deliver_due(self) -> int:
        due = self._store.claim_webhooks(limit=16, hold_seconds=self._settings.webhook_timeout + 5)
        for outbox_id, url, payload, job in due:
            if payload is None:  # a job's final answer, with links under today's public URL
                payload = self._answer(job, self._settings.base_url, self._url_of)
            status_code, error, ok = None, None, False
            try:
                response = self._client.post(url, json=payload)
                status_code = response.status_code
                ok = 200 <= status_code < 300
                if not ok:
                    error = f"HTTP {status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            self._store.record_webhook_attempt(
                outbox_id,
                status_code,
                error,
                ok,
                self._settings.webhook_max_attempts,
                self._settings.webhook_backoff_seconds,
            )
        return len(due)

    def run(self, stop: threading.Event, interval: float = 0.25) -> None:
        while not stop.is_set():
            try:
                if self.deliver_due():
                    continue
            except Exception:  # never let a bad row or a DB blip kill the thread
                log.exception("webhook delivery loop error")
            stop.wait(interval)
        self._client.close()

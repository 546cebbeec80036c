"""Webhook delivery: POST the final job object plus track_id, retried with backoff, every attempt recorded."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable

import httpx

from sdserve.jobs.store import JobStore, JobView
from sdserve.net import BlockedUrl, send_time_url
from sdserve.settings import Settings
from sdserve.storage.router import StorageRouter

log = logging.getLogger(__name__)


def _finite(value):
    """`value` with NaN and infinities as null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_bytes(payload: dict) -> bytes:
    """Strict JSON (what receivers parse); a non-finite number is sent as null, never fails."""
    try:
        text = json.dumps(payload, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(payload), allow_nan=False)
    return text.encode()


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
            # Whatever goes wrong with one row is that row's failed attempt: it never stops the
            # rows claimed behind it, and it is retried with backoff, not every claim.
            try:
                status_code, error, ok = self._send(url, payload, job)
            except Exception as exc:
                status_code, error, ok = None, f"{type(exc).__name__}: {exc}", False
            try:
                self._store.record_webhook_attempt(
                    outbox_id,
                    status_code,
                    error,
                    ok,
                    self._settings.webhook_max_attempts,
                    self._settings.webhook_backoff_seconds,
                )
            except Exception:
                log.exception("could not record webhook attempt %s", outbox_id)
        return len(due)

    def _send(self, url: str, payload: dict | None, job) -> tuple[int | None, str | None, bool]:
        try:
            # Checked again now: the host's DNS may have changed since the job was accepted.
            target = send_time_url(url, self._settings.allow_private_urls)
        except BlockedUrl as exc:
            return None, f"refused: the webhook {exc}", False
        if payload is None:  # a job's final answer, with links under today's public URL
            payload = self._answer(job, self._settings.base_url, self._url_of)
        body = json_bytes(payload)
        try:
            response = self._client.post(
                target, content=body, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}", False
        if 200 <= response.status_code < 300:
            return response.status_code, None, True
        return response.status_code, f"HTTP {response.status_code}", False

    def run(self, stop: threading.Event, interval: float = 0.25) -> None:
        while not stop.is_set():
            try:
                if self.deliver_due():
                    continue
            except Exception:  # never let a bad row or a DB blip kill the thread
                log.exception("webhook delivery loop error")
            stop.wait(interval)
        self._client.close()

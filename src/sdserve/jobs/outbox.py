"""The store's part that owes webhooks: an outbox table, claimed and retried with backoff."""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from sdserve.jobs.db import (
    Job,
    WebhookDelivery,
    WebhookOutbox,
)
from sdserve.jobs.views import (
    JobView,
)


class Webhooks:
    def add_webhook(self, s: Session, job_id: int, url: str, payload: dict | None) -> None:
        s.add(WebhookOutbox(job_id=job_id, url=url, payload=payload, next_at=time.time()))

    def claim_webhooks(
        self, limit: int, hold_seconds: float
    ) -> list[tuple[int, str, dict | None, JobView]]:
        """Due webhooks as (outbox id, url, payload, job); pushed forward so no one else sends now."""
        now = time.time()
        with self.session(write=True) as s:
            rows = s.scalars(
                select(WebhookOutbox)
                .where(WebhookOutbox.state == "pending", WebhookOutbox.next_at <= now)
                .order_by(WebhookOutbox.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            due = []
            for row in rows:
                row.next_at = now + hold_seconds
                due.append((row.id, row.url, row.payload, JobView.of(s.get(Job, row.job_id))))
            return due

    def record_webhook_attempt(
        self,
        outbox_id: int,
        status_code: int | None,
        error: str | None,
        ok: bool,
        max_attempts: int,
        backoff_seconds: float,
    ) -> None:
        now = time.time()
        with self.session(write=True) as s:
            row = s.get(WebhookOutbox, outbox_id)
            row.attempts += 1
            s.add(
                WebhookDelivery(
                    job_id=row.job_id,
                    outbox_id=row.id,
                    attempt=row.attempts,
                    url=row.url,
                    sent_at=now,
                    status_code=status_code,
                    error=error,
                    ok=ok,
                )
            )
            if ok:
                row.state = "delivered"
            elif row.attempts >= max_attempts:
                row.state = "gave_up"
            else:
                row.next_at = now + backoff_seconds * 2 ** (row.attempts - 1)


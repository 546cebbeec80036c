"""The store's part that counts requests against keys' queue limits and monthly quotas."""

from __future__ import annotations

import time

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from sdserve.errors import QuotaExceeded, RateLimited
from sdserve.jobs.db import (
    Job,
    KeyUsage,
)


class Quotas:
    @staticmethod
    def check_queue(s: Session, owner: str, queue_limit: int) -> None:
        """RateLimited when the owner already has `queue_limit` jobs queued or running."""
        waiting = s.scalar(
            select(func.count(Job.id)).where(
                Job.owner == owner, Job.status.in_(("queued", "processing"))
            )
        )
        if waiting >= queue_limit:
            raise RateLimited(queue_limit)

    def check_limits(
        self, owner: str, queue_limit: int | None, key_id: int | None, quota: int | None
    ) -> None:
        """Refuse now what `submit` would refuse (queue full, month used up), before a request
        does any work on its inputs. `submit` checks again, in its own transaction."""
        with self.session() as s:
            if queue_limit is not None:
                self.check_queue(s, owner, queue_limit)
            if key_id is not None and quota is not None:
                period = time.strftime("%Y-%m", time.gmtime())
                used = s.scalar(
                    select(KeyUsage.requests).where(
                        KeyUsage.key_id == key_id, KeyUsage.period == period
                    )
                )
                if (used or 0) >= quota:
                    raise QuotaExceeded(quota)

    def count_request(self, key_id: int, quota: int | None) -> None:
        """Count a request that makes no job (a proxied chat) against the key's month."""
        with self.session(write=True) as s:
            self._count_request(s, key_id, quota)

    def _count_request(self, s: Session, key_id: int, quota: int | None) -> None:
        """Count one accepted request against the key's month; refuse it past the quota."""
        period = time.strftime("%Y-%m", time.gmtime())
        insert = sqlite_insert if self.is_sqlite else pg_insert
        s.execute(
            insert(KeyUsage)
            .values(key_id=key_id, period=period, requests=1)
            .on_conflict_do_update(
                index_elements=["key_id", "period"], set_={"requests": KeyUsage.requests + 1}
            )
        )
        used = s.scalar(
            select(KeyUsage.requests).where(KeyUsage.key_id == key_id, KeyUsage.period == period)
        )
        if quota is not None and used > quota:
            raise QuotaExceeded(quota)  # the transaction rolls back, count included

    def usage(self, key_id: int) -> int:
        period = time.strftime("%Y-%m", time.gmtime())
        with self.session() as s:
            used = s.scalar(
                select(KeyUsage.requests).where(
                    KeyUsage.key_id == key_id, KeyUsage.period == period
                )
            )
            return used or 0


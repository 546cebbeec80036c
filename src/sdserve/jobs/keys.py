"""API keys: created once and shown once, stored as sha256 hashes, revocable."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select

from sdserve.jobs.db import ApiKey
from sdserve.jobs.store import ADMIN_OWNER, JobStore

_CACHE_TTL_SECONDS = 2.0
_CACHE_MAX = 10_000


@dataclass(frozen=True)
class Principal:
    """Who is calling: `owner` scopes jobs and files; the admin key is the enterprise key."""

    owner: str
    is_admin: bool
    queue_limit: int | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, store: JobStore, admin_key: str | None, default_queue_limit: int):
        self._store = store
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._default_limit = default_queue_limit
        # digest -> (principal or None, expiry): keeps the database off the hot path of every
        # request; a revocation (possibly from another process) takes effect within the TTL.
        self._cache: dict[str, tuple[Principal | None, float]] = {}

    def create(self, label: str = "", queue_limit: int | None = None) -> str:
        key = secrets.token_urlsafe(30)
        with self._store.session(write=True) as s:
            s.add(
                ApiKey(
                    key_hash=hash_key(key),
                    prefix=key[:8],
                    label=label,
                    queue_limit=queue_limit,
                    created_at=time.time(),
                )
            )
        return key

    def list(self) -> list[dict]:
        with self._store.session() as s:
            return [
                {
                    "prefix": k.prefix,
                    "label": k.label,
                    "queue_limit": k.queue_limit,
                    "created_at": k.created_at,
                    "revoked": k.revoked_at is not None,
                }
                for k in s.scalars(select(ApiKey).order_by(ApiKey.id))
            ]

    def revoke(self, key_or_prefix: str) -> bool:
        with self._store.session(write=True) as s:
            row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key_or_prefix)))
            if row is None:
                matches = s.scalars(select(ApiKey).where(ApiKey.prefix == key_or_prefix)).all()
                row = matches[0] if len(matches) == 1 else None
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = time.time()
            return True

    def count(self) -> int:
        with self._store.session() as s:
            return len(s.scalars(select(ApiKey.id)).all())

    def authenticate(self, key: str | None) -> Principal | None:
        if not key:
            return None
        digest = hash_key(key)
        if self._admin_hash and hmac.compare_digest(digest, self._admin_hash):
            return Principal(ADMIN_OWNER, True, None)
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        with self._store.session() as s:
            row = s.scalar(
                select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
            )
            principal = None
            if row is not None:
                limit = row.queue_limit if row.queue_limit is not None else self._default_limit
                principal = Principal(f"key:{row.id}", False, limit)
        if len(self._cache) > _CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (principal, time.monotonic() + _CACHE_TTL_SECONDS)
        return principal

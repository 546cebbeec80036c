"""API keys: created once and shown once, stored as sha256 hashes, revocable."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from sdserve.engine.assets import ADMIN_OWNER
from sdserve.jobs.db import ApiKey, Plan, ServerConfig
from sdserve.jobs.store import JobStore

_CACHE_TTL_SECONDS = 2.0
_CACHE_MAX = 10_000
# Letters and digits only: a key never starts with `-` (which a shell command line would read as
# an option) and is selected whole by a double click. 40 of 62 symbols: 238 bits.
_KEY_ALPHABET = string.ascii_letters + string.digits
_KEY_LENGTH = 40
# The server_config row holding the sha256 of the admin key made on first start (never the key).
_ADMIN_ROW = "generated_admin_key"


@dataclass(frozen=True)
class Principal:
    """Who is calling: `owner` scopes jobs and files; the admin key is the enterprise key."""

    owner: str
    is_admin: bool
    queue_limit: int | None
    key_id: int | None = None
    plan: str | None = None
    monthly_quota: int | None = None  # requests per calendar month; None: no cap
    model_allowance: int | None = None  # trainings allowed; None: no cap


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key of letters and digits."""
    return "".join(secrets.choice(_KEY_ALPHABET) for _ in range(_KEY_LENGTH))


class KeyRing:
    def __init__(self, store: JobStore, admin_key: str | None, default_queue_limit: int):
        self._store = store
        # SDSERVE_ADMIN_KEY wins; without it, the admin key generated on first start (its hash is
        # in the database, so every server on the same store accepts it) is read when first needed.
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._admin_configured = bool(admin_key)
        self._admin_checked_at = float("-inf")
        self._default_limit = default_queue_limit
        # digest -> (principal or None, expiry): keeps the key's plan lookups off the hot path.
        # A cached key is still checked for revocation on every request (one primary-key read),
        # so a revocation by any process, the CLI included, takes effect at once.
        self._cache: dict[str, tuple[Principal | None, float]] = {}
        mark = "?" if store.engine.dialect.paramstyle == "qmark" else "%s"  # SQLite, psycopg
        self._live_sql = f"SELECT 1 FROM api_keys WHERE id = {mark} AND revoked_at IS NULL"
        self._driver_errors = (SQLAlchemyError, store.engine.dialect.loaded_dbapi.Error)
        self._local = threading.local()

    def create(
        self,
        label: str = "",
        queue_limit: int | None = None,
        plan: str | None = None,
        parent_id: int | None = None,
    ) -> str:
        key = new_key()
        with self._store.session(write=True) as s:
            s.add(
                ApiKey(
                    key_hash=hash_key(key),
                    prefix=key[:8],
                    label=label,
                    queue_limit=queue_limit,
                    plan=plan,
                    parent_id=parent_id,
                    created_at=time.time(),
                )
            )
        return key

    def forget_cached(self) -> None:
        """Drop cached principals (after a plan or key change made in this process)."""
        self._cache.clear()

    def list(self) -> list[dict]:
        with self._store.session() as s:
            return [
                {
                    "id": k.id,
                    "prefix": k.prefix,
                    "label": k.label,
                    "queue_limit": k.queue_limit,
                    "plan": k.plan,
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

    def revoke_id(self, key_id: int) -> bool:
        with self._store.session(write=True) as s:
            row = s.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = time.time()
        self._cache.clear()
        return True

    def set_key_plan(self, key_id: int, plan: str | None) -> bool:
        """Put a key on a plan (None: no plan); False if there is no such live key."""
        with self._store.session(write=True) as s:
            row = s.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.plan = plan
        self._cache.clear()
        return True

    def has_admin_key(self) -> bool:
        """Whether there is an admin key: SDSERVE_ADMIN_KEY, or one generated earlier."""
        return self._admin_configured or self._generated_admin_hash() is not None

    def create_admin(self) -> str | None:
        """Generate the admin key (SDSERVE_ADMIN_KEY unset); None if one exists already.

        Only its hash is stored. A generated admin key is never replaced: clients may hold it.
        """
        key = new_key()
        with self._store.session(write=True) as s:
            row = s.get(ServerConfig, _ADMIN_ROW)
            if row is not None:
                return None
            value = {"sha256": hash_key(key)}
            s.add(ServerConfig(name=_ADMIN_ROW, value=value, updated_at=time.time()))
        self._admin_hash = hash_key(key)
        return key

    def _generated_admin_hash(self) -> str | None:
        if self._admin_configured:
            return None
        now = time.monotonic()
        # Found once, it never changes; until found, look again at most every cache TTL.
        if self._admin_hash is None and now - self._admin_checked_at > _CACHE_TTL_SECONDS:
            self._admin_checked_at = now
            with self._store.session() as s:
                row = s.get(ServerConfig, _ADMIN_ROW)
                if row is not None:
                    self._admin_hash = row.value.get("sha256")
        return self._admin_hash

    def count(self) -> int:
        with self._store.session() as s:
            return len(s.scalars(select(ApiKey.id)).all())

    def authenticate(self, key: str | None) -> Principal | None:
        if not key:
            return None
        digest = hash_key(key)
        admin_hash = self._admin_hash if self._admin_configured else self._generated_admin_hash()
        if admin_hash and hmac.compare_digest(digest, admin_hash):
            return Principal(ADMIN_OWNER, True, None)
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            principal = cached[0]
            if principal is None or self._not_revoked(principal.key_id):
                return principal
            self._cache.pop(digest, None)
            return None
        with self._store.session() as s:
            row = s.scalar(
                select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
            )
            principal = None
            if row is not None:
                plan = s.get(Plan, row.plan) if row.plan else None
                limit = row.queue_limit
                if limit is None and plan is not None:
                    limit = plan.queue_limit
                principal = Principal(
                    f"key:{row.id}",
                    False,
                    limit if limit is not None else self._default_limit,
                    key_id=row.id,
                    plan=row.plan,
                    monthly_quota=plan.requests_per_month if plan else None,
                    model_allowance=plan.included_models + row.purchased_models if plan else None,
                )
        if len(self._cache) > _CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (principal, time.monotonic() + _CACHE_TTL_SECONDS)
        return principal

    def _not_revoked(self, key_id: int | None) -> bool:
        try:
            cursor = self._check_connection().cursor()
            try:
                cursor.execute(self._live_sql, (key_id,))
                return cursor.fetchone() is not None
            finally:
                cursor.close()
        except self._driver_errors:
            self._drop_check_connection()  # reconnect on the next request
            # Revoking writes this database, so while it is unreachable nothing was revoked
            # since the key was cached: keep serving it (finished-job fetches need no database).
            return True

    def _check_connection(self):
        """This thread's own driver connection in autocommit mode: one round trip per check,
        none of the pool's checkout, BEGIN or ROLLBACK (0.09 ms on SQLite, 0.25 on PostgreSQL).
        Requests authenticate on the event loop's thread, so a process holds one or two."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            dialect = self._store.engine.dialect
            cargs, cparams = dialect.create_connect_args(self._store.engine.url)
            connection = dialect.connect(*cargs, **cparams)
            if self._store.is_sqlite:
                connection.isolation_level = None
            else:
                connection.autocommit = True
            self._local.connection = connection
        return connection

    def _drop_check_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            try:
                connection.close()
            except self._driver_errors:
                pass

    # ---- plans -----------------------------------------------------------------------------

    def set_plan(
        self,
        name: str,
        requests_per_month: int | None,
        queue_limit: int | None,
        included_models: int = 0,
        self_service: bool = False,
    ) -> dict:
        with self._store.session(write=True) as s:
            plan = s.get(Plan, name)
            if plan is None:
                plan = Plan(name=name)
                s.add(plan)
            plan.requests_per_month = requests_per_month
            plan.queue_limit = queue_limit
            plan.included_models = included_models
            plan.self_service = self_service
            s.flush()
            result = _plan_dict(plan)
        self._cache.clear()
        return result

    def plans(self) -> list[dict]:
        with self._store.session() as s:
            return [_plan_dict(p) for p in s.scalars(select(Plan).order_by(Plan.name))]

    def plan(self, name: str) -> dict | None:
        with self._store.session() as s:
            plan = s.get(Plan, name)
            return None if plan is None else _plan_dict(plan)

    def subscribe(self, plan: str, parent_id: int | None) -> str:
        """A new key on `plan`, bought by the key `parent_id` (None: by the admin)."""
        return self.create(label=f"{plan} subscription", plan=plan, parent_id=parent_id)

    def cancel(self, key_to_cancel: str, caller: Principal) -> bool:
        """Revoke a key: the admin may revoke any, a key itself and the keys it bought."""
        with self._store.session(write=True) as s:
            row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key_to_cancel)))
            if row is None or row.revoked_at is not None:
                return False
            if not caller.is_admin and caller.key_id not in (row.id, row.parent_id):
                return False
            row.revoked_at = time.time()
        self._cache.clear()
        return True

    def add_purchased_models(self, key_id: int, quantity: int) -> int:
        with self._store.session(write=True) as s:
            row = s.get(ApiKey, key_id)
            row.purchased_models += quantity
            total = row.purchased_models
        self._cache.clear()
        return total


def _plan_dict(plan: Plan) -> dict:
    return {
        "name": plan.name,
        "requests_per_month": plan.requests_per_month,
        "queue_limit": plan.queue_limit,
        "included_models": plan.included_models,
        "self_service": plan.self_service,
    }

"""Orders from the API to every worker (through the `broadcasts` table) and what workers advertise."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete, func, select

from sdserve.jobs.db import Broadcast, WorkerRecord
from sdserve.jobs.store import JobStore

# clear_cache | evict <model_id> | storage (re-read storage config) | restart (drain and re-exec)
# | drain <worker_id> (finish the batch in hand, claim nothing more) | resume <worker_id>
COMMANDS = ("clear_cache", "evict", "storage", "restart", "drain", "resume")
_KEEP_SECONDS = 24 * 3600


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    hostname: str
    device: str
    gpu_name: str | None
    gpu_memory_mb: int | None
    resident: list
    state: str
    last_seen: float
    model_loads: int = 0
    seconds_per_unit: float | None = None  # measured when it started (engine.speed_probe)


class ControlChannel:
    def __init__(self, store: JobStore):
        self._store = store

    def publish(self, command: str, argument: str = "") -> None:
        assert command in COMMANDS
        now = time.time()
        with self._store.session(write=True) as s:
            s.add(Broadcast(command=command, argument=argument, created_at=now))
            s.execute(delete(Broadcast).where(Broadcast.created_at < now - _KEEP_SECONDS))

    def latest_id(self) -> int:
        with self._store.session() as s:
            return s.scalar(select(func.coalesce(func.max(Broadcast.id), 0)))

    def since(self, after_id: int) -> list[tuple[int, str, str]]:
        with self._store.session() as s:
            rows = s.execute(
                select(Broadcast.id, Broadcast.command, Broadcast.argument)
                .where(Broadcast.id > after_id)
                .order_by(Broadcast.id)
            ).all()
            return [tuple(row) for row in rows]

    # ---- worker records --------------------------------------------------------------------

    def advertise(self, info: WorkerInfo) -> None:
        with self._store.session(write=True) as s:
            row = s.get(WorkerRecord, info.worker_id)
            fields = {name: getattr(info, name) for name in WorkerInfo.__dataclass_fields__}
            if row is None:
                s.add(WorkerRecord(**fields))
            else:
                for name, value in fields.items():
                    setattr(row, name, value)

    def retire(self, worker_id: str) -> None:
        with self._store.session(write=True) as s:
            s.execute(delete(WorkerRecord).where(WorkerRecord.worker_id == worker_id))

    def workers(self, seen_within: float = 120.0) -> list[WorkerInfo]:
        with self._store.session() as s:
            rows = s.scalars(
                select(WorkerRecord)
                .where(WorkerRecord.last_seen >= time.time() - seen_within)
                .order_by(WorkerRecord.worker_id)
            )
            return [
                WorkerInfo(**{name: getattr(row, name) for name in WorkerInfo.__dataclass_fields__})
                for row in rows
            ]

"""The objects a running server shares between its routes, its worker and its webhook thread."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from sdserve.engine.registry import ModelRegistry
from sdserve.jobs.keys import KeyRing
from sdserve.jobs.notify import CompletionBus
from sdserve.jobs.store import JobStore
from sdserve.settings import Settings
from sdserve.storage.local import LocalStorage


@dataclass
class ServerState:
    settings: Settings
    store: JobStore
    keys: KeyRing
    registry: ModelRegistry
    storage: LocalStorage
    bus: CompletionBus


def get_state(request: Request) -> ServerState:
    return request.app.state.sdserve

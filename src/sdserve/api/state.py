"""The objects a running server shares between its routes, its worker and its webhook thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from sdserve.engine.registry import ModelRegistry
from sdserve.jobs.catalogue import ModelCatalogue
from sdserve.jobs.control import ControlChannel
from sdserve.jobs.keys import KeyRing
from sdserve.jobs.notify import CompletionBus
from sdserve.jobs.store import JobStore
from sdserve.settings import Settings
from sdserve.storage.router import StorageRouter


@dataclass
class ServerState:
    settings: Settings
    store: JobStore
    keys: KeyRing
    catalogue: ModelCatalogue
    control: ControlChannel
    registry: ModelRegistry
    storage: StorageRouter
    bus: CompletionBus
    # Set by `sdserve serve`: stops the HTTP server; with restart=True the process re-executes.
    request_shutdown: Callable[[bool], None] | None = None
    shutting_down: threading.Event = field(default_factory=threading.Event)

    def output_url(self, key: str) -> str:
        return self.storage.url(key, self.settings.base_url)


def get_state(request: Request) -> ServerState:
    return request.app.state.sdserve

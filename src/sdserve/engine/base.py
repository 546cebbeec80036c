"""The engine protocol: what a worker hands an engine (jobs of the kinds it runs) and gets back.

An engine knows nothing of HTTP, the job store or storage keys. The worker gives it a batch of
jobs (their stored parameters, their inputs and the callbacks it may use) and stores what it
returns: per job, the finished files or the error that failed it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from PIL import Image

from sdserve.engine import acceleration
from sdserve.engine.registry import ModelRegistry, ResidencyCache
from sdserve.settings import Settings

StepCallback = Callable[[int, int], None]  # (steps done, steps in this run)


class JobEvents(Protocol):
    """What a running job may tell the worker, or ask it."""

    def step(self, done: int, total: int) -> None: ...

    def stage(self, name: str, line: str) -> None:
        """A named stage with a readable line (trainings report `training_started` ...)."""

    def cancelled(self) -> bool: ...

    def partial(self, data: dict) -> None:
        """What the job has made so far, cumulative (a chat's text pieces), for streamed
        answers; writes may be dropped between two calls, never the last result."""

    def broadcast(self, command: str, argument: str = "") -> None:
        """Ask every worker to do `command` (e.g. `clear_cache` after a model was replaced)."""


class JobInputs(Protocol):
    """A job's stored input files, read when the engine asks for them."""

    def names(self) -> list[str]: ...

    def read(self, name: str) -> bytes: ...


@dataclass
class EngineJob:
    id: int
    kind: str
    model_id: str
    params: dict  # what the family's schema stored; the engine validates it into its own type
    inputs: JobInputs
    events: JobEvents

    def image(self, name: str) -> Image.Image | None:
        """An input image as RGB, or None when the job has no input of that name."""
        if name not in self.inputs.names():
            return None
        return Image.open(io.BytesIO(self.inputs.read(name))).convert("RGB")


@dataclass
class OutputFile:
    data: bytes  # already encoded (PNG, MP4, GLB, ...)
    nsfw: bool = False


@dataclass
class EngineOutput:
    """One finished job: its files in the order of the job's output names, stage timings in
    seconds (plus `batch_size`), and meta the engine adds to the family's echo."""

    files: list[OutputFile]
    stages: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass
class Measured:
    """A run outside the queue (a warm-up), timed as a job is: the worker records its speed, which
    prices the first jobs' eta (jobs.eta) before any of them has run."""

    model_id: str
    kind: str
    batch_key: str
    cost: float
    total_steps: int
    seconds: float  # all a warm run took, its output encoded
    model_load: float  # what a cold run took more: the load and one-time costs


class Engine(Protocol):
    """Runs jobs of `kinds`; `run_batch` gets jobs with one batch key and answers each one."""

    kinds: tuple[str, ...]

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]: ...


@dataclass
class Runtime:
    """What every engine of one worker shares: one device, one model registry, one memory budget."""

    settings: Settings
    registry: ModelRegistry
    device: torch.device
    dtype: torch.dtype
    cache: ResidencyCache

    @classmethod
    def create(cls, settings: Settings, registry: ModelRegistry) -> Runtime:
        device = pick_device(settings.device)
        acceleration.configure_compile_cache(settings)
        return cls(
            settings=settings,
            registry=registry,
            device=device,
            dtype=acceleration.pick_dtype(device, settings.gpu_dtype),
            cache=ResidencyCache(settings.residency_budget_mb * 1024 * 1024),
        )

    def pipeline(self, model_id: str):
        """The model's diffusers pipeline, loaded once and kept resident within the budget."""
        source = self.registry.resolve(model_id)

        def load():
            pipe = self.registry.load(source, self.device, self.dtype)
            acceleration.prepare(pipe, self.device, self.settings)
            return pipe

        return self.cache.get(model_id, load)


def one_by_one(
    jobs: list[EngineJob], run: Callable[[EngineJob], EngineOutput]
) -> list[EngineOutput | Exception]:
    """For engines whose jobs never share a run: each job's output, or the error it raised."""
    outcomes: list[EngineOutput | Exception] = []
    for job in jobs:
        try:
            outcomes.append(run(job))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def pick_device(setting: str) -> torch.device:
    if setting != "auto":
        return torch.device(setting)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

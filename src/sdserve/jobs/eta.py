"""The `eta` a waiting job is given: queue wait, a cold worker's model load, and its own run time at
the measured speed of its model (reference §16.2)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# A job's fixed work (encoding, upload, bookkeeping) in work units (one 512x512 step): without it
# a tiny job of almost no units would be promised almost no time.
PER_JOB_UNITS = 1.0
# A denoising step costs at least a quarter of a 512x512 one, however small the image: below
# that a step's time is the model's fixed work, not its pixels (tiny and small images).
STEP_FLOOR_UNITS = 0.25
# Until any model has been measured: a GPU does a 512x512 SD1.5 step in about 0.05-0.1 s, a CPU
# in one to a few seconds. Guessing long errs on the side a client can plan with.
DEFAULT_SECONDS_PER_UNIT = {"gpu": 0.15, "cpu": 3.0}
DEFAULT_LOAD_SECONDS = 10.0  # until any model load has been measured
MIN_LOAD_SECONDS = 0.05  # a "load" shorter than this was a cache hit


@dataclass(frozen=True)
class ModelTiming:
    seconds_per_unit: float | None
    load_seconds: float | None
    batch_size: float | None = None  # jobs per denoising loop, lately


IMAGE_KINDS = ("text2img", "img2img", "inpaint")


def timing_key(model_id: str, kind: str) -> str:
    """Speeds are measured per model and per kind of work: a unit of a video clip (a frame's
    step) and of an image (a sample's step) cost differently on the same model."""
    return model_id if kind in IMAGE_KINDS else f"{model_id}|{kind}"


@dataclass(frozen=True)
class Pending:
    """A job ahead of the one asked about, or running: its model, cost, and the part left."""

    model_id: str
    key: str  # timing_key(model_id, kind)
    cost: float
    left: float = 1.0  # 1 - step / total_steps for a running job
    loading: bool = False  # claimed, no step yet, its model not resident anywhere


def eta_units(cost: float, total_steps: int) -> float:
    """The work units an eta prices a job at (before its fixed PER_JOB_UNITS)."""
    return max(cost, STEP_FLOOR_UNITS * total_steps)


def unit_seconds(generation_time: float, cost: float, batch_size: float) -> float:
    """Seconds per unit measured by one finished job: a batch's jobs share one loop, so each
    job's own share of it is the loop's time over the batch size."""
    return generation_time / max(batch_size, 1.0) / (cost + PER_JOB_UNITS)


class Estimator:
    def __init__(
        self, timings: dict[str, ModelTiming], resident: set[str], workers: int, gpu: bool
    ):
        self.timings = timings
        self.resident = resident
        self.workers = max(workers, 1)
        rates = [t.seconds_per_unit for t in timings.values() if t.seconds_per_unit]
        loads = [t.load_seconds for t in timings.values() if t.load_seconds]
        # An unmeasured model is guessed from the slowest measured one: an early eta errs long.
        default = DEFAULT_SECONDS_PER_UNIT["gpu" if gpu else "cpu"]
        self._rate_fallback = max(rates) if rates else default
        self._load_fallback = max(loads) if loads else DEFAULT_LOAD_SECONDS

    def run_seconds(self, key: str, cost: float) -> float:
        timing = self.timings.get(key)
        rate = timing.seconds_per_unit if timing and timing.seconds_per_unit else None
        return (rate or self._rate_fallback) * (cost + PER_JOB_UNITS)

    def batch_size(self, key: str) -> float:
        timing = self.timings.get(key)
        return (timing.batch_size if timing else None) or 1.0

    def load_seconds(self, model_id: str, key: str) -> float:
        if model_id in self.resident:
            return 0.0
        timing = self.timings.get(key)
        return (timing.load_seconds if timing and timing.load_seconds else None) or (
            self._load_fallback
        )

    def running(self, job: Pending) -> float:
        """What is left of a running job."""
        load = self.load_seconds(job.model_id, job.key) if job.loading else 0.0
        return load + self.run_seconds(job.key, job.cost) * job.left

    def waiting(self, job: Pending, ahead: Iterable[Pending]) -> float:
        """A queued job's eta: the work ahead of it shared over the live workers (each cold model
        among it loaded once), then its own load if no job ahead loads its model, and its run."""
        work, loads = 0.0, set()
        for other in ahead:
            if other.left < 1.0 or other.loading:
                work += self.running(other)
                if other.loading:
                    loads.add(other.key)
                continue
            work += self.run_seconds(other.key, other.cost)
            if other.model_id not in self.resident and other.key not in loads:
                loads.add(other.key)
                work += self.load_seconds(other.model_id, other.key)
        own_load = 0.0 if job.key in loads else self.load_seconds(job.model_id, job.key)
        return work / self.workers + own_load + self.run_seconds(job.key, job.cost)

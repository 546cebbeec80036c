"""The `eta` a waiting job is given: queue wait, a cold worker's model load, and its own run time at
the measured speed of its shape of work, or else of its model (reference §16.2)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

# A job's fixed work (encoding, upload, bookkeeping) in work units (one 512x512 step): without it
# a tiny job of almost no units would be promised almost no time.
PER_JOB_UNITS = 1.0
# A denoising step costs at least a quarter of a 512x512 one, however small the image: below
# that a step's time is the model's fixed work, not its pixels (tiny and small images).
STEP_FLOOR_UNITS = 0.25
# Until any model has been measured, the live workers' speed probe (engine.speed_probe), or
# without one these: a GPU does a 512x512 SD1.5 step in about 0.05-0.1 s, a CPU
# in one to a few seconds. Guessing long errs on the side a client can plan with.
DEFAULT_SECONDS_PER_UNIT = {"gpu": 0.15, "cpu": 3.0}
# `eta` is a time most jobs finish within (reference §16.2 asks 90%), not their mean: measured
# speeds move by a third between runs on a shared machine, and with the batch a job lands in.
# Guesses (the defaults above) err long already and get no margin.
ETA_MARGIN = 1.5
# A shape of work not measured yet is priced at its model's speed measured on other shapes, and an
# unmeasured model at the slowest measured one's speed and load: guesses, with a wider margin. One
# model's seconds per unit differ up to fourfold between shapes (a small image is mostly fixed work).
GUESS_MARGIN = 2.0
# How many jobs a batch waiting for a worker holds by the time it runs, before traffic has
# measured it: in a burst, jobs still arriving join the batches ahead of the first ones.
COLD_BATCH_SIZE = 2.0
# No job is promised less than a second. Below that its time is the server's own latency more
# than its work: a tiny job measured at 0.2 s took 0.6 s while the same process answered a burst
# of submissions around it. A client gains nothing by coming back sooner.
MIN_ETA_SECONDS = 1.0
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


SHAPE_PREFIX = "shape:"
_KEY_LENGTH = 200
_SOLO_PREFIX = "solo|"  # engine.batching.solo_key's (that module imports torch; the store must not)


def shape_key(batch_key: str) -> str | None:
    """Speeds are also measured per shape of work (a batch key: model, kind, size, steps, ...).
    A unit's time differs tenfold between shapes of one model (a small image is mostly fixed
    work, a large one mostly pixels), so one speed per model, which is whichever shape ran last,
    priced every other shape wrong. Jobs that run alone have no shape to share."""
    if batch_key.startswith(_SOLO_PREFIX):
        return None
    key = SHAPE_PREFIX + batch_key
    if len(key) > _KEY_LENGTH:  # the timings' key column holds 200 characters
        key = SHAPE_PREFIX + hashlib.sha256(batch_key.encode()).hexdigest()
    return key


@dataclass(frozen=True)
class Pending:
    """A job ahead of the one asked about, or running: its model, cost, and the part left."""

    model_id: str
    key: str  # timing_key(model_id, kind)
    cost: float
    left: float = 1.0  # 1 - step / total_steps for a running job
    loading: bool = False  # claimed, no step yet, its model not resident anywhere
    shape: str | None = None  # shape_key(batch_key)


def eta_units(cost: float, total_steps: int) -> float:
    """The work units an eta prices a job at (before its fixed PER_JOB_UNITS)."""
    return max(cost, STEP_FLOOR_UNITS * total_steps)


def unit_seconds(generation_time: float, cost: float, batch_size: float) -> float:
    """Seconds per unit measured by one finished job: a batch's jobs share one loop, so each
    job's own share of it is the loop's time over the batch size."""
    return generation_time / max(batch_size, 1.0) / (cost + PER_JOB_UNITS)


class Estimator:
    def __init__(
        self,
        timings: dict[str, ModelTiming],
        resident: set[str],
        workers: int,
        gpu: bool,
        probed: float | None = None,  # seconds per unit, by the slowest worker's speed probe
    ):
        self.timings = timings
        self.resident = resident
        self.workers = max(workers, 1)
        models = [t for key, t in timings.items() if not key.startswith(SHAPE_PREFIX)]
        rates = [t.seconds_per_unit for t in models if t.seconds_per_unit]
        loads = [t.load_seconds for t in models if t.load_seconds]
        # An unmeasured model is guessed from the slowest measured one: an early eta errs long.
        default = DEFAULT_SECONDS_PER_UNIT["gpu" if gpu else "cpu"]
        if probed:
            # A GPU's probe is mostly launch overhead, far under a real model's step: there the
            # probe can only lengthen the built-in guess (a slow card), never shorten it.
            default = max(probed, default) if gpu else probed
        self._rate_fallback = max(rates) * GUESS_MARGIN if rates else default
        # A load not measured yet is guessed at the same pace as the rest: a machine the probe
        # finds ten times as fast as the built-in guess (tiny models on an idle CPU) loads faster too.
        built_in = DEFAULT_SECONDS_PER_UNIT["gpu" if gpu else "cpu"]
        self._load_fallback = (
            max(loads) * GUESS_MARGIN if loads else DEFAULT_LOAD_SECONDS * default / built_in
        )

    def _measured(self, job: Pending, field: str) -> float | None:
        """`field` of the job's shape if that was measured, else of its model."""
        for key in (job.shape, job.key):
            value = getattr(self.timings.get(key or ""), field, None)
            if value:
                return value
        return None

    def run_seconds(self, job: Pending) -> float:
        shape = self.timings.get(job.shape or "")
        if shape is not None and shape.seconds_per_unit:
            rate = shape.seconds_per_unit * ETA_MARGIN
        else:  # a shape not measured yet: its model's speed, measured on others, is a guess
            model = self.timings.get(job.key)
            measured = model.seconds_per_unit if model is not None else None
            rate = measured * GUESS_MARGIN if measured else self._rate_fallback
        return rate * (job.cost + PER_JOB_UNITS)

    def batch_size(self, job: Pending) -> float:
        """How many jobs its batches have lately held, or before jobs have measured that,
        COLD_BATCH_SIZE."""
        return self._measured(job, "batch_size") or COLD_BATCH_SIZE

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
        return load + self.run_seconds(job) * job.left

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
            work += self.run_seconds(other)
            if other.model_id not in self.resident and other.key not in loads:
                loads.add(other.key)
                work += self.load_seconds(other.model_id, other.key)
        own_load = 0.0 if job.key in loads else self.load_seconds(job.model_id, job.key)
        return work / self.workers + own_load + self.run_seconds(job)

"""A worker's speed, measured when it starts and every minute it is idle: a small fixed workload
shaped like a denoising step's (a 3x3 convolution and an attention product on a 64x64 latent),
timed on the worker's device and dtype, on one thread. Until a model has been measured, `eta`
prices work (and model loads) at this speed (reference §16.2). A worker's warm-up measures a real
model, which it replaces (jobs.worker.Worker._warm_up): the probe prices a worker with none."""

from __future__ import annotations

import statistics
import time

import torch

# Seconds of a work unit (one 512x512 step) per second of probe, set by hand on the shared
# 2-core machine: the probe takes about 12 ms on an idle core (0.9 s a unit), and the tiny models
# ran a cold burst at 0.15 to 1 s a unit, whatever else the machine ran. A bound, as etas are.
# Once a model has run, its measured speed replaces this guess.
UNIT_SECONDS_PER_PROBE_SECOND = 75.0
_WARM_UP = 2  # runs that build the kernels and wake the thread pool, not timed
_REPEATS = 5  # the median of a few runs, so one preempted run does not set the speed


def _workload(x: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    y = torch.nn.functional.conv2d(x, weight, padding=1)
    attention = (tokens @ tokens.T).softmax(-1) @ tokens
    return y.sum() + attention.sum()


def seconds_per_unit(device: torch.device, dtype: torch.dtype) -> float:
    """This machine's guessed seconds per work unit (well under half a second to measure)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 64, 64, generator=generator).to(device, dtype)
    weight = torch.randn(64, 64, 3, 3, generator=generator).to(device, dtype)
    tokens = torch.randn(1024, 64, generator=generator).to(device, dtype)
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core's speed: a pool waiting on a busy core's thread is noise
    try:
        with torch.inference_mode():
            for _ in range(_WARM_UP + _REPEATS):
                start = time.perf_counter()
                _workload(x, weight, tokens).item()  # .item() waits for an asynchronous device
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times[_WARM_UP:]) * UNIT_SECONDS_PER_PROBE_SECOND

"""Cross-request batching, all of it: batch keys and cost, the claim window and caps, grouping
jobs by prompt-embedding shape, per-sample guidance, and splitting a batch that runs out of memory.

Families say *what* must match for jobs to share a loop (`batch_key`) and how much work a job is
(`cost`); this module decides everything else, the same way for every family.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from sdserve.engine.prompts import encode_prompts
from sdserve.engine.registry import free_device_memory
from sdserve.errors import EngineError, SdserveError
from sdserve.settings import Settings

log = logging.getLogger(__name__)
_SOLO = "solo|"
_REFERENCE_PIXELS = 512 * 512


def batch_key(kind: str, *fields: Any) -> str:
    """Jobs with equal keys can share one run: same kind and equal `fields`."""
    return "|".join(map(str, (kind, *fields)))


def solo_key(kind: str, unique: str) -> str:
    """A key no other job has: the job runs alone (and gets no batch window)."""
    return f"{_SOLO}{kind}|{unique}"


def cost(count: int, steps: int, width: int, height: int) -> float:
    """Work units: one unit is one step of one 512x512 sample (or frame)."""
    return count * steps * (width * height) / _REFERENCE_PIXELS


class Claim(Protocol):
    def __call__(
        self, *, max_size: int, max_cost: float, batch_key: str | None = None
    ) -> list[Any]: ...


def claim_batch(claim: Claim, settings: Settings) -> list[Any]:
    """A batch within the size and cost caps: the oldest claimable job and compatible ones. With
    a batch window, jobs of the same key arriving right after get the chance to join."""
    batch = claim(max_size=settings.max_batch_size, max_cost=settings.max_batch_cost)
    if (
        not batch
        or settings.batch_window_ms <= 0
        or batch[0].batch_key.startswith(_SOLO)
        or len(batch) >= settings.max_batch_size
    ):
        return batch
    time.sleep(settings.batch_window_ms / 1000)
    return batch + claim(
        max_size=settings.max_batch_size - len(batch),
        max_cost=settings.max_batch_cost - sum(job.cost for job in batch),
        batch_key=batch[0].batch_key,
    )


Group = list[tuple[int, dict[str, torch.Tensor]]]  # (index into the batch, prompt embeddings)


def encode_in_groups(
    pipe, prompts: Sequence[tuple[list[str], list[str], int | None]], results: list
) -> list[Group]:
    """Each job's (prompts, negative prompts, clip skip) encoded (A1111 weighting, no 77-token
    limit), then grouped by embedding shape: long prompts make longer embeddings, and each group
    is one loop. A job whose prompt cannot be encoded gets its error in `results`, left out."""
    groups: dict[tuple, Group] = {}
    for index, (positive, negative, clip_skip) in enumerate(prompts):
        try:
            embeds = encode_prompts(pipe, positive, negative, clip_skip)
        except Exception as exc:
            results[index] = EngineError(f"Prompt could not be encoded: {exc}")
            continue
        shape = tuple(tuple(t.shape[1:]) for t in embeds.values())
        groups.setdefault(shape, []).append((index, embeds))
    return list(groups.values())


def split_on_oom(
    group: list, run: Callable[[list], None], results: list, unit: str = "samples"
) -> None:
    """`run(group)` as one batch. When the GPU runs out of memory, free it and run each half on
    its own, down to single jobs, whose error suggests fewer `unit`. Any other failure fails the
    group's jobs (in `results`). Group items are (index into results, anything)."""
    try:
        run(group)
        return
    except torch.cuda.OutOfMemoryError:
        free_device_memory()
        if len(group) > 1:
            log.warning("out of memory with a batch of %d jobs: splitting it", len(group))
            half = len(group) // 2
            split_on_oom(group[:half], run, results, unit)
            split_on_oom(group[half:], run, results, unit)
            return
        error = EngineError(f"Out of GPU memory: try a smaller size or fewer {unit}")
    except SdserveError as exc:
        error = exc
    except Exception as exc:
        error = EngineError(f"Generation failed: {exc}")
    for index, _ in group:
        results[index] = error


def per_sample_guidance(unet: torch.nn.Module, scales: list[float]):
    """Classifier-free guidance with a scale per sample, inside diffusers' own pipelines.

    The pipeline computes uncond + g * (text - uncond) with one g: the largest scale. This hook
    rescales each sample's (text - uncond) by its own scale / g on the UNet's output first, so the
    result is uncond + scale_i * (text - uncond) for every sample. Returns the hook handle, or
    None when every sample has the same scale.
    """
    if len(set(scales)) <= 1 or max(scales) <= 1:
        return None
    ratio = torch.tensor(scales, dtype=torch.float32) / max(scales)

    def hook(_module, _args, _kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        uncond, text = sample.chunk(2)  # diffusers puts the unconditional half first
        shape = (-1,) + (1,) * (sample.ndim - 1)
        weights = ratio.to(device=sample.device, dtype=sample.dtype).view(shape)
        sample = torch.cat([uncond, uncond + weights * (text - uncond)])
        if isinstance(output, tuple):
            return (sample, *output[1:])
        output.sample = sample
        return output

    return unet.register_forward_hook(hook, with_kwargs=True)


def step_reporters(callbacks: Sequence[Callable[[int, int], None]], marks: list[float] | None = None):
    """One diffusers `callback_on_step_end` that reports (steps done, steps in this run) to each
    job of a batch; `marks` gets the time of every step end (the last is where decoding starts)."""

    def callback(pipe, step_index, _timestep, callback_kwargs):
        if marks is not None:
            marks.append(time.perf_counter())
        total = getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps)
        for on_step in callbacks:
            on_step(step_index + 1, total)
        return callback_kwargs

    return callback

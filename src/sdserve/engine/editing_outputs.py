"""What the image-mixing engines (blip_diffusion, magic_mix, img_mixer, mixture_canvas) share:
per-sample generators, step reports from a UNet hook, and finished images as output files with
the NSFW check the request asked for."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from sdserve.engine.adapters import apply_loras
from sdserve.engine.base import EngineOutput, OutputFile, Runtime
from sdserve.engine.safety import NsfwChecker, replace_nsfw
from sdserve.errors import EngineError, SdserveError
from sdserve.media.images import encode_png


def generators(seed: int, samples: int) -> list[torch.Generator]:
    """Sample i draws from seed + i, as the image endpoints do: a sample is the same alone or
    in a batch of several."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(samples)]


@contextlib.contextmanager
def unet_steps(unet: torch.nn.Module, total: int, on_step: Callable[[int, int], None]) -> Iterator:
    """Report a step each time `unet` runs, for pipelines that take no step callback (one UNet
    call per step: classifier-free guidance runs both halves in one batch)."""
    calls = 0

    def hook(_module, _args, _output):
        nonlocal calls
        calls += 1
        on_step(min(calls, total), total)

    handle = unet.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def output_files(
    images: list[Image.Image], checker: NsfwChecker | None, replacement: str
) -> list[OutputFile]:
    """PNG files; with a checker, flagged images are replaced as `safety_checker_type` says."""
    files = []
    for image in images:
        flagged = checker is not None and checker.is_nsfw(image)
        shown = replace_nsfw(image, replacement) if flagged else image
        files.append(OutputFile(encode_png(shown), nsfw=flagged))
    return files


def generate_on_sd_model(
    runtime: Runtime,
    model_id: str,
    generate: Callable[[object], list[Image.Image]],
    nsfw: NsfwChecker | None,
    nsfw_type: str,
    out_of_memory: str,
) -> EngineOutput:
    """One job of a verb reimplemented on an SD model's own components (magic_mix,
    mixture_canvas): the resident model with no LoRA another job left active, `generate(pipe)`,
    its errors told apart, the NSFW check, and the stage timings. `out_of_memory` says what to
    make smaller."""
    started = time.perf_counter()
    pipe = runtime.pipeline(model_id)
    apply_loras(pipe, [], runtime.registry)  # none another job left active
    loaded = time.perf_counter()
    try:
        images = generate(pipe)
    except SdserveError:
        raise
    except torch.cuda.OutOfMemoryError as exc:
        raise EngineError(f"Out of GPU memory: {out_of_memory}") from exc
    except Exception as exc:
        raise EngineError(f"Generation failed: {exc}") from exc
    done = time.perf_counter()
    files = output_files(images, nsfw, nsfw_type)
    stages = {"model_load": loaded - started, "denoise": done - loaded, "batch_size": 1}
    return EngineOutput(files, stages)

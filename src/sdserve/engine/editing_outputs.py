"""What the image-mixing engines (blip_diffusion, magic_mix, img_mixer, mixture_canvas) share:
per-sample generators, step reports from a UNet hook, and finished images as output files with
the NSFW check the request asked for."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from sdserve.engine.base import OutputFile
from sdserve.engine.safety import NsfwChecker, replace_nsfw
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

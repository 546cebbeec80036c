"""An engine with no model (`SDSERVE_ENGINE=noop`): for queue benchmarks and fault tests.

It answers image jobs with flat images of the requested size, coloured by the seed, after
`SDSERVE_NOOP_SECONDS`; everything around it (queue, storage, webhooks) is the real thing.
"""

from __future__ import annotations

import time

import torch
from PIL import Image

from sdserve.engine.images import BatchItem, ImageEngine, ImageResult, StepCallback
from sdserve.engine.registry import ModelRegistry, ResidencyCache
from sdserve.schemas.images import GenerationParams
from sdserve.settings import Settings


class NoopEngine:
    def __init__(self, settings: Settings, registry: ModelRegistry):
        self.settings = settings
        self.registry = registry
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.cache = ResidencyCache(0)

    def pipeline(self, model_id: str) -> None:
        self.registry.resolve(model_id)

    def generate(
        self,
        p: GenerationParams,
        init_image: Image.Image | None,
        mask_image: Image.Image | None,
        on_step: StepCallback | None = None,
    ) -> ImageResult:
        started = time.perf_counter()
        if self.settings.noop_seconds:
            time.sleep(self.settings.noop_seconds)
        if on_step is not None:
            on_step(p.steps, p.steps)
        images = [
            Image.new("RGB", (p.width, p.height), _color(p.seed + i)) for i in range(p.samples)
        ]
        return ImageResult(images, [False] * len(images), "noop", time.perf_counter() - started)

    def generate_batch(self, items: list[BatchItem]) -> list[ImageResult]:
        results = [self.generate(i.params, i.init, i.mask, i.on_step) for i in items]
        for result in results:
            result.stages = {"denoise": result.pipeline_seconds, "batch_size": len(items)}
        return results


def _color(seed: int) -> tuple[int, int, int]:
    return (seed * 97 % 256, seed * 57 % 256, seed * 31 % 256)


def build_engine(settings: Settings, registry: ModelRegistry) -> ImageEngine | NoopEngine:
    if settings.engine == "noop":
        return NoopEngine(settings, registry)
    return ImageEngine(settings, registry)

"""Depth to image: a new image with the depth layout of the input, with diffusers'
`StableDiffusionDepth2ImgPipeline`. The model's own estimator (DPT / MiDaS) measures the input's
depth, or the client sends a depth map (white: near), which is used instead.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from sdserve.engine import editing_models
from sdserve.engine.base import EngineJob, EngineOutput, OutputFile, Runtime, one_by_one
from sdserve.engine.editing_models import Progress, Screening, generators
from sdserve.media.images import encode_png


class Depth2ImgParams(BaseModel):
    """What a depth2img job asks of the engine (stored on the job)."""

    model_config = ConfigDict(extra="ignore")

    model_id: str
    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float
    seed: int
    samples: int = 1
    safety_checker: bool = False
    safety_checker_type: str = "sensitive_content_text"


def depth_tensor(depth: Image.Image, width: int, height: int) -> torch.Tensor:
    """A depth map image as the pipeline's `depth_map`: (1, H, W), larger values nearer."""
    gray = depth.convert("L").resize((width, height), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None]


class Depth2ImgEngine:
    """depth2img jobs, one at a time: the image fitted to the job's size, then re-imagined."""

    kinds = ("depth2img",)

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.screening = Screening(runtime.settings.nsfw_threshold)

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        return one_by_one(jobs, self._run)

    def _run(self, job: EngineJob) -> EngineOutput:
        p = Depth2ImgParams.model_validate(job.params)
        image = Image.open(io.BytesIO(job.inputs.read("init_image"))).convert("RGB")
        depth = job.image("depth_map")
        # 1. the model
        started = time.perf_counter()
        source = editing_models.resolve(p.model_id, "depth2img", self.runtime.registry, None)
        pipe = editing_models.load(self.runtime, source, "depth2img")
        loaded = time.perf_counter()
        # 2. the image, with the given depth map or the estimator's
        fitted = image.resize((p.width, p.height), Image.Resampling.LANCZOS)
        extra = {}
        if depth is not None:
            extra["depth_map"] = depth_tensor(depth, p.width, p.height).repeat(p.samples, 1, 1)
        progress = Progress(job.events.step, max(1, int(p.steps * p.strength)))
        images = pipe(
            prompt=[p.prompt] * p.samples,
            negative_prompt=[p.negative_prompt] * p.samples if p.negative_prompt else None,
            image=[fitted] * p.samples,
            strength=p.strength,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            generator=generators(p.seed, p.samples),
            callback_on_step_end=progress.callback(),
            **extra,
        ).images
        generated = time.perf_counter()
        # 3. the NSFW check
        shown, flags = self.screening.screen(images, p.safety_checker, p.safety_checker_type)
        files = [OutputFile(encode_png(i), f) for i, f in zip(shown, flags, strict=True)]
        stages = {"model_load": loaded - started, "denoise": generated - loaded, "batch_size": 1}
        meta = {"depth": "given" if depth is not None else "estimated"}
        return EngineOutput(files, stages, meta)

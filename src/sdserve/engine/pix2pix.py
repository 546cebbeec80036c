"""Instruct pix2pix ("image guided editing"): an image edited as a written instruction says, with
diffusers' `StableDiffusionInstructPix2PixPipeline` (or its SDXL twin, when the model is one).

Each step runs the UNet on three inputs (instruction + image, image alone, neither), so
`image_guidance_scale` weighs how closely the result keeps to the image and `guidance_scale` how
strongly it follows the instruction.
"""

from __future__ import annotations

import io
import time

from PIL import Image
from pydantic import BaseModel, ConfigDict

from sdserve.engine import editing_models
from sdserve.engine.base import EngineJob, EngineOutput, OutputFile, Runtime, one_by_one
from sdserve.engine.editing_models import Progress, Screening, generators
from sdserve.media.images import encode_png


class Pix2PixParams(BaseModel):
    """What a pix2pix job asks of the engine (stored on the job)."""

    model_config = ConfigDict(extra="ignore")

    model_id: str
    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    steps: int
    guidance_scale: float
    image_guidance_scale: float
    seed: int
    samples: int = 1
    safety_checker: bool = False
    safety_checker_type: str = "sensitive_content_text"


class Pix2PixEngine:
    """pix2pix jobs, one at a time: the image fitted to the job's size, then edited."""

    kinds = ("pix2pix",)

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.screening = Screening(runtime.settings.nsfw_threshold)

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        return one_by_one(jobs, self._run)

    def _run(self, job: EngineJob) -> EngineOutput:
        p = Pix2PixParams.model_validate(job.params)
        image = Image.open(io.BytesIO(job.inputs.read("init_image"))).convert("RGB")
        # 1. the model
        started = time.perf_counter()
        source = editing_models.resolve(p.model_id, "pix2pix", self.runtime.registry, None)
        pipe = editing_models.load(self.runtime, source, "pix2pix")
        loaded = time.perf_counter()
        # 2. the edit: every sample in one call, sample i seeded seed + i
        fitted = image.resize((p.width, p.height), Image.Resampling.LANCZOS)
        progress = Progress(job.events.step, p.steps)
        images = pipe(
            prompt=[p.prompt] * p.samples,
            negative_prompt=[p.negative_prompt] * p.samples if p.negative_prompt else None,
            image=[fitted] * p.samples,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            image_guidance_scale=p.image_guidance_scale,
            generator=generators(p.seed, p.samples),
            callback_on_step_end=progress.callback(),
        ).images
        generated = time.perf_counter()
        # 3. the NSFW check
        shown, flags = self.screening.screen(images, p.safety_checker, p.safety_checker_type)
        files = [OutputFile(encode_png(i), f) for i, f in zip(shown, flags, strict=True)]
        stages = {"model_load": loaded - started, "denoise": generated - loaded, "batch_size": 1}
        return EngineOutput(files, stages)

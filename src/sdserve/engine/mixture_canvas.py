"""Mixture of Diffusers (Jiménez 2023) as ModelsLab's mixture canvas uses it, reimplemented on any SD
model's components (diffusers has it only as a community pipeline): one text region over the
whole canvas and one image region, rows `pos_y1..pos_y2` and columns `pos_x1..pos_x2`.

`strength` is read as img2img reads it: the image region follows the source image (noised to
the current step) for the first `1 - strength` of the steps, then the prompt takes over. At 0
the region keeps the source; at 1 it is generated like the rest of the canvas.
"""

from __future__ import annotations

import threading

import torch
from diffusers import DDIMScheduler
from pydantic import BaseModel, ConfigDict

from sdserve.engine import batching, latent_steps
from sdserve.engine.base import EngineJob, EngineOutput, Runtime, one_by_one
from sdserve.engine.editing_outputs import generate_on_sd_model
from sdserve.engine.safety import NsfwChecker

LATENT_FACTOR = 8  # pixels per latent cell; region edges are multiples of it


class MixtureCanvasParams(BaseModel):
    """What a mixture_canvas job asks of the engine (stored on the job)."""

    model_config = ConfigDict(extra="ignore")

    model_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    strength: float
    pos_x1: int
    pos_x2: int
    pos_y1: int
    pos_y2: int
    mix_factor: float = 0.5  # accepted and echoed: the canvas has no counterpart (notes §11)
    safety_checker: bool = False
    safety_checker_type: str = "sensitive_content_text"

    @property
    def cost(self) -> float:
        return batching.cost(1, self.steps, self.width, self.height)


def steps_following_source(steps: int, strength: float) -> int:
    """How many of the first steps the image region is reset to the noised source."""
    return steps - int(round(steps * strength))


@torch.no_grad()
def mixture_canvas(pipe, p: MixtureCanvasParams, image, on_step=None):
    """The canvas (one PIL image) from `pipe`'s UNet, VAE and text encoder(s)."""
    # 1. the text region's conditioning (it covers the whole canvas) and the initial noise
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(p.steps, device=pipe.device)
    cond = latent_steps.conditioning(
        pipe, p.prompt, p.negative_prompt, 1, p.width, p.height, p.guidance_scale
    )
    shape = (pipe.unet.config.in_channels, p.height // LATENT_FACTOR, p.width // LATENT_FACTOR)
    noise = latent_steps.initial_noise(shape, p.seed, 1, pipe.device, cond.hidden.dtype)
    latents = noise * scheduler.init_noise_sigma
    # 2. the image region: the source resized to it, in latent space
    rows = slice(p.pos_y1 // LATENT_FACTOR, p.pos_y2 // LATENT_FACTOR)
    cols = slice(p.pos_x1 // LATENT_FACTOR, p.pos_x2 // LATENT_FACTOR)
    source = latent_steps.encode_image(
        pipe.vae, image, p.pos_x2 - p.pos_x1, p.pos_y2 - p.pos_y1
    ).to(latents.dtype)
    region_noise = noise[:, :, rows, cols]
    following = steps_following_source(p.steps, p.strength)
    # 3. denoise the whole canvas; early on, the region is reset to the noised source first
    for i, t in enumerate(scheduler.timesteps):
        if i < following:
            latents[:, :, rows, cols] = scheduler.add_noise(source, region_noise, t.reshape(1))
        noise_pred = latent_steps.predict_noise(pipe.unet, scheduler, latents, t, cond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
        if on_step:
            on_step(i + 1, p.steps)
    latent_steps.check_finite(latents)
    # 4. pixels
    return latent_steps.decode_latents(pipe.vae, latents)


class MixtureCanvasEngine:
    """mixture_canvas jobs, one at a time, on the named SD model."""

    kinds = ("mixture_canvas",)

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._nsfw = NsfwChecker(runtime.settings.nsfw_threshold)
        self._lock = threading.Lock()

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        with self._lock:
            return one_by_one(jobs, self._run)

    def _run(self, job: EngineJob) -> EngineOutput:
        p = MixtureCanvasParams.model_validate(job.params)
        return generate_on_sd_model(
            self.runtime,
            p.model_id,
            lambda pipe: mixture_canvas(pipe, p, job.image("image"), job.events.step),
            self._nsfw if p.safety_checker else None,
            p.safety_checker_type,
            "try a smaller canvas",
        )

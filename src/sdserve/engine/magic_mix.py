"""MagicMix (Liew et al. 2022, "MagicMix: Semantic Mixing with Diffusion Models"), reimplemented on
any SD model's components: the diffusers version exists only as a community pipeline.

The image gives the layout, the prompt the content. Denoising starts from the image noised to
step `kmax`; until step `kmin` (the layout phase) the latents are mixed with the image noised to
the current step, `mix_factor` of the generated ones against the rest of the image's; after it
(the content phase) the prompt alone denoises.
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


class MagicMixParams(BaseModel):
    """What a magic_mix job asks of the engine (stored on the job)."""

    model_config = ConfigDict(extra="ignore")

    model_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    samples: int
    steps: int
    guidance_scale: float
    seed: int
    kmin: float
    kmax: float
    mix_factor: float
    safety_checker: bool = False
    safety_checker_type: str = "sensitive_content_text"

    @property
    def cost(self) -> float:
        return batching.cost(self.samples, self.steps, self.width, self.height)


def phase_bounds(steps: int, kmin: float, kmax: float) -> tuple[int, int]:
    """(tmax, tmin): the step index denoising starts at, and where the layout phase ends."""
    tmax = min(steps - int(kmax * steps), steps - 1)
    tmin = max(steps - int(kmin * steps), tmax)
    return tmax, tmin


@torch.no_grad()
def magic_mix(pipe, p: MagicMixParams, image, on_step=None):
    """The mixed images (PIL), one per sample, from `pipe`'s UNet, VAE and text encoder(s)."""
    # 1. a DDIM scheduler from the model's own config (MagicMix is defined on DDIM)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(p.steps, device=pipe.device)
    timesteps = scheduler.timesteps
    tmax, tmin = phase_bounds(p.steps, p.kmin, p.kmax)
    # 2. the prompt, and the layout image in latent space with one noise draw per sample
    cond = latent_steps.conditioning(
        pipe, p.prompt, p.negative_prompt, p.samples, p.width, p.height, p.guidance_scale
    )
    encoded = latent_steps.encode_image(pipe.vae, image, p.width, p.height)
    encoded = encoded.to(cond.hidden.dtype).repeat(p.samples, 1, 1, 1)
    noise = latent_steps.initial_noise(
        tuple(encoded.shape[1:]), p.seed, p.samples, encoded.device, encoded.dtype
    )
    # 3. start from the image noised to step kmax, and take that step
    latents = scheduler.add_noise(encoded, noise, timesteps[tmax : tmax + 1])
    unet = pipe.unet
    noise_pred = latent_steps.predict_noise(unet, scheduler, latents, timesteps[tmax], cond)
    latents = scheduler.step(noise_pred, timesteps[tmax], latents).prev_sample
    total = p.steps - tmax
    if on_step:
        on_step(1, total)
    # 4. the layout phase (mixed with the noised image), then the content phase (prompt only)
    for i in range(tmax + 1, p.steps):
        t = timesteps[i]
        if i < tmin:
            layout = scheduler.add_noise(encoded, noise, t.reshape(1))
            latents = p.mix_factor * latents + (1 - p.mix_factor) * layout
        noise_pred = latent_steps.predict_noise(unet, scheduler, latents, t, cond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
        if on_step:
            on_step(i - tmax + 1, total)
    latent_steps.check_finite(latents)
    # 5. pixels
    return latent_steps.decode_latents(pipe.vae, latents)


class MagicMixEngine:
    """magic_mix jobs, one at a time, on the named SD model (kept resident like any model)."""

    kinds = ("magic_mix",)

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._nsfw = NsfwChecker(runtime.settings.nsfw_threshold)
        self._lock = threading.Lock()

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        with self._lock:
            return one_by_one(jobs, self._run)

    def _run(self, job: EngineJob) -> EngineOutput:
        p = MagicMixParams.model_validate(job.params)
        return generate_on_sd_model(
            self.runtime,
            p.model_id,
            lambda pipe: magic_mix(pipe, p, job.image("image"), job.events.step),
            self._nsfw if p.safety_checker else None,
            p.safety_checker_type,
            "try a smaller size or fewer samples",
        )

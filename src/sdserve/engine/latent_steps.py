"""The pieces the reimplemented pipelines (MagicMix, Mixture of Diffusers) are built from, on any
SD 1.x / 2.x / SDXL pipeline's own components: prompt conditioning with classifier-free guidance,
one guided UNet prediction, and images in and out of latent space (with the VAE's own
`scaling_factor`, never SD 1's 0.18215)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sdserve.engine.prompts import encode_prompts
from sdserve.errors import EngineError


@dataclass
class Conditioning:
    """What the UNet is given at every step: text embeddings (unconditional half first when
    guided), SDXL's extra conditioning, and the guidance scale."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None
    guidance_scale: float

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1


def conditioning(
    pipe, prompt: str, negative_prompt: str, samples: int, width: int, height: int, guidance: float
) -> Conditioning:
    embeds = encode_prompts(pipe, [prompt] * samples, [negative_prompt] * samples)
    guided = guidance > 1
    positive, negative = embeds["prompt_embeds"], embeds["negative_prompt_embeds"]
    hidden = torch.cat([negative, positive]) if guided else positive
    added = None
    if "pooled_prompt_embeds" in embeds:  # SDXL: pooled text and the size conditioning
        pooled = embeds["pooled_prompt_embeds"]
        if guided:
            pooled = torch.cat([embeds["negative_pooled_prompt_embeds"], pooled])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype)
        added = {
            "text_embeds": pooled,
            "time_ids": time_ids.to(pooled.device).repeat(pooled.shape[0], 1),
        }
    return Conditioning(hidden, added, guidance)


def predict_noise(unet, scheduler, latents: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
    """The UNet's guided noise prediction for `latents` at timestep `t`."""
    model_input = torch.cat([latents] * 2) if cond.guided else latents
    model_input = scheduler.scale_model_input(model_input, t)
    noise = unet(
        model_input, t, encoder_hidden_states=cond.hidden, added_cond_kwargs=cond.added
    ).sample
    if not cond.guided:
        return noise
    uncond, text = noise.chunk(2)
    return uncond + cond.guidance_scale * (text - uncond)


@contextlib.contextmanager
def _vae_precision(vae):
    """The VAE in float32 while it runs, where fp16 overflows in it (SDXL's: `force_upcast`),
    as diffusers' own pipelines do; yields the dtype to feed it."""
    upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    if not upcast:
        yield vae.dtype
        return
    vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(torch.float16)


def encode_image(vae, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An image resized to (width, height), as scaled latents (the distribution's mean)."""
    rgb = np.asarray(image.convert("RGB").resize((width, height), Image.LANCZOS), dtype=np.float32)
    pixels = torch.from_numpy(rgb / 127.5 - 1).permute(2, 0, 1)[None]
    with _vae_precision(vae) as dtype:
        pixels = pixels.to(device=vae.device, dtype=dtype)
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    return latents


def decode_latents(vae, latents: torch.Tensor) -> list[Image.Image]:
    with _vae_precision(vae) as dtype:
        pixels = vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def initial_noise(shape: tuple[int, ...], seed: int, samples: int, device, dtype) -> torch.Tensor:
    """One noise draw per sample from seed + i (a sample is the same alone or among several)."""
    draws = [
        torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i))
        for i in range(samples)
    ]
    return torch.stack(draws).to(device=device, dtype=dtype)


def check_finite(latents: torch.Tensor) -> None:
    if not torch.isfinite(latents).all():
        raise EngineError("Generation failed: the model produced NaN values")

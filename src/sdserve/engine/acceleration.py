"""GPU execution settings for loaded pipelines: precision, memory layout, compilation, VAE tiling.
Everything here applies on CUDA only; on CPU pipelines run as diffusers loads them."""

from __future__ import annotations

import logging
import os

import torch
from diffusers import DiffusionPipeline

from sdserve.settings import Settings

log = logging.getLogger(__name__)


def pick_dtype(device: torch.device, setting: str) -> torch.dtype:
    """fp32 on CPU; on a GPU bf16 where it is supported (Ampere and newer), else fp16."""
    if device.type != "cuda":
        return torch.float32
    if setting == "float16":
        return torch.float16
    if setting == "bfloat16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def configure_compile_cache(settings: Settings) -> None:
    """Keep inductor's compiled kernels in the data dir, so a restart does not recompile."""
    if not settings.compile_unet:
        return
    folder = settings.data_dir / "compile-cache"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def prepare(pipe: DiffusionPipeline, device: torch.device, settings: Settings) -> None:
    """Make a freshly loaded pipeline fast on a GPU (diffusers already uses SDPA attention)."""
    if device.type != "cuda":
        return
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.compile_unet:
        # LoRAs swap into the compiled UNet without recompiling (diffusers' LoRA hot-swap)
        if hasattr(pipe, "enable_lora_hotswap"):
            pipe.enable_lora_hotswap(target_rank=settings.lora_hotswap_rank)
        # "max-autotune" uses CUDA graphs per input shape: one graph per (size, batch) bucket
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=False)
        log.info("UNet compiled (first run per bucket compiles, then cached on disk)")


def tile_vae_for(pipe: DiffusionPipeline, width: int, height: int, settings: Settings) -> None:
    """Decode large images tile by tile, within memory; small ones in one pass (faster)."""
    vae = pipe.vae
    if not hasattr(vae, "enable_tiling"):
        return
    if width * height > settings.vae_tile_above_pixels:
        vae.enable_tiling()
    else:
        vae.disable_tiling()

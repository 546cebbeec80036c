"""Runs image jobs (text2img / img2img / inpaint) on diffusers pipelines: LoRA, embeddings, VAE, NSFW."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)
from PIL import Image

from sdserve.engine.prompts import encode_prompts
from sdserve.engine.registry import ModelRegistry, ResidencyCache
from sdserve.engine.safety import NsfwChecker, replace_nsfw
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler_name
from sdserve.errors import EngineError
from sdserve.schemas.images import GenerationParams
from sdserve.settings import Settings

_TASK_PIPELINES = {
    "text2img": AutoPipelineForText2Image,
    "img2img": AutoPipelineForImage2Image,
    "inpaint": AutoPipelineForInpainting,
}

StepCallback = Callable[[int, int], None]  # (steps done, steps in this run)


@dataclass
class ImageResult:
    images: list[Image.Image]
    nsfw: list[bool]
    scheduler: str
    pipeline_seconds: float  # the diffusers pipeline call alone


def pick_device(setting: str) -> torch.device:
    if setting != "auto":
        return torch.device(setting)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ImageEngine:
    """Owns loaded pipelines. Not thread-safe by design: one worker thread drives one engine."""

    def __init__(self, settings: Settings, registry: ModelRegistry):
        self.settings = settings
        self.registry = registry
        self.device = pick_device(settings.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.cache = ResidencyCache(settings.residency_budget_mb * 1024 * 1024)
        self._nsfw = NsfwChecker(settings.nsfw_threshold)
        self._lock = threading.Lock()

    def pipeline(self, model_id: str) -> DiffusionPipeline:
        source = self.registry.resolve(model_id)
        return self.cache.get(model_id, lambda: self.registry.load(source, self.device, self.dtype))

    def generate(
        self,
        p: GenerationParams,
        init_image: Image.Image | None,
        mask_image: Image.Image | None,
        on_step: StepCallback | None = None,
    ) -> ImageResult:
        with self._lock:
            base = self.pipeline(p.model_id)
            apply_loras(base, p.loras, self.registry)
            if p.embeddings_model:
                self._ensure_embedding(base, p.embeddings_model)

            # 1. per-job components: a fresh scheduler (they are stateful) and an optional VAE
            choice = resolve_scheduler_name(p.scheduler, p.use_karras_sigmas, p.algorithm_type)
            overrides = {"scheduler": make_scheduler(base.scheduler.config, choice)}
            if p.vae:
                path = self.registry.resolve_vae(p.vae)
                # kept resident like a model, not reloaded for every job that names it
                overrides["vae"] = self.cache.get(
                    f"vae:{p.vae}:{p.model_id}",
                    lambda: self.registry.load_vae(path, base.vae, self.dtype).to(self.device),
                )
            pipe = _TASK_PIPELINES[p.kind].from_pipe(base, **overrides)
            pipe.set_progress_bar_config(disable=True)

            # 2. prompts, with A1111 weighting and no 77-token limit
            embeds = encode_prompts(
                pipe, [p.prompt] * p.samples, [p.negative_prompt] * p.samples, p.clip_skip
            )

            # 3. one generator per sample, so a sample's pixels depend only on its own seed
            generators = [torch.Generator("cpu").manual_seed(p.seed + i) for i in range(p.samples)]

            kwargs = dict(
                num_inference_steps=p.steps,
                guidance_scale=p.guidance_scale,
                generator=generators,
                output_type="pil",
                **embeds,
            )
            if p.kind == "text2img":
                kwargs.update(width=p.width, height=p.height)
            else:
                kwargs.update(image=_fit(init_image, p), strength=p.strength)
            if p.kind == "inpaint":
                kwargs.update(
                    mask_image=_fit(mask_image, p).convert("L"), width=p.width, height=p.height
                )

            # 4. denoise, reporting each step
            if on_step is not None:
                kwargs["callback_on_step_end"] = step_reporter(on_step)
            started = time.perf_counter()
            try:
                images = pipe(**kwargs).images
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:
                raise EngineError(f"Generation failed: {exc}") from exc
            pipeline_seconds = time.perf_counter() - started

        # 5. NSFW check and replacement
        nsfw = [False] * len(images)
        if p.safety_checker:
            nsfw = [self._nsfw.is_nsfw(image) for image in images]
            images = [
                replace_nsfw(image, p.safety_checker_type) if flagged else image
                for image, flagged in zip(images, nsfw, strict=True)
            ]
        return ImageResult(images, nsfw, choice.class_name, pipeline_seconds)

    def _ensure_embedding(self, pipe: DiffusionPipeline, embedding_id: str) -> None:
        done = pipe.__dict__.setdefault("_sdserve_embeddings", set())
        if embedding_id in done:
            return
        path = self.registry.resolve_embedding(embedding_id)
        try:
            pipe.load_textual_inversion(str(path), token=embedding_id)
        except Exception as exc:
            raise EngineError(f"Embedding {embedding_id} could not be loaded: {exc}") from exc
        done.add(embedding_id)


def apply_loras(
    pipe: DiffusionPipeline, loras: list[tuple[str, float]], registry: ModelRegistry
) -> None:
    """Load each LoRA once per pipeline (kept as a named adapter), then set this job's weights."""
    loaded = {name for names in pipe.get_list_adapters().values() for name in names}
    lycoris = pipe.__dict__.setdefault("_sdserve_lycoris", set())
    wanted = {_adapter_name(lora_id): registry.resolve_lora(lora_id) for lora_id, _ in loras}
    wanted_lycoris = {name for name, path in wanted.items() if _lycoris_kind(path)}
    if (lycoris or wanted_lycoris) and loaded - set(wanted):
        # PEFT cannot stack LoRA and LoHa/LoKr layers on one module: start from a clean UNet.
        pipe.unload_lora_weights()
        loaded = set()
        lycoris.clear()
    if not loras:
        if loaded:
            pipe.disable_lora()
        return
    for name, path in wanted.items():
        if name in loaded:
            continue
        try:
            if name in wanted_lycoris:
                _load_lycoris(pipe, path, name)
                lycoris.add(name)
            else:
                pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:
            raise EngineError(f"LoRA {path.stem} could not be loaded: {exc}") from exc
    pipe.enable_lora()
    pipe.set_adapters(list(wanted), adapter_weights=[strength for _, strength in loras])


def _lycoris_kind(path) -> str | None:
    """loha / lokr for LyCORIS adapters trained here (PEFT layout), else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            kind = (handle.metadata() or {}).get("sdserve_adapter")
    except Exception:  # not safetensors: let load_lora_weights say what is wrong
        return None
    return kind if kind in ("loha", "lokr") else None


def _load_lycoris(pipe: DiffusionPipeline, path, name: str) -> None:
    """diffusers' loader reads LoRA only; LoHa / LoKr go in through PEFT's own adapter classes."""
    from peft import LoHaConfig, LoKrConfig, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = {
        k.removeprefix("unet."): v for k, v in load_file(path).items() if k.startswith("unet.")
    }
    marker = ".hada_" if metadata["sdserve_adapter"] == "loha" else ".lokr_"
    targets = sorted({key.split(marker)[0] for key in state})
    rank = int(metadata["rank"])
    config_class = LoHaConfig if metadata["sdserve_adapter"] == "loha" else LoKrConfig
    pipe.unet.add_adapter(
        config_class(r=rank, alpha=rank, target_modules=targets), adapter_name=name
    )
    set_peft_model_state_dict(pipe.unet, state, adapter_name=name)


def _adapter_name(lora_id: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in lora_id)


def _fit(image: Image.Image, p: GenerationParams) -> Image.Image:
    return image.convert("RGB").resize((p.width, p.height), Image.LANCZOS)


def step_reporter(on_step: StepCallback | None):
    """A diffusers `callback_on_step_end` that reports (steps done, steps in this run)."""

    def callback(pipe, step_index, _timestep, callback_kwargs):
        if on_step is not None:
            total = getattr(pipe, "_num_timesteps", None) or len(pipe.scheduler.timesteps)
            on_step(step_index + 1, total)
        return callback_kwargs

    return callback

"""Runs image jobs (text2img / img2img / inpaint) on diffusers pipelines: LoRA, embeddings, VAE, NSFW."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)
from PIL import Image

from sdserve.engine import acceleration
from sdserve.engine.prompts import encode_prompts
from sdserve.engine.registry import ModelRegistry, ResidencyCache, free_device_memory
from sdserve.engine.safety import NsfwChecker, replace_nsfw
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler_name
from sdserve.errors import EngineError, SdserveError
from sdserve.schemas.images import GenerationParams, normalize_image_request, parse_image_request
from sdserve.settings import Settings

_TASK_PIPELINES = {
    "text2img": AutoPipelineForText2Image,
    "img2img": AutoPipelineForImage2Image,
    "inpaint": AutoPipelineForInpainting,
}

StepCallback = Callable[[int, int], None]  # (steps done, steps in this run)
log = logging.getLogger(__name__)


@dataclass
class ImageResult:
    images: list[Image.Image]
    nsfw: list[bool]
    scheduler: str
    pipeline_seconds: float  # the diffusers pipeline call alone
    stages: dict[str, float] = field(default_factory=dict)  # model_load, denoise, decode, ...


@dataclass
class BatchItem:
    """One job of a batch: its parameters, input images and step callback."""

    params: GenerationParams
    init: Image.Image | None = None
    mask: Image.Image | None = None
    on_step: StepCallback | None = None


def per_sample_guidance(unet: torch.nn.Module, scales: list[float]):
    """Classifier-free guidance with a scale per sample, inside diffusers' own pipelines.

    The pipeline computes uncond + g * (text - uncond) with one g: the largest scale. This hook
    rescales each sample's (text - uncond) by its own scale / g on the UNet's output first, so the
    result is uncond + scale_i * (text - uncond) for every sample. Returns the hook handle.
    """
    ratio = torch.tensor(scales, dtype=torch.float32) / max(scales)

    def hook(_module, _args, _kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        uncond, text = sample.chunk(2)  # diffusers puts the unconditional half first
        shape = (-1,) + (1,) * (sample.ndim - 1)
        weights = ratio.to(device=sample.device, dtype=sample.dtype).view(shape)
        sample = torch.cat([uncond, uncond + weights * (text - uncond)])
        if isinstance(output, tuple):
            return (sample, *output[1:])
        output.sample = sample
        return output

    return unet.register_forward_hook(hook, with_kwargs=True)


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
        self.dtype = acceleration.pick_dtype(self.device, settings.gpu_dtype)
        acceleration.configure_compile_cache(settings)
        self.cache = ResidencyCache(settings.residency_budget_mb * 1024 * 1024)
        self._nsfw = NsfwChecker(settings.nsfw_threshold)
        self._lock = threading.Lock()

    def pipeline(self, model_id: str) -> DiffusionPipeline:
        source = self.registry.resolve(model_id)

        def load() -> DiffusionPipeline:
            pipe = self.registry.load(source, self.device, self.dtype)
            acceleration.prepare(pipe, self.device, self.settings)
            return pipe

        return self.cache.get(model_id, load)

    def warm_up(self) -> None:
        """Run the configured buckets once (loads, compiles, CUDA graphs) before serving."""
        for bucket in filter(None, (b.strip() for b in self.settings.warmup_buckets.split(","))):
            try:
                model_id, size, steps, batch = bucket.split(":")
                width, height = (int(v) for v in size.lower().split("x"))
                body = {
                    "prompt": "warm-up",
                    "width": width,
                    "height": height,
                    "num_inference_steps": int(steps),
                    "samples": int(batch),
                    "enhance_prompt": "no",
                    "safety_checker": "no",
                }
                params = normalize_image_request(
                    parse_image_request(body),
                    "text2img",
                    "community",
                    self.settings,
                    model_id=model_id,
                )
                started = time.perf_counter()
                self.generate(params, None, None)
                log.info("warmed up %s in %.1f s", bucket, time.perf_counter() - started)
            except Exception:
                log.exception("warm-up of %s failed", bucket)

    def generate(
        self,
        p: GenerationParams,
        init_image: Image.Image | None,
        mask_image: Image.Image | None,
        on_step: StepCallback | None = None,
    ) -> ImageResult:
        """One job alone: a batch of one."""
        [result] = self.generate_batch([BatchItem(p, init_image, mask_image, on_step)])
        if isinstance(result, Exception):
            raise result
        return result

    def generate_batch(self, items: list[BatchItem]) -> list[ImageResult | Exception]:
        """Jobs with the same batch_key in one denoising loop; each keeps its prompts, seeds,
        guidance and sample count, and gets its own result, or the exception that failed it."""
        results: list[ImageResult | Exception | None] = [None] * len(items)
        with self._lock:
            # 1. what the jobs share (they asked for the same): a failure here fails them all
            try:
                pipe, choice, model_load = self._shared_pipeline(items[0].params)
            except SdserveError as exc:
                return [exc] * len(items)
            except Exception as exc:
                return [EngineError(f"Generation failed: {exc}")] * len(items)

            # 2. each job's prompts (a bad one fails alone); one loop per embedding shape
            prompts = [
                (
                    [i.params.prompt] * i.params.samples,
                    [i.params.negative_prompt] * i.params.samples,
                    i.params.clip_skip,
                )
                for i in items
            ]
            for group in encode_in_groups(pipe, prompts, results):
                self._denoise(pipe, items, group, results, model_load)

        # 3. NSFW check and replacement, per job
        for index, item in enumerate(items):
            result = results[index]
            if isinstance(result, ImageResult) and item.params.safety_checker:
                checked = time.perf_counter()
                result.nsfw = [self._nsfw.is_nsfw(image) for image in result.images]
                result.images = [
                    replace_nsfw(image, item.params.safety_checker_type) if flagged else image
                    for image, flagged in zip(result.images, result.nsfw, strict=True)
                ]
                result.stages["nsfw"] = time.perf_counter() - checked
        for result in results:
            if isinstance(result, ImageResult):
                result.scheduler = choice.class_name
        return results

    def _shared_pipeline(self, first: GenerationParams):
        """The model with the batch's LoRAs and embedding, a fresh scheduler (they are stateful)
        and the optional VAE; and how long getting the model took."""
        started = time.perf_counter()
        base = self.pipeline(first.model_id)
        apply_loras(base, first.loras, self.registry)
        if first.embeddings_model:
            self._ensure_embedding(base, first.embeddings_model)
        model_load = time.perf_counter() - started
        choice = resolve_scheduler_name(
            first.scheduler, first.use_karras_sigmas, first.algorithm_type
        )
        overrides = {"scheduler": make_scheduler(base.scheduler.config, choice)}
        if first.vae:
            path = self.registry.resolve_vae(first.vae)
            # kept resident like a model, not reloaded for every job that names it
            overrides["vae"] = self.cache.get(
                f"vae:{first.vae}:{first.model_id}",
                lambda: self.registry.load_vae(path, base.vae, self.dtype).to(self.device),
            )
        pipe = _TASK_PIPELINES[first.kind].from_pipe(base, **overrides)
        pipe.set_progress_bar_config(disable=True)
        if self.device.type == "cuda":
            acceleration.tile_vae_for(pipe, first.width, first.height, self.settings)
        return pipe, choice, model_load

    def _denoise(self, pipe, items, group, results, model_load: float) -> None:
        """Run `group` (indices into items, with their prompt embeddings) as one pipeline call."""

        def run(group) -> None:
            outputs, stages = self._call(pipe, [items[i] for i, _ in group], [e for _, e in group])
            offset = 0
            for index, _ in group:
                count = items[index].params.samples
                arrays = outputs[offset : offset + count]
                offset += count
                if not np.isfinite(arrays).all():  # NaN or inf in this job's samples only
                    results[index] = EngineError("Generation failed: the model produced NaN values")
                    continue
                images = pipe.numpy_to_pil(arrays)
                timings = {"model_load": model_load, **stages, "batch_size": len(group)}
                results[index] = ImageResult(
                    images, [False] * len(images), "", stages["denoise"] + stages["decode"], timings
                )

        split_on_oom(group, run, results)

    def _call(self, pipe, items: list[BatchItem], embeds: list[dict]):
        """The diffusers call for several jobs: samples concatenated, guidance per sample."""
        first = items[0].params
        generators = [
            torch.Generator("cpu").manual_seed(item.params.seed + i)
            for item in items
            for i in range(item.params.samples)
        ]
        kwargs: dict = {key: torch.cat([e[key] for e in embeds]) for key in embeds[0]}
        scales = [item.params.guidance_scale for item in items for _ in range(item.params.samples)]
        kwargs.update(
            num_inference_steps=first.steps,
            guidance_scale=max(scales),
            generator=generators,
            output_type="np",
        )
        if first.kind == "text2img":
            kwargs.update(width=first.width, height=first.height)
        else:
            kwargs.update(
                image=[
                    _fit(item.init, item.params)
                    for item in items
                    for _ in range(item.params.samples)
                ],
                strength=first.strength,
            )
        if first.kind == "inpaint":
            kwargs.update(
                mask_image=[
                    _fit(item.mask, item.params).convert("L")
                    for item in items
                    for _ in range(item.params.samples)
                ],
                width=first.width,
                height=first.height,
            )
        marks: list[float] = []
        reporters = [step_reporter(item.on_step) for item in items]

        def on_step_end(pipe, step_index, timestep, callback_kwargs):
            marks.append(time.perf_counter())  # the last one is where decoding starts
            for report in reporters:
                report(pipe, step_index, timestep, callback_kwargs)
            return callback_kwargs

        kwargs["callback_on_step_end"] = on_step_end
        hook = None
        if len(set(scales)) > 1 and max(scales) > 1:
            hook = per_sample_guidance(pipe.unet, scales)
        started = time.perf_counter()
        try:
            images = pipe(**kwargs).images
        finally:
            if hook is not None:
                hook.remove()
        ended = time.perf_counter()
        denoised = marks[-1] if marks else ended
        return images, {"denoise": denoised - started, "decode": ended - denoised}

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


def encode_in_groups(
    pipe, prompts: list[tuple[list[str], list[str], int | None]], results: list
) -> list[list[tuple[int, dict[str, torch.Tensor]]]]:
    """Each job's (prompts, negative prompts, clip skip) encoded (A1111 weighting, no 77-token
    limit), then grouped by embedding shape: long prompts make longer embeddings, and each group
    is one loop. A job whose prompt cannot be encoded gets its error in `results`, left out."""
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for index, (positive, negative, clip_skip) in enumerate(prompts):
        try:
            embeds = encode_prompts(pipe, positive, negative, clip_skip)
        except Exception as exc:
            results[index] = EngineError(f"Prompt could not be encoded: {exc}")
            continue
        shape = tuple(tuple(t.shape[1:]) for t in embeds.values())
        groups.setdefault(shape, []).append((index, embeds))
    return list(groups.values())


def split_on_oom(
    group: list[tuple[int, dict]], run: Callable[[list], None], results: list, unit: str = "samples"
) -> None:
    """`run(group)` as one batch. When the GPU runs out of memory, free it and run each half on
    its own, down to single jobs, whose error suggests fewer `unit`. Any other failure fails the
    group's jobs (in `results`)."""
    try:
        run(group)
        return
    except torch.cuda.OutOfMemoryError:
        free_device_memory()
        if len(group) > 1:
            log.warning("out of memory with a batch of %d jobs: splitting it", len(group))
            half = len(group) // 2
            split_on_oom(group[:half], run, results, unit)
            split_on_oom(group[half:], run, results, unit)
            return
        error = EngineError(f"Out of GPU memory: try a smaller size or fewer {unit}")
    except SdserveError as exc:
        error = exc
    except Exception as exc:
        error = EngineError(f"Generation failed: {exc}")
    for index, _ in group:
        results[index] = error


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

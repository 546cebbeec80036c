"""Runs image jobs (text2img / img2img / inpaint) on diffusers pipelines: LoRA, embeddings, VAE, NSFW."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sdserve.engine import acceleration, batching
from sdserve.engine.adapters import apply_loras
from sdserve.engine.base import (
    EngineJob,
    EngineOutput,
    Measured,
    OutputFile,
    Runtime,
    StepCallback,
)
from sdserve.engine.batching import (
    encode_in_groups,
    per_sample_guidance,
    split_on_oom,
    step_reporters,
)
from sdserve.engine.safety import NsfwChecker, replace_nsfw
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler_name
from sdserve.errors import EngineError, SdserveError
from sdserve.media.images import encode_png

log = logging.getLogger(__name__)
ImageKind = Literal["text2img", "img2img", "inpaint"]
_TASK_PIPELINES = {
    "text2img": AutoPipelineForText2Image,
    "img2img": AutoPipelineForImage2Image,
    "inpaint": AutoPipelineForInpainting,
}


class ImageParams(BaseModel):
    """What an image job asks of the engine: the effective, typed values (stored on the job)."""

    model_config = ConfigDict(extra="ignore")

    kind: ImageKind
    model_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    samples: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str | None
    use_karras_sigmas: bool
    algorithm_type: str | None
    loras: list[tuple[str, float]] = Field(default_factory=list)
    embeddings_model: str | None = None
    clip_skip: int | None = None
    vae: str | None = None
    strength: float = 0.7
    safety_checker: bool = False
    safety_checker_type: str = "sensitive_content_text"

    @property
    def batch_key(self) -> str:
        """Jobs with equal keys can share one denoising loop: the same model, size, steps,
        scheduler, adapters, VAE and embedding; guidance on or off; img2img strength."""
        return batching.batch_key(
            self.kind,
            self.model_id,
            self.width,
            self.height,
            self.steps,
            self.scheduler,
            self.use_karras_sigmas,
            self.algorithm_type,
            ",".join(f"{name}:{weight:g}" for name, weight in sorted(self.loras)),
            self.vae,
            self.embeddings_model,
            self.guidance_scale > 1,
            self.strength if self.kind != "text2img" else "",
        )

    @property
    def cost(self) -> float:
        return batching.cost(self.samples, self.steps, self.width, self.height)


@dataclass
class ImageResult:
    images: list[Image.Image]
    nsfw: list[bool]
    stages: dict[str, float] = field(default_factory=dict)  # model_load, denoise, decode, ...


@dataclass
class BatchItem:
    """One job of a batch: its parameters, input images and step callback."""

    params: ImageParams
    init: Image.Image | None = None
    mask: Image.Image | None = None
    on_step: StepCallback | None = None


class ImageEngine:
    """Owns loaded pipelines. Not thread-safe by design: one worker thread drives one engine."""

    kinds = ("text2img", "img2img", "inpaint")

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings = runtime.settings
        self.registry = runtime.registry
        self.device = runtime.device
        self.dtype = runtime.dtype
        self.cache = runtime.cache
        self._nsfw = NsfwChecker(self.settings.nsfw_threshold)
        self._lock = threading.Lock()

    def pipeline(self, model_id: str) -> DiffusionPipeline:
        return self.runtime.pipeline(model_id)

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        items = [
            BatchItem(
                ImageParams.model_validate(job.params),
                job.image("init_image"),
                job.image("mask_image"),
                job.events.step,
            )
            for job in jobs
        ]
        outputs: list[EngineOutput | Exception] = []
        for result in self.generate_batch(items):
            if isinstance(result, Exception):
                outputs.append(result)
                continue
            files = [
                OutputFile(encode_png(image), nsfw)
                for image, nsfw in zip(result.images, result.nsfw, strict=True)
            ]
            outputs.append(EngineOutput(files, result.stages))
        return outputs

    def warm_up(self) -> list[Measured]:
        """Run the configured buckets (loads, compiles, CUDA graphs) before serving, each twice:
        the second run is timed as a job is. `default` names the default model."""
        runs = []
        for bucket in filter(None, (b.strip() for b in self.settings.warmup_buckets.split(","))):
            try:
                model_id, size, steps, batch = bucket.split(":")
                width, height = (int(v) for v in size.lower().split("x"))
                params = ImageParams(
                    kind="text2img",
                    model_id=self.settings.default_model if model_id == "default" else model_id,
                    prompt="warm-up",
                    negative_prompt="",
                    width=width,
                    height=height,
                    samples=int(batch),
                    steps=int(steps),
                    guidance_scale=7.5,
                    seed=1,
                    scheduler=None,
                    use_karras_sigmas=True,
                    algorithm_type=None,
                )
                # The first run loads the model and pays one-time costs (allocations, kernel
                # choices: several times a run on a busy CPU); the second is timed as a job is.
                # All the first cost more than the second is what a cold model costs a job.
                first, seconds = self._timed_run(params), self._timed_run(params)
                cold = max(first - seconds, 0.0)
                log.info("warmed up %s in %.1f s", bucket, first + seconds)
            except Exception:
                log.exception("warm-up of %s failed", bucket)
                continue
            runs.append(
                Measured(
                    params.model_id,
                    params.kind,
                    params.batch_key,
                    params.cost,
                    params.steps,
                    seconds,
                    cold,
                )
            )
        return runs

    def _timed_run(self, params: ImageParams) -> float:
        """Seconds to run `params` alone and encode its images, as a job's are."""
        started = time.perf_counter()
        for image in self.generate(params, None, None).images:
            encode_png(image)
        return time.perf_counter() - started

    def generate(
        self,
        p: ImageParams,
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
                pipe, model_load = self._shared_pipeline(items[0].params)
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
            encoding = time.perf_counter()
            groups = encode_in_groups(pipe, prompts, results)
            encode = (time.perf_counter() - encoding) / max(len(items), 1)  # per job: its prompts
            for group in groups:
                self._denoise(pipe, items, group, results, {"model_load": model_load, "encode": encode})

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
        return results

    def _shared_pipeline(self, first: ImageParams):
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
        # The task's pipeline over the same components, made once per base pipeline (it goes
        # when the base is evicted); only the scheduler is new for every batch.
        tasks = base.__dict__.setdefault("_sdserve_tasks", {})
        pipe = tasks.get((first.kind, first.vae))
        if pipe is None:
            overrides = {}
            if first.vae:
                path = self.registry.resolve_vae(first.vae)
                # kept resident like a model, not reloaded for every job that names it
                overrides["vae"] = self.cache.get(
                    f"vae:{first.vae}:{first.model_id}",
                    lambda: self.registry.load_vae(path, base.vae, self.dtype).to(self.device),
                )
            pipe = _TASK_PIPELINES[first.kind].from_pipe(base, **overrides)
            pipe.set_progress_bar_config(disable=True)
            tasks[(first.kind, first.vae)] = pipe
        pipe.scheduler = make_scheduler(base.scheduler.config, choice)
        if self.device.type == "cuda":
            acceleration.tile_vae_for(pipe, first.width, first.height, self.settings)
        return pipe, model_load

    def _denoise(self, pipe, items, group, results, before: dict[str, float]) -> None:
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
                timings = {**before, **stages, "batch_size": len(group)}
                results[index] = ImageResult(images, [False] * len(images), timings)

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
        marks: list[float] = []  # step ends: the last one is where decoding starts
        kwargs["callback_on_step_end"] = step_reporters(
            [item.on_step for item in items if item.on_step is not None], marks
        )
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


def _fit(image: Image.Image, p: ImageParams) -> Image.Image:
    return image.convert("RGB").resize((p.width, p.height), Image.LANCZOS)

"""Runs video jobs: AnimateDiff on any SD1.5 model, text-to-video UNets (ModelScope / Zeroscope), SVD."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from diffusers import (
    AnimateDiffPipeline,
    AnimateDiffVideoToVideoPipeline,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableVideoDiffusionPipeline,
    TextToVideoSDPipeline,
)
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sdserve.engine import batching, tiny
from sdserve.engine.adapters import apply_loras
from sdserve.engine.base import EngineJob, EngineOutput, OutputFile, Runtime, StepCallback
from sdserve.engine.batching import (
    encode_in_groups,
    per_sample_guidance,
    split_on_oom,
    step_reporters,
)
from sdserve.engine.prompts import encode_prompts
from sdserve.engine.registry import free_device_memory
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler_name
from sdserve.errors import EngineError, ModelMismatch, SdserveError
from sdserve.media.video import decode_video, encode_video

# animatediff: any SD1.5 image model animated by a motion adapter (v4 text2video, v6 text2video);
# t2v: a text-to-video UNet (ModelScope / Zeroscope layout, v5 text2video); svd: img2video.
VideoKind = Literal["animatediff", "t2v", "svd"]


class VideoParams(BaseModel):
    """What a video job asks of the engine: the effective, typed values (stored on the job)."""

    model_config = ConfigDict(extra="ignore")

    kind: VideoKind
    model_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str | None
    strength: float
    init: Literal["none", "image", "video"] = "none"
    output_type: str = "mp4"
    clip_skip: int | None = None
    loras: list[tuple[str, float]] = Field(default_factory=list)
    use_improved_sampling: bool = False
    improved_sampling_seed: int = 42
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0
    file_prefix: str  # unique per job: a solo clip's batch key
    solo: bool = False  # runs in a denoising loop of its own (see runs_together)

    @property
    def batch_key(self) -> str:
        """Clips with equal keys can share one denoising loop; a solo clip's key is its own."""
        if self.solo:
            return batching.solo_key(self.kind, self.file_prefix)
        return batching.batch_key(
            self.kind,
            self.model_id,
            self.width,
            self.height,
            self.num_frames,
            self.steps,
            self.scheduler,
            ",".join(f"{name}:{weight:g}" for name, weight in sorted(self.loras)),
            self.guidance_scale > 1,  # guidance on or off
        )

    @property
    def cost(self) -> float:
        return batching.cost(self.num_frames, self.steps, self.width, self.height)


def runs_together(p: VideoParams, motion_context_frames: int) -> bool:
    """Whether a clip can share a denoising loop with others. FreeNoise (clips past the motion
    adapter's window) and FreeInit work on one prompt; video-to-video and SVD start from images."""
    if p.kind == "t2v":
        return True
    return (
        p.kind == "animatediff"
        and p.init == "none"
        and not p.use_improved_sampling
        and p.num_frames <= motion_context_frames
    )


@dataclass
class VideoResult:
    frames: list[Image.Image]
    stages: dict[str, float] = field(default_factory=dict)  # model_load, denoise, decode, ...


@dataclass
class VideoItem:
    """One job of a batch: its parameters, init frames (v2v, SVD) and step callback."""

    params: VideoParams
    init_frames: list[Image.Image] | None = None
    on_step: StepCallback | None = None


class VideoEngine:
    """Shares the worker's device, registry and residency cache (one GPU, one budget)."""

    kinds = ("animatediff", "t2v", "svd")

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings = runtime.settings
        self.registry = runtime.registry
        self._lock = threading.Lock()

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        items = [VideoItem(VideoParams.model_validate(job.params), None, job.events.step) for job in jobs]
        for item, job in zip(items, jobs, strict=True):
            if "init_image" in job.inputs.names():
                item.init_frames = [job.image("init_image")]
            elif "init_video" in job.inputs.names():
                data = job.inputs.read("init_video")
                item.init_frames = decode_video(data, "init_video", self.settings.max_video_frames)
        outputs: list[EngineOutput | Exception] = []
        for item, result in zip(items, self.generate_batch(items), strict=True):
            if isinstance(result, Exception):
                outputs.append(result)
                continue
            started = time.perf_counter()
            encoded = encode_video(result.frames, item.params.fps, item.params.output_type)
            stages = {**result.stages, "encode": time.perf_counter() - started}
            outputs.append(EngineOutput([OutputFile(encoded)], stages))
        return outputs

    def generate_batch(self, items: list[VideoItem]) -> list[VideoResult | Exception]:
        """Clips with the same batch_key in one denoising loop (AnimateDiff and text-to-video
        UNets); each keeps its prompts, seed and guidance and gets its own result or error.
        FreeNoise, FreeInit, video-to-video and SVD clips are solo: a batch of one."""
        with self._lock:
            if items[0].params.solo:
                return [self._alone(item) for item in items]
            return self._together(items)

    def _alone(self, item: VideoItem) -> VideoResult | Exception:
        p = item.params
        run = self._svd if p.kind == "svd" else self._animatediff
        marks: list[float] = []  # step ends: the last one is where decoding starts
        on_step_end = step_reporters([item.on_step] if item.on_step else [], marks)

        started = time.perf_counter()
        try:
            frames = run(p, item.init_frames, on_step_end)
        except torch.cuda.OutOfMemoryError:
            free_device_memory()
            return EngineError("Out of GPU memory: try a smaller size or fewer frames")
        except SdserveError as exc:
            return exc
        except Exception as exc:
            return EngineError(f"Video generation failed: {exc}")
        ended = time.perf_counter()
        denoised = marks[-1] if marks else ended
        stages = {"denoise": denoised - started, "decode": ended - denoised, "batch_size": 1}
        return VideoResult(frames, stages)

    # ---- clips in one loop ---------------------------------------------------------------

    def _together(self, items: list[VideoItem]) -> list[VideoResult | Exception]:
        results: list[VideoResult | Exception | None] = [None] * len(items)
        first = items[0].params
        started = time.perf_counter()
        try:  # what the clips share: a failure here fails them all
            pipe = self._loop_pipeline(first)
        except SdserveError as exc:
            return [exc] * len(items)
        except Exception as exc:
            return [EngineError(f"Video generation failed: {exc}")] * len(items)
        model_load = time.perf_counter() - started

        def run(group) -> None:
            started = time.perf_counter()
            latents = self._loop(pipe, [items[i] for i, _ in group], [e for _, e in group])
            denoise = time.perf_counter() - started
            for row, (index, _) in enumerate(group):
                decoding = time.perf_counter()
                try:  # NaN in this clip's latents or pixels fails this clip only
                    frames = self._decode_chunked(pipe, latents[row : row + 1])
                except EngineError as exc:
                    results[index] = exc
                    continue
                decode = time.perf_counter() - decoding
                stages = {
                    "model_load": model_load,
                    "encode": encode,
                    "denoise": denoise,
                    "decode": decode,
                    "batch_size": len(group),
                }
                results[index] = VideoResult(frames, stages)

        prompts = [
            ([i.params.prompt], [i.params.negative_prompt], i.params.clip_skip) for i in items
        ]
        encoding = time.perf_counter()
        groups = encode_in_groups(pipe, prompts, results)
        encode = (time.perf_counter() - encoding) / max(len(items), 1)  # per clip: its prompts
        for group in groups:
            split_on_oom(group, run, results, unit="frames")
        return results

    def _loop_pipeline(self, first: VideoParams) -> DiffusionPipeline:
        """The batch's model with its LoRAs and a fresh scheduler (they are stateful)."""
        if first.kind == "animatediff":
            pipe = self.animate_pipeline(first.model_id)
            apply_loras(pipe, first.loras, self.registry)
            if pipe.free_noise_enabled:
                pipe.disable_free_noise()
            pipe.disable_free_init()
        else:
            pipe = self._text_to_video_pipeline(first.model_id)
        choice = resolve_scheduler_name(first.scheduler, None, None)
        pipe.scheduler = make_scheduler(pipe.scheduler.config, choice)
        return pipe

    def _loop(self, pipe, items: list[VideoItem], embeds: list[dict]) -> torch.Tensor:
        """One denoising loop for several clips: latents [clips, C, frames, h, w]."""
        first = items[0].params
        scales = [item.params.guidance_scale for item in items]
        on_step_end = step_reporters([item.on_step for item in items if item.on_step])

        kwargs = {key: torch.cat([e[key] for e in embeds]) for key in embeds[0]}
        kwargs.update(
            num_frames=first.num_frames,
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=max(scales),
            generator=[torch.Generator("cpu").manual_seed(item.params.seed) for item in items],
            output_type="latent",
        )
        if isinstance(pipe, TextToVideoSDPipeline):  # only the old-style step callback
            kwargs.update(
                callback=lambda step, _t, _latents: on_step_end(pipe, step, None, {}),
                callback_steps=1,
            )
        else:
            kwargs["callback_on_step_end"] = on_step_end
        hook = per_sample_guidance(pipe.unet, scales)
        try:
            return pipe(**kwargs).frames
        finally:
            if hook is not None:
                hook.remove()

    # ---- AnimateDiff ---------------------------------------------------------------------

    def animate_pipeline(self, model_id: str) -> AnimateDiffPipeline:
        """The model's UNet with motion modules, cached beside the image pipeline.

        Built from its own load of the model, not from the image pipeline, whose UNet may carry
        LoRA layers that the motion UNet must not inherit.
        """

        def load() -> AnimateDiffPipeline:
            source = self.registry.resolve(model_id)
            base = self.registry.load(source, self.runtime.device, self.runtime.dtype)
            check_animatable(model_id, base)
            # The built-in tiny adapter fits tiny-shaped UNets (tiny-sd and models made from
            # it); everything else gets the configured SD1.5 adapter.
            tiny_shaped = tuple(base.unet.config.block_out_channels) == tiny.TINY_UNET_CHANNELS
            adapter = tiny.TINY_MOTION_ADAPTER if tiny_shaped else self.settings.motion_adapter
            motion = self.registry.load_motion_adapter(
                adapter, self.runtime.device, self.runtime.dtype
            )
            pipe = AnimateDiffPipeline.from_pipe(base, motion_adapter=motion)
            pipe.set_progress_bar_config(disable=True)
            _encode_with_sdserve_prompts(pipe)
            return pipe.to(self.runtime.device, self.runtime.dtype)

        return self.runtime.cache.get(f"{model_id}+animatediff", load)

    def _animatediff(self, p: VideoParams, init_frames, callback) -> list[Image.Image]:
        pipe = self.animate_pipeline(p.model_id)
        apply_loras(pipe, p.loras, self.registry)
        context = self.settings.motion_context_frames
        if p.num_frames > context:
            # Past the adapter's native window: overlapping context windows (FreeNoise).
            pipe.enable_free_noise(context_length=context, context_stride=max(1, context // 4))
        elif pipe.free_noise_enabled:
            pipe.disable_free_noise()
        if p.use_improved_sampling:
            pipe.enable_free_init(num_iters=2, method="butterworth", use_fast_sampling=False)
        else:
            pipe.disable_free_init()
        choice = resolve_scheduler_name(p.scheduler, None, None)
        pipe.scheduler = make_scheduler(pipe.scheduler.config, choice)

        common = dict(
            # Text, not embeddings: FreeNoise encodes per context window itself (through
            # sdserve's prompt encoder, see _encode_with_sdserve_prompts).
            prompt=p.prompt,
            negative_prompt=p.negative_prompt,
            clip_skip=_diffusers_clip_skip(p),
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(p.seed),
            decode_chunk_size=self.settings.video_decode_chunk,
            output_type="pil",
            callback_on_step_end=callback,
        )
        if init_frames:
            v2v = AnimateDiffVideoToVideoPipeline.from_pipe(pipe)
            v2v.set_progress_bar_config(disable=True)
            video = [
                f.resize((p.width, p.height), Image.LANCZOS)
                for f in _resample(init_frames, p.num_frames)
            ]
            return v2v(
                video=video, strength=p.strength, height=p.height, width=p.width, **common
            ).frames[0]
        return pipe(num_frames=p.num_frames, height=p.height, width=p.width, **common).frames[0]

    # ---- text-to-video UNet (v5; it runs in _together) and decoding ------------------------

    def _text_to_video_pipeline(self, model_id: str) -> TextToVideoSDPipeline:
        pipe = self.runtime.pipeline(model_id)
        if not isinstance(pipe, TextToVideoSDPipeline):
            raise ModelMismatch(f"Model {model_id} is not a text-to-video model.")
        return pipe

    def _decode_chunked(self, pipe, latents: torch.Tensor) -> list[Image.Image]:
        """Decode [1, C, F, h, w] latents a few frames at a time, so long clips fit in memory."""
        if not torch.isfinite(latents).all():
            raise EngineError("Generation failed: the model produced NaN values")
        latents = latents[0].permute(1, 0, 2, 3) / pipe.vae.config.scaling_factor  # [F, C, h, w]
        chunk = self.settings.video_decode_chunk
        frames = []
        with torch.no_grad():
            for start in range(0, latents.shape[0], chunk):
                pixels = pipe.vae.decode(latents[start : start + chunk].to(pipe.vae.dtype)).sample
                if not torch.isfinite(pixels).all():
                    raise EngineError("Generation failed: the model produced NaN values")
                frames.extend(_to_images(pixels))
        return frames

    # ---- Stable Video Diffusion (img2video) ------------------------------------------------

    def _svd(self, p: VideoParams, init_frames, callback) -> list[Image.Image]:
        pipe = self.runtime.pipeline(p.model_id)
        if not isinstance(pipe, StableVideoDiffusionPipeline):
            raise ModelMismatch(f"Model {p.model_id} is not an image-to-video model.")
        image = init_frames[0].resize((p.width, p.height), Image.LANCZOS)
        return pipe(
            image,
            height=p.height,
            width=p.width,
            num_frames=p.num_frames,
            num_inference_steps=p.steps,
            min_guidance_scale=p.min_guidance_scale,
            max_guidance_scale=p.max_guidance_scale,
            fps=p.fps,
            motion_bucket_id=p.motion_bucket_id,
            noise_aug_strength=p.noise_aug_strength,
            decode_chunk_size=self.settings.video_decode_chunk,
            generator=torch.Generator("cpu").manual_seed(p.seed),
            output_type="pil",
            callback_on_step_end=callback,
        ).frames[0]


def check_animatable(model_id: str, pipe: DiffusionPipeline) -> None:
    """AnimateDiff's SD1.5 motion modules fit SD1.x UNets only."""
    unet_config = getattr(getattr(pipe, "unet", None), "config", None)
    if (
        not isinstance(pipe, StableDiffusionPipeline)
        or unet_config is None
        or unet_config.cross_attention_dim == 1024
    ):
        raise ModelMismatch(
            f"Model {model_id} is not an SD1.5-family model; text2video animates SD1.5 models only."
        )


def _encode_with_sdserve_prompts(pipe: AnimateDiffPipeline) -> None:
    """Route the pipeline's own prompt encoding (used by FreeNoise too) through sdserve's:
    A1111 weights, no 77-token limit, and a clip_skip that works on transformers 5."""

    def encode_prompt(
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        lora_scale=None,
        clip_skip=None,
    ):
        if prompt_embeds is not None:  # encoded already, per job (batched clips)
            return (
                prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0),
                negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
                if do_classifier_free_guidance
                else None,
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt or ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        # diffusers counts skipped layers (0 = last); the API counts layers (1 = last)
        embeds = encode_prompts(
            pipe, prompts, negatives, None if clip_skip is None else clip_skip + 1
        )
        positive = embeds["prompt_embeds"].repeat_interleave(num_images_per_prompt, dim=0)
        negative = embeds["negative_prompt_embeds"].repeat_interleave(num_images_per_prompt, dim=0)
        return positive, (negative if do_classifier_free_guidance else None)

    pipe.encode_prompt = encode_prompt


def _diffusers_clip_skip(p: VideoParams) -> int | None:
    return p.clip_skip - 1 if p.clip_skip and p.clip_skip > 1 else None


def _resample(frames: list[Image.Image], count: int) -> list[Image.Image]:
    """Exactly `count` frames, picked evenly (a single init image becomes a still clip)."""
    indices = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return [frames[i] for i in indices]


def _to_images(pixels: torch.Tensor) -> list[Image.Image]:
    array = (
        ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    )
    return [Image.fromarray(frame) for frame in array]

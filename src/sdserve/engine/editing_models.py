"""The models of the image-editing verbs (pix2pix, depth2img, outpaint): their tiny built-in
stand-ins, the public ids that name hub repos, and loading either as the task's pipeline.

The tiny models are tiny-sd's components with the UNet each task needs (8 input channels for
InstructPix2Pix, 5 for depth, 9 for inpainting) and, for depth, a tiny DPT estimator. Like
`engine/tiny.py` they are built once, in code, with fixed seeds, and saved as diffusers folders
under the models dir. Any other id goes through the model registry as every family's does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoPipelineForInpainting,
    DiffusionPipeline,
    StableDiffusionDepth2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from sdserve.engine import acceleration, tiny
from sdserve.engine.base import Runtime
from sdserve.engine.registry import ModelRegistry, ModelSource
from sdserve.errors import ModelUnavailable, ValidationFailed

Task = Literal["pix2pix", "depth2img", "inpaint"]

# The UNet input channels a task's own model has (latents + what it is conditioned on).
_CHANNELS: dict[Task, tuple[int, ...]] = {
    "pix2pix": (8,),
    "depth2img": (5,),
    "inpaint": (9, 4),  # a 4-channel model inpaints by latent blending
}
_LABELS: dict[Task, str] = {
    "pix2pix": "an InstructPix2Pix (8-channel) model",
    "depth2img": "a depth-to-image (5-channel) model",
    "inpaint": "a Stable Diffusion model",
}


@dataclass(frozen=True)
class TinyEditModel:
    task: Task
    unet_channels: int


TINY_EDIT_MODELS = {
    "tiny-pix2pix": TinyEditModel("pix2pix", 8),
    "tiny-depth2img": TinyEditModel("depth2img", 5),
    "tiny-sd-inpaint": TinyEditModel("inpaint", 9),
}

# Public ids of editing models, with the hub repo and the task each one does.
HUB_EDIT_MODELS: dict[str, tuple[str, Task]] = {
    "instruct-pix2pix": ("timbrooks/instruct-pix2pix", "pix2pix"),
    "timbrooks/instruct-pix2pix": ("timbrooks/instruct-pix2pix", "pix2pix"),
    "sdxl-instructpix2pix": ("diffusers/sdxl-instructpix2pix-768", "pix2pix"),
    "sd-2-depth": ("stabilityai/stable-diffusion-2-depth", "depth2img"),
    "stable-diffusion-2-depth": ("stabilityai/stable-diffusion-2-depth", "depth2img"),
    "stabilityai/stable-diffusion-2-depth": ("stabilityai/stable-diffusion-2-depth", "depth2img"),
    "sd-inpainting": ("stable-diffusion-v1-5/stable-diffusion-inpainting", "inpaint"),
    "sd-2-inpainting": ("stabilityai/stable-diffusion-2-inpainting", "inpaint"),
    "sdxl-inpainting": ("diffusers/stable-diffusion-xl-1.0-inpainting-0.1", "inpaint"),
}


# ---- resolution (at submit: cheap, no weights loaded) -------------------------------------------


def resolve(model_id: str, task: Task, registry: ModelRegistry, owner: str | None) -> ModelSource:
    """Where the model a request names lives, checked for the task; ValidationFailed or
    ModelUnavailable now, at submit, rather than a failed job."""
    if model_id in TINY_EDIT_MODELS:
        if TINY_EDIT_MODELS[model_id].task != task:
            raise _wrong_model(model_id, task)
        return ModelSource(model_id, "builtin", model_id)
    if model_id in HUB_EDIT_MODELS:
        repo, repo_task = HUB_EDIT_MODELS[model_id]
        if repo_task != task:
            raise _wrong_model(model_id, task)
        source = ModelSource(model_id, "hub", repo)
    else:
        source = registry.resolve(model_id, owner)
        channels = _unet_channels(source)
        video = registry.architecture(source) in ("t2v", "svd")
        if video or (channels is not None and channels not in _CHANNELS[task]):
            raise _wrong_model(model_id, task)
    registry.check_available(source)
    return source


def _wrong_model(model_id: str, task: Task) -> ValidationFailed:
    return ValidationFailed({"model_id": [f"{model_id} is not {_LABELS[task]}."]})


def _unet_channels(source: ModelSource) -> int | None:
    """The UNet's input channels when a local folder says so (hub and single files: unknown)."""
    if source.kind == "builtin":
        return 4  # tiny-sd and friends are plain text-to-image models
    config = Path(source.location) / "unet" / "config.json"
    if source.kind == "folder" and config.is_file():
        return json.loads(config.read_text()).get("in_channels")
    return None


# ---- loading (in the worker) --------------------------------------------------------------------


def load(runtime: Runtime, source: ModelSource, task: Task) -> DiffusionPipeline:
    """The task's pipeline for `source`, kept resident like every model."""
    if source.model_id in TINY_EDIT_MODELS:
        folder = ensure_tiny_edit_model(source.model_id, runtime.settings.models_dir)
        base = runtime.cache.get(source.model_id, lambda: _load_folder(runtime, folder))
    elif source.model_id in HUB_EDIT_MODELS:
        base = runtime.cache.get(
            source.model_id,
            lambda: _prepared(
                runtime, runtime.registry.load(source, runtime.device, runtime.dtype)
            ),
        )
    else:
        base = runtime.pipeline(source.model_id)
    return _as_task(base, task, source.model_id)


def _load_folder(runtime: Runtime, folder: Path) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=runtime.dtype)
    pipe.set_progress_bar_config(disable=True)
    return _prepared(runtime, pipe.to(runtime.device))


def _prepared(runtime: Runtime, pipe: DiffusionPipeline) -> DiffusionPipeline:
    acceleration.prepare(pipe, runtime.device, runtime.settings)
    return pipe


def _as_task(base: DiffusionPipeline, task: Task, model_id: str) -> DiffusionPipeline:
    if task == "pix2pix":
        if isinstance(
            base, (StableDiffusionInstructPix2PixPipeline, StableDiffusionXLInstructPix2PixPipeline)
        ):
            return base
        if base.unet.config.in_channels == 8:  # a pix2pix UNet loaded under another class
            return _derived(base, StableDiffusionInstructPix2PixPipeline)
    elif task == "depth2img":
        if isinstance(base, StableDiffusionDepth2ImgPipeline):
            return base
    elif base.unet.config.in_channels in _CHANNELS["inpaint"]:
        if isinstance(base, StableDiffusionInpaintPipeline):
            return base
        return _derived(base, AutoPipelineForInpainting)
    raise ModelUnavailable(f"Model {model_id} is not {_LABELS[task]}.")


def _derived(base: DiffusionPipeline, cls) -> DiffusionPipeline:
    """`cls` over the base pipeline's components, made once per loaded base."""
    derived = base.__dict__.setdefault("_sdserve_editing", {})
    if cls not in derived:
        pipe = cls.from_pipe(base)
        pipe.set_progress_bar_config(disable=True)
        derived[cls] = pipe
    return derived[cls]


# ---- the tiny models ----------------------------------------------------------------------------


def ensure_tiny_edit_model(model_id: str, models_dir: Path) -> Path:
    """Build the tiny editing model into `models_dir/model_id` once; return the folder."""
    folder = models_dir / model_id
    if (folder / "model_index.json").exists():
        return folder
    base = StableDiffusionPipeline.from_pretrained(tiny.ensure_tiny_model("tiny-sd", models_dir))
    spec = TINY_EDIT_MODELS[model_id]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": spec.unet_channels})
    parts = {
        "vae": base.vae,
        "text_encoder": base.text_encoder,
        "tokenizer": base.tokenizer,
        "unet": unet,
        "scheduler": base.scheduler,
    }
    if spec.task == "pix2pix":
        pipe = StableDiffusionInstructPix2PixPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    elif spec.task == "depth2img":
        estimator, processor = _tiny_dpt()
        pipe = StableDiffusionDepth2ImgPipeline(
            **parts, depth_estimator=estimator, feature_extractor=processor
        )
    else:
        pipe = StableDiffusionInpaintPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    return tiny.publish_once(folder, pipe.save_pretrained)


def _tiny_dpt():
    """A non-hybrid ViT DPT (0.3 M parameters) and its processor, 64 px (families-notes §7)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor
    from transformers.utils import logging as hf_logging

    config = DPTConfig(
        image_size=64,
        patch_size=16,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        backbone_out_indices=(0, 1, 2, 3),
        neck_hidden_sizes=[16, 32, 64, 64],
        fusion_hidden_size=32,
        head_in_index=-1,
        is_hybrid=False,
    )
    torch.manual_seed(0)
    estimator = DPTForDepthEstimation(config).eval()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "falling back to DPTImageProcessorPil" without torchvision
    try:
        processor = DPTImageProcessor(
            do_resize=True,
            size={"height": 64, "width": 64},
            keep_aspect_ratio=False,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return estimator, processor


# ---- what the editing engines share -----------------------------------------------------------


class Progress:
    """Steps of several pipeline calls reported as one job's progress (done of `total`)."""

    def __init__(self, on_step, total: int):
        self.on_step, self.total, self.done = on_step, max(total, 1), 0

    def callback(self):
        """A diffusers `callback_on_step_end` that counts one step per call."""

        def step(_pipe, _index, _timestep, callback_kwargs):
            self.done += 1
            self.on_step(min(self.done, self.total), self.total)
            return callback_kwargs

        return step


class Screening:
    """The NSFW check of `safety_checker`, one NudeNet detector per process (engine.safety)."""

    def __init__(self, threshold: float):
        from sdserve.engine.safety import NsfwChecker

        self.checker = NsfwChecker(threshold)

    def screen(
        self, images: list[Image.Image], enabled: bool, kind: str
    ) -> tuple[list[Image.Image], list[bool]]:
        """Each image, or its replacement when flagged, and the flags."""
        from sdserve.engine.safety import replace_nsfw

        if not enabled:
            return images, [False] * len(images)
        flags = [self.checker.is_nsfw(image) for image in images]
        shown = [replace_nsfw(i, kind) if f else i for i, f in zip(images, flags, strict=True)]
        return shown, flags


def generators(seed: int, samples: int) -> list[torch.Generator]:
    """Sample i of a job uses seed + i, as the image family does: same seed, same pixels."""
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(samples)]

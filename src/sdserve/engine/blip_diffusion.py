"""BLIP-Diffusion (subject-driven generation): diffusers' `BlipDiffusionPipeline` for `zeroshot` and
its ControlNet twin for the controlnet tasks, with the transformers-5 patches of `blip_patches`.

The models: a built-in tiny one (random weights, a 4-level UNet, a tiny BLIP-2 Q-Former and a
canny ControlNet, built in code into the models dir) and the published repos by their catalogue
ids. diffusers cannot load these folders with `DiffusionPipeline.from_pretrained` (their
`model_index.json` names classes it does not export), so each is assembled from its components.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    BlipDiffusionControlNetPipeline,
    BlipDiffusionPipeline,
    ControlNetModel,
    PNDMScheduler,
    UNet2DConditionModel,
)
from diffusers.pipelines.deprecated.blip_diffusion import (
    Blip2QFormerModel,
    BlipImageProcessor,
    ContextCLIPTextModel,
)
from PIL import Image, ImageFilter, ImageOps
from pydantic import BaseModel, ConfigDict
from transformers import Blip2Config, CLIPTextConfig, CLIPTokenizer

from sdserve.engine import batching, blip_patches, tiny
from sdserve.engine.availability import hub_cached, is_offline
from sdserve.engine.base import EngineJob, EngineOutput, Runtime, one_by_one
from sdserve.engine.editing_outputs import generators, output_files, unet_steps
from sdserve.engine.registry import safe_id
from sdserve.engine.safety import NsfwChecker
from sdserve.errors import EngineError, ModelNotFound, ModelUnavailable, SdserveError
from sdserve.settings import Settings

Task = Literal["zeroshot", "controlnet_generation", "controlnet_scribble_generation"]
TASKS: tuple[str, ...] = ("zeroshot", "controlnet_generation", "controlnet_scribble_generation")
TINY_MODEL_ID = "tiny-blip-diffusion"
# Catalogue ids -> hub repos. The ControlNet repo serves the controlnet tasks, the other zeroshot.
HUB_MODELS = {
    "blip-diffusion": "Salesforce/blipdiffusion",
    "blipdiffusion": "Salesforce/blipdiffusion",
    "Salesforce/blipdiffusion": "Salesforce/blipdiffusion",
    "blip-diffusion-controlnet": "Salesforce/blipdiffusion-controlnet",
    "blipdiffusion-controlnet": "Salesforce/blipdiffusion-controlnet",
    "Salesforce/blipdiffusion-controlnet": "Salesforce/blipdiffusion-controlnet",
}
_SEED = 1


class BlipDiffusionParams(BaseModel):
    """What a blip_diffusion job asks of the engine (stored on the job)."""

    model_config = ConfigDict(extra="ignore")

    model_id: str
    task: Task
    prompt: str
    negative_prompt: str
    condition_subject: str
    target_subject: str
    width: int
    height: int
    samples: int
    steps: int
    guidance_scale: float
    seed: int
    prompt_strength: float = 1.0
    prompt_reps: int = 20
    safety_checker: bool = False
    safety_checker_type: str = "sensitive_content_text"

    @property
    def cost(self) -> float:
        return batching.cost(self.samples, self.steps, self.width, self.height)


# ---- where a model is ---------------------------------------------------------------------


def locate(model_id: str, settings: Settings) -> str:
    """The folder or hub repo of a BLIP-Diffusion model id (cheap: nothing is loaded)."""
    safe_id(model_id, "model_id")
    if model_id == TINY_MODEL_ID:
        return str(settings.models_dir / TINY_MODEL_ID)
    folder = settings.models_dir / model_id
    if (folder / "qformer").is_dir():
        return str(folder)
    if model_id in HUB_MODELS:
        return HUB_MODELS[model_id]
    raise ModelNotFound(model_id)


def check_available(model_id: str, task: str, settings: Settings) -> None:
    """At submit: the model exists, can be had here, and has a ControlNet if the task needs one."""
    location = locate(model_id, settings)
    if model_id == TINY_MODEL_ID:
        return
    if Path(location).is_dir():
        has_controlnet = (Path(location) / "controlnet").is_dir()
    else:
        if is_offline(settings) and not hub_cached(location):
            raise ModelUnavailable(
                f"Model {model_id} ({location} on the Hugging Face hub) is not downloaded and this "
                f"server is offline. Run `huggingface-cli download {location}` on a machine with "
                f"internet access, or put its folder at {settings.models_dir / model_id}"
            )
        has_controlnet = location.endswith("-controlnet")
    if task != "zeroshot" and not has_controlnet:
        raise ModelUnavailable(
            f"The {task} task needs a BLIP-Diffusion model with a ControlNet "
            f"(blip-diffusion-controlnet); {model_id} has none"
        )


# ---- the built-in tiny model ----------------------------------------------------------------


def _write_bert_vocab(folder: Path) -> Path:
    """A BERT word-piece vocabulary for the tiny Q-Former's tokenizer: special tokens, letters."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789"]
    words += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def _build_tiny(folder: Path) -> None:
    """The tiny model as a diffusers-style folder: tiny-sd's VAE and tokenizer, a 4-level UNet
    (the pipeline sizes latents by the UNet's depth, not the VAE's), and a Q-Former whose BERT
    tokenizer is written beside it."""
    sd = tiny.ensure_tiny_model("tiny-sd", folder.parent.parent)
    torch.manual_seed(_SEED)  # after tiny-sd, whose build (if it runs now) draws from the RNG
    tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    vocab = len(tokenizer)
    text_encoder = ContextCLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=16,
            projection_dim=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    )
    bert = _write_bert_vocab(folder / "qformer_tokenizer")
    qformer = Blip2QFormerModel(
        Blip2Config(
            vision_config=dict(
                hidden_size=16,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=56,
                patch_size=14,
                hidden_act="quick_gelu",
            ),
            qformer_config=dict(
                vocab_size=80,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=16,
                max_position_embeddings=128,
                cross_attention_frequency=1,
                encoder_hidden_size=16,
            ),
            num_query_tokens=4,
            tokenizer=str(bert),
        )
    )
    with torch.no_grad():
        # BLIP-2's initialisation leaves the query tokens at zero and its layers near it (trained
        # weights fill them): unit-scale random ones let the reference image reach the output.
        qformer.query_tokens.normal_(0, 1)
        for module in qformer.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, fan_in**-0.5)
    unet_config = dict(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D",),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    unet = UNet2DConditionModel(
        out_channels=4,
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * 3,
        sample_size=8,
        **unet_config,
    )
    controlnet = ControlNetModel(conditioning_embedding_out_channels=(8, 8, 8, 8), **unet_config)
    with torch.no_grad():  # a fresh ControlNet's zero convolutions would ignore the hint
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.1)
    text_encoder.save_pretrained(folder / "text_encoder")
    qformer.config.tokenizer = None  # set again at load: the folder may move
    qformer.save_pretrained(folder / "qformer")
    unet.save_pretrained(folder / "unet")
    controlnet.save_pretrained(folder / "controlnet")
    tokenizer.save_pretrained(folder / "tokenizer")
    AutoencoderKL.from_pretrained(sd / "vae").save_pretrained(folder / "vae")
    _scheduler().save_pretrained(folder / "scheduler")
    BlipImageProcessor(size={"height": 56, "width": 56}).save_pretrained(folder / "image_processor")


def _scheduler() -> PNDMScheduler:
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
    )


def ensure_tiny(models_dir: Path) -> Path:
    """Build the tiny model into `models_dir/tiny-blip-diffusion` once; return its folder."""
    folder = models_dir / TINY_MODEL_ID
    if (folder / "controlnet" / "config.json").exists():
        return folder
    return tiny.publish_once(folder, _build_tiny)


# ---- loading -----------------------------------------------------------------------------------


def load_pipeline(
    location: str, controlnet: bool, device: torch.device, dtype: torch.dtype, offline: bool
):
    """The zero-shot or ControlNet pipeline, assembled from the folder's or repo's components."""
    blip_patches.apply()
    local = Path(location).is_dir()
    common = {"local_files_only": offline} if not local else {}

    def part(cls, sub: str, **extra):
        return cls.from_pretrained(location, subfolder=sub, **common, **extra)

    bert = Path(location) / "qformer_tokenizer"
    # The Q-Former loads its BERT tokenizer while it is built: the tiny model's sits beside it;
    # the published model's is bert-base-uncased, from the Hugging Face cache.
    qformer_tokenizer = str(bert) if bert.is_dir() else "bert-base-uncased"
    components = dict(
        tokenizer=part(CLIPTokenizer, "tokenizer"),
        text_encoder=part(ContextCLIPTextModel, "text_encoder", dtype=dtype),
        vae=part(AutoencoderKL, "vae", dtype=dtype),
        unet=part(UNet2DConditionModel, "unet", dtype=dtype),
        scheduler=part(PNDMScheduler, "scheduler"),
        qformer=part(Blip2QFormerModel, "qformer", dtype=dtype, tokenizer=qformer_tokenizer),
        image_processor=part(BlipImageProcessor, "image_processor"),
    )
    if controlnet:
        components["controlnet"] = part(ControlNetModel, "controlnet", dtype=dtype)
        pipe = BlipDiffusionControlNetPipeline(**components)
    else:
        pipe = BlipDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def edge_hint(image: Image.Image, task: str) -> Image.Image:
    """The ControlNet hint: edges of the image for `controlnet_generation` (the canny model's
    input); for the scribble task the image is the scribble, white lines on black."""
    gray = ImageOps.grayscale(image)
    if task == "controlnet_scribble_generation":
        # a drawing on white paper is inverted: the model wants white strokes on black
        return (
            ImageOps.invert(gray).convert("RGB")
            if np.asarray(gray).mean() > 127
            else gray.convert("RGB")
        )
    edges = gray.filter(ImageFilter.FIND_EDGES)
    return edges.point(lambda v: 255 if v > 32 else 0).convert("RGB")


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


# ---- the engine --------------------------------------------------------------------------------


class BlipDiffusionEngine:
    """blip_diffusion jobs, one at a time (a job's samples share one run)."""

    kinds = ("blip_diffusion",)

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings = runtime.settings
        self._nsfw = NsfwChecker(self.settings.nsfw_threshold)
        self._lock = threading.Lock()

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        with self._lock:
            return one_by_one(jobs, self._run)

    def _pipeline(self, p: BlipDiffusionParams):
        controlnet = p.task != "zeroshot"

        def load():
            if p.model_id == TINY_MODEL_ID:
                location = str(ensure_tiny(self.settings.models_dir))
            else:
                location = locate(p.model_id, self.settings)
            try:
                return load_pipeline(
                    location,
                    controlnet,
                    self.runtime.device,
                    self.runtime.dtype,
                    is_offline(self.settings),
                )
            except Exception as exc:
                raise ModelUnavailable(f"Model {p.model_id} could not be loaded: {exc}") from exc

        key = f"{p.model_id}+blip{'-controlnet' if controlnet else ''}"
        return self.runtime.cache.get(key, load)

    def _run(self, job: EngineJob) -> EngineOutput:
        p = BlipDiffusionParams.model_validate(job.params)
        # 1. the model
        started = time.perf_counter()
        try:
            pipe = self._pipeline(p)
        except SdserveError:
            raise
        except Exception as exc:
            raise EngineError(f"Generation failed: {exc}") from exc
        loaded = time.perf_counter()
        # 2. the inputs, as the pipeline takes them (lists, one entry per sample)
        reference = job.image("condition_image")
        n = p.samples
        args = dict(
            prompt=[p.prompt] * n,
            reference_image=reference,
            source_subject_category=[p.condition_subject] * n,
            target_subject_category=[p.target_subject] * n,
            guidance_scale=p.guidance_scale,
            height=p.height,
            width=p.width,
            num_inference_steps=p.steps,
            generator=generators(p.seed, n),
            neg_prompt=p.negative_prompt,
            prompt_strength=p.prompt_strength,
            prompt_reps=p.prompt_reps,
            output_type="pt",  # its own PIL conversion goes through numpy: no bfloat16
        )
        if p.task != "zeroshot":
            args["condtioning_image"] = edge_hint(job.image("controlnet_condition_image"), p.task)
        # 3. the run, reporting each step
        try:
            with torch.no_grad(), unet_steps(pipe.unet, p.steps, job.events.step):
                images = _to_pil(pipe(**args).images)
        except SdserveError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError("Out of GPU memory: try a smaller size or fewer samples") from exc
        except Exception as exc:
            raise EngineError(f"Generation failed: {exc}") from exc
        done = time.perf_counter()
        checker = self._nsfw if p.safety_checker else None
        files = output_files(images, checker, p.safety_checker_type)
        stages = {"model_load": loaded - started, "denoise": done - loaded, "batch_size": 1}
        return EngineOutput(files, stages)

"""LoRA and Dreambooth fine-tuning on diffusers models: resumable, cancellable, registered at the end.

The loop follows diffusers' train_dreambooth(_lora) examples: frozen VAE latents, noise at a random
timestep, MSE on the scheduler's prediction target, prior preservation with class images made by
the base model. Mixed precision and gradient checkpointing come from accelerate and diffusers,
switched on only where a GPU makes them useful.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from PIL import Image, ImageOps
from pydantic import BaseModel
from safetensors.torch import save_file

from sdserve.engine.base import EngineJob, EngineOutput, Runtime, one_by_one
from sdserve.engine.prompts import encode_prompts
from sdserve.engine.registry import ModelRegistry
from sdserve.errors import EngineError, SdserveError
from sdserve.settings import Settings

# Attention, feed-forward, projections and resnet convolutions (kohya's "LoCon" set): attention
# alone barely moves small UNets.
_UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
]
_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


TrainingKind = Literal["lora", "dreambooth", "sandbox"]


class TrainingParams(BaseModel):
    """Effective, typed parameters of one training run, stored on its job."""

    training_id: str
    kind: TrainingKind
    base_model_id: str
    instance_prompt: str
    class_prompt: str
    negative_prompt: str
    training_type: str
    lora_type: Literal["lora", "loha", "lokr"]
    train_text_encoder: bool
    max_train_steps: int
    learning_rate_unet: float
    learning_rate_text_encoder: float
    steps_text_encoder: int
    seed: int
    prior_preservation: bool
    webhook: str | None


class TrainingCancelled(Exception):
    pass


@dataclass
class TrainingHooks:
    stage: Callable[[str, str], None]  # (stage, readable log line)
    step: Callable[[int, int], None]  # (steps done, total)
    cancelled: Callable[[], bool]


def prepare_images(images: list[Image.Image], resolution: int) -> list[Image.Image]:
    """Center crop to a square and resize to the base model's resolution."""
    return [
        ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.BICUBIC)
        for image in images
    ]


class Trainer:
    def __init__(self, settings: Settings, registry: ModelRegistry, device: torch.device):
        self.settings = settings
        self.registry = registry
        self.device = device

    def train(
        self, p: TrainingParams, images: list[Image.Image], workdir: Path, hooks: TrainingHooks
    ) -> str:
        """Run (or resume) a training; return the id under which the result is registered."""
        workdir.mkdir(parents=True, exist_ok=True)
        self._frozen_embeds: dict[str, dict[str, torch.Tensor]] = {}
        pipe = self.registry.load(
            self.registry.resolve(p.base_model_id), self.device, torch.float32
        )
        pipe.set_progress_bar_config(disable=True)
        resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        accelerator = Accelerator(mixed_precision=self._precision(), cpu=self.device.type == "cpu")
        if accelerator.device.type == "cuda":
            pipe.unet.enable_gradient_checkpointing()

        # 1. data: instance latents, and class latents for prior preservation
        generator = torch.Generator("cpu").manual_seed(p.seed)
        instance = self._latents(pipe, prepare_images(images, resolution), generator)
        classes = None
        if p.prior_preservation:
            class_images = self._class_images(pipe, p, workdir, resolution)
            classes = self._latents(pipe, class_images, generator)

        # 2. what trains
        unet, text_encoder = pipe.unet, pipe.text_encoder
        pipe.vae.requires_grad_(False)
        train_text = p.train_text_encoder and not _is_sdxl(pipe)
        if p.kind == "lora":
            unet.requires_grad_(False)
            text_encoder.requires_grad_(False)
            unet.add_adapter(
                _adapter_config(p.lora_type, self.settings.train_lora_rank, _UNET_TARGETS)
            )
            if train_text:
                text_encoder.add_adapter(
                    _adapter_config("lora", self.settings.train_lora_rank, _TEXT_TARGETS)
                )
        else:
            unet.requires_grad_(True)
            text_encoder.requires_grad_(train_text)
        unet_params = [q for q in unet.parameters() if q.requires_grad]
        text_params = (
            [q for q in text_encoder.parameters() if q.requires_grad] if train_text else []
        )
        groups = [{"params": unet_params, "lr": p.learning_rate_unet}]
        if text_params:
            groups.append({"params": text_params, "lr": p.learning_rate_text_encoder})
        optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)

        # 3. resume from the last checkpoint, if a previous worker got that far
        checkpoint = workdir / "checkpoint.pt"
        start = 0
        if checkpoint.exists():
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            _load_trainable(unet, state["unet"])
            if text_params:
                _load_trainable(text_encoder, state["text_encoder"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            start = state["step"]
            hooks.stage("training_started", f"resumed from the checkpoint at step {start}")
        else:
            hooks.stage(
                "training_started",
                f"{p.max_train_steps} steps on {len(images)} images at {resolution}px",
            )

        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        unet.train()

        # 4. the loop
        for step in range(start, p.max_train_steps):
            if hooks.cancelled():
                raise TrainingCancelled()
            text_on = bool(text_params) and step < p.steps_text_encoder
            with accelerator.autocast():
                loss = self._loss(
                    pipe,
                    unet,
                    noise_scheduler,
                    instance,
                    p.instance_prompt,
                    step,
                    generator,
                    text_on,
                )
                if classes is not None:
                    loss = loss + self._loss(
                        pipe,
                        unet,
                        noise_scheduler,
                        classes,
                        p.class_prompt,
                        step,
                        generator,
                        text_on,
                    )
            accelerator.backward(loss)
            if text_params and not text_on:
                for q in text_params:
                    q.grad = None  # its steps are over: v2's steps_text_encoder
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            hooks.step(step + 1, p.max_train_steps)
            if (
                step + 1
            ) % self.settings.train_checkpoint_every == 0 and step + 1 < p.max_train_steps:
                _save_checkpoint(
                    checkpoint,
                    step + 1,
                    unet,
                    text_encoder if text_params else None,
                    optimizer,
                    generator,
                )
        hooks.stage("training_success", f"finished {p.max_train_steps} steps")

        # 5. write and register the result
        unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        hooks.stage("trained_model_compressing", "collecting the trained weights")
        if p.kind == "lora":
            state = _lora_state(unet, text_encoder if text_params else None)
            hooks.stage(
                "trained_model_uploading", f"writing the {p.lora_type} adapter as .safetensors"
            )
            metadata = {"sdserve_adapter": p.lora_type, "rank": str(self.settings.train_lora_rank)}
            target = self._publish_lora(p.training_id, state, metadata)
        else:
            hooks.stage("trained_model_uploading", "writing the model as a diffusers folder")
            target = self._publish_model(p.training_id, pipe, unet, text_encoder)
        hooks.stage("trained_model_uploaded", f"written to {target.name}")
        hooks.stage("deploying_model", "registering the model id")
        shutil.rmtree(workdir, ignore_errors=True)
        hooks.stage("model_ready", "Model loaded successfully")
        return p.training_id

    def _precision(self) -> str:
        setting = self.settings.train_mixed_precision
        if setting != "auto":
            return setting
        if self.device.type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"

    def _latents(self, pipe, images: list[Image.Image], generator: torch.Generator) -> torch.Tensor:
        pixels = pipe.image_processor.preprocess(images).to(self.device, pipe.vae.dtype)
        with torch.no_grad():
            dist = pipe.vae.encode(pixels).latent_dist
        return (
            dist.sample(
                generator=generator.clone_state() if hasattr(generator, "clone_state") else None
            )
            * pipe.vae.config.scaling_factor
        )

    def _class_images(
        self, pipe, p: TrainingParams, workdir: Path, resolution: int
    ) -> list[Image.Image]:
        """Prior-preservation images of the class prompt, made by the base model once (kept on resume)."""
        folder = workdir / "class_images"
        existing = sorted(folder.glob("*.png"))
        if len(existing) >= self.settings.train_class_images:
            return [Image.open(path).convert("RGB") for path in existing]
        folder.mkdir(parents=True, exist_ok=True)
        made = []
        for i in range(self.settings.train_class_images):
            image = pipe(
                p.class_prompt,
                negative_prompt=p.negative_prompt or None,
                height=resolution,
                width=resolution,
                num_inference_steps=20,
                generator=torch.Generator("cpu").manual_seed(p.seed + i),
            ).images[0]
            image.save(folder / f"{i:03d}.png")
            made.append(image)
        return made

    def _loss(
        self, pipe, unet, noise_scheduler, latents, prompt, step, generator, text_on
    ) -> torch.Tensor:
        index = step % latents.shape[0]
        sample = latents[index : index + 1]
        noise = torch.randn(sample.shape, generator=generator).to(sample.device, sample.dtype)
        timestep = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (1,), generator=generator
        ).to(sample.device)
        noisy = noise_scheduler.add_noise(sample, noise, timestep)
        with torch.set_grad_enabled(text_on):
            embeds = (
                encode_prompts(pipe, [prompt], [""])
                if not text_on
                else _encode_with_grad(pipe, prompt)
            )
        kwargs = {}
        if _is_sdxl(pipe):
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            time_ids = torch.tensor(
                [[size, size, 0, 0, size, size]], device=sample.device, dtype=sample.dtype
            )
            kwargs["added_cond_kwargs"] = {
                "text_embeds": embeds["pooled_prompt_embeds"],
                "time_ids": time_ids,
            }
        prediction = unet(
            noisy, timestep, encoder_hidden_states=embeds["prompt_embeds"], **kwargs
        ).sample
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(sample, noise, timestep)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())

    def _publish_lora(
        self, training_id: str, state: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> Path:
        folder = self.settings.data_dir / "loras"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{training_id}.safetensors"
        partial = folder / f".{training_id}.partial"
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()}, partial, metadata=metadata
        )
        os.replace(partial, target)  # the id exists only once the file is whole
        return target

    def _publish_model(self, training_id: str, pipe: DiffusionPipeline, unet, text_encoder) -> Path:
        folder = self.settings.models_dir
        target = folder / training_id
        partial = folder / f".{training_id}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        trained = type(pipe).from_pipe(pipe, unet=unet, text_encoder=text_encoder)
        trained.save_pretrained(partial, safe_serialization=True)
        os.replace(partial, target)
        return target


def _is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _encode_with_grad(pipe: StableDiffusionPipeline, prompt: str) -> dict[str, torch.Tensor]:
    ids = pipe.tokenizer(
        prompt,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)
    return {"prompt_embeds": pipe.text_encoder(ids)[0]}


def _adapter_config(kind: str, rank: int, targets: list[str]):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if kind == "loha":
        return LoHaConfig(r=rank, alpha=rank, target_modules=targets)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=rank, target_modules=targets)
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)


def _trainable_state(module) -> dict[str, torch.Tensor]:
    return {
        name: q.detach().cpu().clone() for name, q in module.named_parameters() if q.requires_grad
    }


def _load_trainable(module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _save_checkpoint(path: Path, step: int, unet, text_encoder, optimizer, generator) -> None:
    partial = path.with_suffix(".partial")
    torch.save(
        {
            "step": step,
            "unet": _trainable_state(unet),
            "text_encoder": _trainable_state(text_encoder) if text_encoder is not None else {},
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
        },
        partial,
    )
    os.replace(partial, path)  # a kill mid-write leaves the previous checkpoint intact


def _lora_state(unet, text_encoder) -> dict[str, torch.Tensor]:
    """The adapters in kohya's format, which diffusers, A1111, ComfyUI and kohya all load."""
    from peft.utils import get_peft_model_state_dict

    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    if text_encoder is not None:
        state.update(
            {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(text_encoder).items()}
        )
    if any(".lora_A." in k or k.endswith(".lora_A.weight") for k in state):
        kohya = convert_state_dict_to_kohya(state)
        # transformers 5 dropped CLIP's `text_model.` level; kohya and A1111 keep it in the names.
        return {
            re.sub(r"^(lora_te[12]?_)(?!text_model_)", r"\1text_model_", key): value
            for key, value in kohya.items()
        }
    return state  # LoHa / LoKr: PEFT names; engine.images loads them through PEFT


SANDBOX_STAGES = (
    ("training_started", "sandbox: no GPU is used, stages are simulated"),
    ("training_success", "sandbox: simulated training done"),
    ("trained_model_compressing", "sandbox"),
    ("trained_model_uploading", "sandbox"),
    ("trained_model_uploaded", "sandbox"),
    ("deploying_model", "sandbox"),
    ("model_ready", "sandbox: no model was made"),
)


class TrainingEngine:
    """Trainings as jobs: one at a time, each reporting its stages and steps through the job."""

    kinds = ("train_lora", "train_dreambooth", "train_sandbox")

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings = runtime.settings
        self.trainer = Trainer(runtime.settings, runtime.registry, runtime.device)

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        return one_by_one(jobs, self._train)

    def _train(self, job: EngineJob) -> EngineOutput:
        params = TrainingParams.model_validate(job.params)
        events = job.events
        try:
            if job.kind == "train_sandbox":
                for name, line in SANDBOX_STAGES:
                    if events.cancelled():
                        raise TrainingCancelled()
                    events.stage(name, line)
            else:
                images = [job.image(name) for name in job.inputs.names()]
                hooks = TrainingHooks(stage=events.stage, step=events.step, cancelled=events.cancelled)
                workdir = self.settings.data_dir / "training" / params.training_id
                self.trainer.train(params, images, workdir, hooks)
                for made in (
                    self.settings.data_dir / "loras" / f"{params.training_id}.safetensors",
                    self.settings.models_dir / params.training_id,
                ):
                    storage = self.runtime.registry.storage
                    if made.exists() and storage is not None:  # for workers on other hosts
                        storage.publish_model_files(made)
        except TrainingCancelled:
            events.stage("training_cancelled", "stopped on request")
            raise EngineError("Training cancelled") from None
        except Exception as exc:
            message = (
                exc.message if isinstance(exc, SdserveError) else f"{type(exc).__name__}: {exc}"
            )
            events.stage("training_failed", message)
            raise
        return EngineOutput([], meta={"training_id": params.training_id, "model_id": params.training_id})

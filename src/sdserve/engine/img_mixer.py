"""Image mixer: several images and a prompt mixed by weight, with an IP-Adapter on any SD / SDXL model.

Each image is encoded by the adapter's CLIP vision model; the images' embeddings are averaged with
the request's weights (weighting each embedding alone would do nothing: the adapter's projection
ends in a LayerNorm) and the largest weight is the adapter's scale, how strongly the images steer
against the prompt. The adapter is loaded onto the model's UNet for the job and unloaded after, so
the model stays as other jobs expect it.

Adapters: a built-in tiny one for tiny-sd (random weights, built in code), and h94/IP-Adapter's
SD 1.5 and SDXL adapters for real models, from the Hugging Face cache.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoPipelineForText2Image
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from sdserve.engine import batching
from sdserve.engine.adapters import apply_loras
from sdserve.engine.base import EngineJob, EngineOutput, Runtime, one_by_one
from sdserve.engine.batching import step_reporters
from sdserve.engine.editing_outputs import generators, output_files
from sdserve.engine.registry import ModelRegistry
from sdserve.engine.safety import NsfwChecker
from sdserve.errors import (
    EngineError,
    ModelUnavailable,
    NotAvailable,
    SdserveError,
    ValidationFailed,
)

MAX_IMAGES = 4
TINY_ADAPTER = "tiny-ip-adapter"
LAMBDALABS_IDS = ("image-mixer", "lambdalabs/image-mixer")
_SEED = 0


@dataclass(frozen=True)
class Adapter:
    """Where an IP-Adapter's weights and its image encoder are: a local folder or a hub repo."""

    name: str
    location: str
    weight_name: str  # in `subfolder`
    subfolder: str = ""
    encoder_subfolder: str = "image_encoder"


# h94/IP-Adapter's adapters, by the base model's architecture.
HUB_ADAPTERS = {
    "sd15": Adapter("ip-adapter_sd15", "h94/IP-Adapter", "ip-adapter_sd15.safetensors", "models",
                    "models/image_encoder"),
    "sd2": None,
    "sdxl": Adapter("ip-adapter_sdxl", "h94/IP-Adapter", "ip-adapter_sdxl.safetensors",
                    "sdxl_models", "sdxl_models/image_encoder"),
}  # fmt: skip


class ImgMixerParams(BaseModel):
    """What an img_mixer job asks of the engine (stored on the job)."""

    model_config = ConfigDict(extra="ignore")

    model_id: str
    prompt: str
    negative_prompt: str
    weights: list[float] = Field(min_length=1, max_length=MAX_IMAGES)  # one per input image
    width: int
    height: int
    samples: int
    steps: int
    guidance_scale: float
    seed: int
    safety_checker: bool = False
    safety_checker_type: str = "sensitive_content_text"

    @property
    def cost(self) -> float:
        return batching.cost(self.samples, self.steps, self.width, self.height)


def image_input_names(count: int) -> list[str]:
    return [f"init_image_{i}" for i in range(count)]


# ---- which adapter a model takes ------------------------------------------------------------


def refuse_lambdalabs(model_id: str | None) -> None:
    if model_id in LAMBDALABS_IDS:
        raise NotAvailable(
            "The lambdalabs/image-mixer checkpoint (an LDM fine-tune, not a diffusers model) is "
            "not supported here: send an SD 1.5 or SDXL model_id, or none, and the images are "
            "mixed with an IP-Adapter"
        )


def adapter_for(model_id: str, registry: ModelRegistry, owner: str | None = None) -> Adapter:
    """The IP-Adapter that fits `model_id`, checked available (cheap: nothing is loaded)."""
    source = registry.resolve(model_id, owner)
    registry.check_available(source)
    if model_id == "tiny-sd":
        folder = registry.settings.models_dir / TINY_ADAPTER
        return Adapter(TINY_ADAPTER, str(folder), "ip_adapter.safetensors")
    adapter = HUB_ADAPTERS.get(registry.architecture(source) or "sd15")
    if adapter is None:
        raise ValidationFailed(
            {"model_id": [f"{model_id} has no IP-Adapter: use an SD 1.5 or SDXL model."]}
        )
    if registry.offline():
        from huggingface_hub import try_to_load_from_cache

        weights = f"{adapter.subfolder}/{adapter.weight_name}"
        if not isinstance(try_to_load_from_cache(adapter.location, weights), str):
            raise ModelUnavailable(
                f"The image mixer needs {adapter.location} ({weights}) for {model_id}; it is not "
                "downloaded and this server is offline. On a machine with internet access run "
                f"`huggingface-cli download {adapter.location} --include '{adapter.subfolder}/*'`"
            )
    return adapter


# ---- the built-in tiny adapter ----------------------------------------------------------------


def ensure_tiny_adapter(folder: Path, unet) -> Path:
    """A random IP-Adapter for tiny-sd's UNet and its CLIP image encoder, built once."""
    weights = folder / "ip_adapter.safetensors"
    if weights.exists():
        return folder
    torch.manual_seed(_SEED)
    embed_dim, cross, tokens = 32, unet.config.cross_attention_dim, 4
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=embed_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=32,
            patch_size=4,
        )
    )
    state = {
        "image_proj.proj.weight": torch.randn(tokens * cross, embed_dim) * 0.1,
        "image_proj.proj.bias": torch.zeros(tokens * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    # One key/value projection per cross-attention layer, numbered as diffusers numbers every
    # attention processor (self-attention ones are the even numbers).
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attention = unet.get_submodule(name.removesuffix(".processor"))
            hidden = attention.to_k.out_features
            state[f"ip_adapter.{index}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.1
            state[f"ip_adapter.{index}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.1
    staging = folder.with_name(f".{folder.name}-staging")
    staging.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(staging / "image_encoder")
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(staging / "image_encoder")
    save_file(state, staging / "ip_adapter.safetensors")
    try:
        staging.replace(folder)
    except OSError:
        if not weights.exists():  # not a lost race: a real failure
            raise
    return folder


# ---- the engine --------------------------------------------------------------------------------


class ImgMixerEngine:
    """img_mixer jobs, one at a time: the adapter goes onto the model's UNet and off again."""

    kinds = ("img_mixer",)

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self._nsfw = NsfwChecker(runtime.settings.nsfw_threshold)
        self._lock = threading.Lock()

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        with self._lock:
            return one_by_one(jobs, self._run)

    def _adapter_parts(self, adapter: Adapter, unet):
        """(state dict, image encoder, image processor), kept resident like a model."""

        def load():
            offline = self.runtime.registry.offline()
            if adapter.name == TINY_ADAPTER:
                ensure_tiny_adapter(Path(adapter.location), unet)
            local = Path(adapter.location).is_dir()
            hub = {} if local else {"local_files_only": offline}
            if local:
                state = load_file(Path(adapter.location) / adapter.subfolder / adapter.weight_name)
            else:
                from huggingface_hub import hf_hub_download

                state = load_file(
                    hf_hub_download(
                        adapter.location, adapter.weight_name, subfolder=adapter.subfolder, **hub
                    )
                )
            encoder = CLIPVisionModelWithProjection.from_pretrained(
                adapter.location,
                subfolder=adapter.encoder_subfolder,
                dtype=self.runtime.dtype,
                **hub,
            ).to(self.runtime.device)
            try:
                processor = CLIPImageProcessor.from_pretrained(
                    adapter.location, subfolder=adapter.encoder_subfolder, **hub
                )
            except OSError:  # h94's encoder folders have no preprocessor config: CLIP's defaults
                processor = CLIPImageProcessor()
            return _AdapterParts(state, encoder, processor)

        return self.runtime.cache.get(f"ip-adapter:{adapter.name}:{adapter.location}", load)

    def _run(self, job: EngineJob) -> EngineOutput:
        p = ImgMixerParams.model_validate(job.params)
        images = [job.image(name) for name in image_input_names(len(p.weights))]
        # 1. the model, its text-to-image pipeline, and the adapter that fits it
        started = time.perf_counter()
        base = self.runtime.pipeline(p.model_id)
        apply_loras(base, [], self.runtime.registry)  # none another job left active
        adapter = adapter_for(p.model_id, self.runtime.registry)
        parts = self._adapter_parts(adapter, base.unet)
        loaded = time.perf_counter()
        pipe = AutoPipelineForText2Image.from_pipe(base)
        pipe.set_progress_bar_config(disable=True)
        try:
            pipe.load_ip_adapter(
                {"image_proj": _prefixed(parts.state, "image_proj"),
                 "ip_adapter": _prefixed(parts.state, "ip_adapter")},
                subfolder="", weight_name="", image_encoder_folder=None,
            )  # fmt: skip
            try:
                result = self._mix(pipe, parts, p, images, job)
            finally:
                pipe.unload_ip_adapter()
        except SdserveError:
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError("Out of GPU memory: try a smaller size or fewer samples") from exc
        except Exception as exc:
            raise EngineError(f"Generation failed: {exc}") from exc
        done = time.perf_counter()
        checker = self._nsfw if p.safety_checker else None
        files = output_files(result, checker, p.safety_checker_type)
        stages = {"model_load": loaded - started, "denoise": done - loaded, "batch_size": 1}
        return EngineOutput(files, stages)

    @torch.no_grad()
    def _mix(self, pipe, parts: _AdapterParts, p: ImgMixerParams, images, job: EngineJob):
        # 2. the images' embeddings, mixed by weight; the largest weight is the adapter's scale
        pixels = parts.processor(images=images, return_tensors="pt").pixel_values
        encoder = parts.encoder
        embeds = encoder(pixels.to(encoder.device, encoder.dtype)).image_embeds
        weights = torch.tensor(p.weights, device=embeds.device, dtype=embeds.dtype)
        mixed = (weights[:, None] * embeds).sum(0, keepdim=True) / weights.sum()
        pipe.set_ip_adapter_scale(max(p.weights))
        guided = p.guidance_scale > 1
        embeds = torch.stack([torch.zeros_like(mixed), mixed]) if guided else mixed[None]
        # 3. the prompt's run, the adapter's embedding beside it
        return pipe(
            prompt=p.prompt,
            negative_prompt=p.negative_prompt or None,
            ip_adapter_image_embeds=[embeds],
            width=p.width,
            height=p.height,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            num_images_per_prompt=p.samples,
            generator=generators(p.seed, p.samples),
            callback_on_step_end=step_reporters([job.events.step]),
        ).images


@dataclass
class _AdapterParts:
    state: dict[str, torch.Tensor]
    encoder: CLIPVisionModelWithProjection
    processor: CLIPImageProcessor

    @property
    def components(self) -> dict:  # what the residency cache sizes
        return {"image_encoder": self.encoder}


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The part of a flat IP-Adapter state dict under `prefix.`, without it (diffusers' layout)."""
    return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}

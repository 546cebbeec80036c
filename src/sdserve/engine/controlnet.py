"""Runs ControlNet jobs (reference §8, and interior design §7/§16.5): one net or several, on
txt2img, img2img or inpaint pipelines (and their SDXL twins) derived from the resident base model.

A job's ControlNets are named by their ModelsLab ids (`canny`, `mlsd`, ...). For a built-in tiny
base each id is a tiny ControlNet built in code from that base's UNet; otherwise an id is looked
up as an imported `controlnet` model, then `DATA/controlnet/<id>` (a diffusers folder or a single
file), then the hub repo of the catalogue below. Nets are kept resident by the residency cache.
"""

from __future__ import annotations

import inspect
import json
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from pydantic import Field

from sdserve.engine import acceleration, batching, hints, tiny
from sdserve.engine.adapters import apply_loras
from sdserve.engine.base import EngineJob, EngineOutput, OutputFile
from sdserve.engine.batching import per_sample_guidance, step_reporters
from sdserve.engine.images import BatchItem, ImageEngine, ImageParams
from sdserve.engine.registry import ModelRegistry, safe_id
from sdserve.engine.schedulers import make_scheduler, resolve_scheduler_name
from sdserve.errors import EngineError, ModelUnavailable, SdserveError, ValidationFailed
from sdserve.media.images import encode_png

# The ControlNet ids of reference §8 (era A).
CONTROLNET_IDS = (
    "canny",
    "depth",
    "hed",
    "mlsd",
    "normal",
    "openpose",
    "scribble",
    "segmentation",
    "aesthetic-controlnet",
    "inpaint",
    "softedge",
    "lineart",
    "shuffle",
    "tile",
    "face_detector",
    "qrcode",
)
# Hub repos (and subfolders) of each id, per base architecture. The usual community mapping; the
# repos are not checked from here (no hub access): an operator may override any id by importing
# a `controlnet` model under that id or by putting it at DATA/controlnet/<id>.
HUB_CONTROLNETS: dict[str, dict[str, tuple[str, str | None]]] = {
    "sd15": {
        "canny": ("lllyasviel/control_v11p_sd15_canny", None),
        "depth": ("lllyasviel/control_v11f1p_sd15_depth", None),
        "hed": ("lllyasviel/control_v11p_sd15_softedge", None),
        "softedge": ("lllyasviel/control_v11p_sd15_softedge", None),
        "mlsd": ("lllyasviel/control_v11p_sd15_mlsd", None),
        "normal": ("lllyasviel/control_v11p_sd15_normalbae", None),
        "openpose": ("lllyasviel/control_v11p_sd15_openpose", None),
        "scribble": ("lllyasviel/control_v11p_sd15_scribble", None),
        "segmentation": ("lllyasviel/control_v11p_sd15_seg", None),
        "inpaint": ("lllyasviel/control_v11p_sd15_inpaint", None),
        "lineart": ("lllyasviel/control_v11p_sd15_lineart", None),
        "shuffle": ("lllyasviel/control_v11e_sd15_shuffle", None),
        "tile": ("lllyasviel/control_v11f1e_sd15_tile", None),
        "qrcode": ("monster-labs/control_v1p_sd15_qrcode_monster", "v2"),
        "face_detector": ("CrucibleAI/ControlNetMediaPipeFace", "diffusion_sd15"),
        "aesthetic-controlnet": ("krea/aesthetic-controlnet", None),
    },
    "sdxl": {
        "canny": ("diffusers/controlnet-canny-sdxl-1.0", None),
        "depth": ("diffusers/controlnet-depth-sdxl-1.0", None),
        "openpose": ("thibaud/controlnet-openpose-sdxl-1.0", None),
        "scribble": ("xinsir/controlnet-scribble-sdxl-1.0", None),
        "softedge": ("SargeZT/controlnet-sd-xl-1.0-softedge-dexined", None),
        "hed": ("SargeZT/controlnet-sd-xl-1.0-softedge-dexined", None),
        "tile": ("xinsir/controlnet-tile-sdxl-1.0", None),
        "qrcode": ("monster-labs/control_v1p_sdxl_qrcode_monster", None),
    },
}
_PIPELINES = {
    ("sd15", "text2img"): StableDiffusionControlNetPipeline,
    ("sd15", "img2img"): StableDiffusionControlNetImg2ImgPipeline,
    ("sd15", "inpaint"): StableDiffusionControlNetInpaintPipeline,
    ("sdxl", "text2img"): StableDiffusionXLControlNetPipeline,
    ("sdxl", "img2img"): StableDiffusionXLControlNetImg2ImgPipeline,
    ("sdxl", "inpaint"): StableDiffusionXLControlNetInpaintPipeline,
}
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".bin")


class ControlNetParams(ImageParams):
    """An image job guided by ControlNets. `kind` is the pipeline: text2img (the hint guides a new
    image), img2img (the init image is repainted) or inpaint (the masked part is)."""

    controlnets: list[str]
    conditioning_scales: list[float]
    # Per net: the preprocessor run on the init image (auto_hint), or None: the hint is given.
    hint_types: list[str | None] = Field(default_factory=list)
    guess_mode: bool = False
    # Interior: the mask is found by a text-prompted segmenter (object_removal), or the object
    # image is placed into the room before it is repainted (interior_mixer).
    object_name: str | None = None
    place_object: bool = False

    @property
    def batch_key(self) -> str:
        """The image batch key, the nets and guess mode. Hints, per-net scales, prompts, seeds
        and guidance stay each job's own."""
        return batching.batch_key(
            "controlnet", super().batch_key, ",".join(self.controlnets), self.guess_mode
        )


# ---- which ControlNet an id names ------------------------------------------------------------


@dataclass(frozen=True)
class NetSource:
    net_id: str
    kind: Literal["tiny", "folder", "file", "hub"]
    location: str  # tiny: the base model id; folder / file path; hub repo
    subfolder: str | None = None


def resolve_controlnet(
    registry: ModelRegistry,
    net_id: str,
    base_model_id: str,
    architecture: str | None,
    owner: str | None = None,
) -> NetSource:
    """Where the ControlNet `net_id` for `base_model_id` lives (cheap: done at submit too)."""
    safe_id(net_id, "controlnet_model")
    unknown = ValidationFailed(
        {
            "controlnet_model": [
                f"Unknown ControlNet model: {net_id}. Known ids: {', '.join(CONTROLNET_IDS)}."
            ]
        }
    )
    if base_model_id in tiny.TINY_MODELS:
        if net_id not in CONTROLNET_IDS:
            raise unknown
        return NetSource(net_id, "tiny", base_model_id)
    imported = registry.catalogue.get(net_id) if registry.catalogue else None
    if imported is not None and imported.category == "controlnet" and imported.visible_to(owner):
        path = registry.entry_path(imported.location)
        return NetSource(net_id, "folder" if path.is_dir() else "file", str(path))
    local = registry.data_dir / "controlnet"
    if (local / net_id / "config.json").is_file():
        return NetSource(net_id, "folder", str(local / net_id))
    for suffix in _CHECKPOINT_SUFFIXES:
        if (local / f"{net_id}{suffix}").is_file():
            return NetSource(net_id, "file", str(local / f"{net_id}{suffix}"))
    catalogue = HUB_CONTROLNETS.get("sdxl" if architecture == "sdxl" else "sd15", {})
    if net_id in catalogue:
        repo, subfolder = catalogue[net_id]
        return NetSource(net_id, "hub", repo, subfolder)
    if net_id in CONTROLNET_IDS:
        raise ValidationFailed(
            {
                "controlnet_model": [
                    f"There is no {net_id} ControlNet for {architecture or 'this'} models here. "
                    f"Import one with load_model (model_category controlnet, model_id {net_id})."
                ]
            }
        )
    raise unknown


def check_controlnet_available(registry: ModelRegistry, source: NetSource) -> None:
    """ModelUnavailable now, at submit, for a hub ControlNet an offline server does not have."""
    if source.kind != "hub" or not registry.offline():
        return
    from huggingface_hub import try_to_load_from_cache

    name = f"{source.subfolder}/config.json" if source.subfolder else "config.json"
    if not isinstance(try_to_load_from_cache(source.location, name), str):
        raise ModelUnavailable(
            f"ControlNet {source.net_id} ({source.location} on the Hugging Face hub) is not "
            "downloaded and this server is offline. On a machine with internet access run "
            f"`huggingface-cli download {source.location}`, or put the ControlNet at "
            f"{registry.data_dir / 'controlnet' / source.net_id} (a diffusers folder) or "
            f"{registry.data_dir / 'controlnet' / source.net_id}.safetensors"
        )


def load_controlnet(
    registry: ModelRegistry, source: NetSource, dtype: torch.dtype, unet_config: dict
) -> ControlNetModel:
    """The net of `source`; a single file is sized by the base's UNet (`unet_config`), as
    `ControlNetModel.from_unet` would make it, so no config is fetched from the hub."""
    check_controlnet_available(registry, source)
    try:
        if source.kind == "tiny":
            folder = ensure_tiny_controlnet(
                source.location, source.net_id, registry.settings.models_dir
            )
            return ControlNetModel.from_pretrained(folder, torch_dtype=dtype)
        if source.kind == "folder":
            return ControlNetModel.from_pretrained(source.location, torch_dtype=dtype)
        if source.kind == "file":
            return _single_file(Path(source.location), unet_config, dtype)
        return ControlNetModel.from_pretrained(
            source.location,
            subfolder=source.subfolder,
            torch_dtype=dtype,
            local_files_only=registry.offline(),
        )
    except ModelUnavailable:
        raise
    except Exception as exc:
        raise ModelUnavailable(f"ControlNet {source.net_id} could not be loaded: {exc}") from exc


def _single_file(path: Path, unet_config: dict, dtype: torch.dtype) -> ControlNetModel:
    """A ControlNet in one file: diffusers' own key layout (loaded as is) or the original one
    (`input_hint_block`, converted by diffusers' single-file loader)."""
    parameters = inspect.signature(ControlNetModel.__init__).parameters
    config = {key: value for key, value in unet_config.items() if key in parameters}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(path)
        if any(key.startswith("controlnet_cond_embedding.") for key in weights):
            net = ControlNetModel.from_config(config)
            net.load_state_dict(weights)
            return net.to(dtype)
    with tempfile.TemporaryDirectory(prefix="sdserve-controlnet-config-") as folder:
        config_file = Path(folder) / "config.json"
        config_file.write_text(json.dumps({"_class_name": "ControlNetModel", **config}))
        return ControlNetModel.from_single_file(str(path), config=folder, torch_dtype=dtype)


def ensure_tiny_controlnet(base_model_id: str, net_id: str, models_dir: Path) -> Path:
    """A tiny ControlNet for a tiny base, built once from its UNet (`ControlNetModel.from_unet`).

    from_unet starts the output convolutions at zero (a fresh ControlNet changes nothing until it
    is trained). Here they get small random weights, different for each id, and the net sees only
    the hint (its latent input convolution is zeroed), so that a hint really changes the image,
    as a trained net's does."""
    folder = models_dir / "tiny-controlnets" / base_model_id / net_id
    if (folder / "config.json").is_file():
        return folder
    unet = UNet2DConditionModel.from_pretrained(
        tiny.ensure_tiny_model(base_model_id, models_dir) / "unet"
    )
    generator = torch.Generator().manual_seed(zlib.crc32(net_id.encode()))
    net = ControlNetModel.from_unet(unet)
    hint_out = net.controlnet_cond_embedding.conv_out
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.2)
        fan_in = hint_out.weight[0].numel()
        hint_out.weight.copy_(
            torch.randn(hint_out.weight.shape, generator=generator) * 3 / fan_in**0.5
        )
        net.conv_in.weight.zero_()
        net.conv_in.bias.zero_()
    return tiny.publish_once(folder, net.save_pretrained)


# ---- the engine ------------------------------------------------------------------------------


@dataclass
class ControlItem(BatchItem):
    """One job of a batch, with a hint per net (images, or a tensor for the inpaint net)."""

    hints: list = field(default_factory=list)
    hint_seconds: float = 0.0


class ControlNetEngine(ImageEngine):
    """The image engine's batching, prompts, guidance and NSFW check, on ControlNet pipelines."""

    kinds = ("controlnet",)

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        outputs: list[EngineOutput | Exception | None] = [None] * len(jobs)
        items, indices = [], []
        for index, job in enumerate(jobs):
            try:
                items.append(self._prepare(job))
                indices.append(index)
            except Exception as exc:  # a job's own input: fails that job alone
                outputs[index] = (
                    exc
                    if isinstance(exc, SdserveError)
                    else EngineError(f"The hint could not be made: {exc}")
                )
        results = self.generate_batch(items) if items else []
        for index, item, result in zip(indices, items, results, strict=True):
            if isinstance(result, Exception):
                outputs[index] = result
                continue
            files = [
                OutputFile(encode_png(image), nsfw)
                for image, nsfw in zip(result.images, result.nsfw, strict=True)
            ]
            given = zip(item.params.controlnets, item.params.hint_types, strict=True)
            meta = {"hint_types": ["inpaint" if n == "inpaint" else t or "image" for n, t in given]}
            outputs[index] = EngineOutput(files, result.stages, meta)
        return outputs

    def _prepare(self, job: EngineJob) -> ControlItem:
        """The job's images at its size: init (with the object placed), mask, one hint per net."""
        p = ControlNetParams.model_validate(job.params)
        size = (p.width, p.height)
        init = job.image("init_image")
        control = job.image("control_image")
        mask = job.image("mask_image")
        started = time.perf_counter()
        if init is not None:
            init = init.resize(size, Image.LANCZOS)
        if p.place_object:
            init = place_object(init, job.image("object_image"))
        if p.object_name:
            from sdserve.engine.text_masks import text_mask

            mask = text_mask(p.object_name, init, p.model_id, self.settings.models_dir)
        if mask is not None:
            mask = mask.convert("L").resize(size, Image.NEAREST)
        given = (control or init).resize(size, Image.LANCZOS)
        item_hints = []
        for net_id, hint_type in zip(p.controlnets, p.hint_types, strict=True):
            if net_id == "inpaint":  # the inpaint net's hint is always the masked init image
                item_hints.append(hints.make_hint("inpaint", init, p.seed, mask))
            elif hint_type is None:
                item_hints.append(given)
            else:
                item_hints.append(hints.make_hint(hint_type, init, p.seed, mask))
        return ControlItem(
            p, init, mask, job.events.step, item_hints, time.perf_counter() - started
        )

    def _shared_pipeline(self, first: ControlNetParams):  # type: ignore[override]
        """The base with the batch's LoRAs and embedding, its nets (resident), and the task's
        ControlNet pipeline over the same components; a fresh scheduler every batch."""
        started = time.perf_counter()
        base = self.pipeline(first.model_id)
        apply_loras(base, first.loras, self.registry)
        if first.embeddings_model:
            self._ensure_embedding(base, first.embeddings_model)
        architecture = "sdxl" if "XL" in type(base).__name__ else "sd15"
        nets = [
            self._net(first.model_id, net_id, architecture, dict(base.unet.config))
            for net_id in first.controlnets
        ]
        model_load = time.perf_counter() - started
        overrides = {}
        if first.vae:
            path = self.registry.resolve_vae(first.vae)
            overrides["vae"] = self.cache.get(
                f"vae:{first.vae}:{first.model_id}",
                lambda: self.registry.load_vae(path, base.vae, self.dtype).to(self.device),
            )
        # from_pipe shares the base's modules: nothing is copied or reloaded. The last one made
        # is kept with the base (one slot: it holds its nets, which the cache may evict).
        key = (first.kind, tuple(id(net) for net in nets), id(overrides.get("vae")))
        pipe = base.__dict__.get("_sdserve_controlnet", (None, None))
        pipe = pipe[1] if pipe[0] == key else None
        if pipe is None:
            pipe = _PIPELINES[(architecture, first.kind)].from_pipe(
                base, controlnet=nets if len(nets) > 1 else nets[0], **overrides
            )
            pipe.set_progress_bar_config(disable=True)
            base.__dict__["_sdserve_controlnet"] = (key, pipe)
        choice = resolve_scheduler_name(
            first.scheduler, first.use_karras_sigmas, first.algorithm_type
        )
        pipe.scheduler = make_scheduler(base.scheduler.config, choice)
        if self.device.type == "cuda":
            acceleration.tile_vae_for(pipe, first.width, first.height, self.settings)
        return pipe, model_load

    def _net(
        self, base_model_id: str, net_id: str, architecture: str, unet_config: dict
    ) -> ControlNetModel:
        source = resolve_controlnet(self.registry, net_id, base_model_id, architecture)
        key = f"controlnet:{net_id}:{base_model_id}"
        return self.cache.get(
            key,
            lambda: load_controlnet(self.registry, source, self.dtype, unet_config).to(self.device),
        )

    def _call(self, pipe, items: list[ControlItem], embeds: list[dict]):  # type: ignore[override]
        """The diffusers call for several jobs: samples concatenated, a hint per sample and net,
        guidance per sample."""
        first = items[0].params
        per_sample = [(item, i) for item in items for i in range(item.params.samples)]
        generators = [
            torch.Generator("cpu").manual_seed(it.params.seed + i) for it, i in per_sample
        ]
        kwargs: dict = {key: torch.cat([e[key] for e in embeds]) for key in embeds[0]}
        scales = [it.params.guidance_scale for it, _ in per_sample]
        net_scales = [it.params.conditioning_scales for it, _ in per_sample]
        top_scales = [max(column) for column in zip(*net_scales, strict=True)]
        # per net, one tensor of every sample's hint (multi-ControlNet takes no nested lists)
        net_hints = [
            torch.stack([_hint_tensor(it.hints[n]) for it, _ in per_sample])
            for n in range(len(first.controlnets))
        ]
        hint_arg = net_hints if len(net_hints) > 1 else net_hints[0]
        kwargs.update(
            num_inference_steps=first.steps,
            guidance_scale=max(scales),
            generator=generators,
            output_type="np",
            controlnet_conditioning_scale=top_scales if len(top_scales) > 1 else top_scales[0],
            guess_mode=first.guess_mode,
        )
        if first.kind == "text2img":
            kwargs.update(image=hint_arg, width=first.width, height=first.height)
        else:
            kwargs.update(
                image=[it.init for it, _ in per_sample],
                control_image=hint_arg,
                strength=first.strength,
            )
        if first.kind == "inpaint":
            kwargs.update(
                mask_image=[it.mask for it, _ in per_sample], width=first.width, height=first.height
            )
        marks: list[float] = []
        kwargs["callback_on_step_end"] = step_reporters(
            [item.on_step for item in items if item.on_step is not None], marks
        )
        nets = getattr(pipe.controlnet, "nets", [pipe.controlnet])
        hooks = [per_sample_guidance(pipe.unet, scales), *per_sample_control(nets, net_scales)]
        started = time.perf_counter()
        try:
            images = pipe(**kwargs).images
        finally:
            for hook in filter(None, hooks):
                hook.remove()
        ended = time.perf_counter()
        denoised = marks[-1] if marks else ended
        hint = sum(item.hint_seconds for item in items) / len(items)
        return images, {"hint": hint, "denoise": denoised - started, "decode": ended - denoised}


def per_sample_control(nets: list, net_scales: list[list[float]]) -> list:
    """Each sample's own scale per net, inside one pipeline call.

    The pipeline gives every net one scale: the largest the batch asked for. A hook on each net
    whose samples differ rescales each sample's residuals by its own scale / that one (the
    unconditional half too, as the pipeline repeats the control input for guidance)."""
    hooks = []
    for index, net in enumerate(nets):
        column = [scales[index] for scales in net_scales]
        if len(set(column)) <= 1 or max(column) <= 0:
            continue
        ratio = torch.tensor(column, dtype=torch.float32) / max(column)

        def hook(_module, _args, _kwargs, output, ratio=ratio):
            down, mid = output[0], output[1]
            weights = ratio.repeat(down[0].shape[0] // len(ratio)).to(mid.device, mid.dtype)
            weights = weights.view(-1, 1, 1, 1)
            return ([sample * weights for sample in down], mid * weights, *output[2:])

        hooks.append(net.register_forward_hook(hook, with_kwargs=True))
    return hooks


def _hint_tensor(hint: Image.Image | torch.Tensor) -> torch.Tensor:
    """A hint as (3, H, W) in [0, 1] (the inpaint hint has -1 where the mask is)."""
    if isinstance(hint, torch.Tensor):
        return hint[0]
    pixels = np.asarray(hint.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def place_object(room: Image.Image | None, obj: Image.Image | None) -> Image.Image:
    """interior_mixer: the object image, a third of the room's width, standing on the lower
    middle of the room (white backgrounds of product shots become transparent)."""
    if room is None or obj is None:
        raise EngineError("interior_mixer needs init_image (the room) and object_image")
    room = room.convert("RGB").copy()
    width = max(8, room.width // 3)
    height = max(8, round(obj.height * width / max(obj.width, 1)))
    height = min(height, room.height * 2 // 3)
    obj = obj.convert("RGB").resize((width, height), Image.LANCZOS)
    pixels = np.asarray(obj).astype(np.int16)
    alpha = np.where(pixels.min(axis=2) > 240, 0, 255).astype(np.uint8)
    left = (room.width - width) // 2
    top = room.height - height - room.height // 10
    room.paste(obj, (left, max(0, top)), Image.fromarray(alpha, "L"))
    return room

"""Single-file checkpoints (original LDM / A1111 layout, `.safetensors` or `.ckpt`): load and export."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import (
    infer_diffusers_model_type,
    load_single_file_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from sdserve.errors import ModelUnavailable

# Config folders of the public diffusers repos, without weights or the (shared) BPE files:
# sd15 = stable-diffusion-v1-5/stable-diffusion-v1-5, sd2 = stabilityai/stable-diffusion-2-1,
# sdxl = stabilityai/stable-diffusion-xl-base-1.0, and their inpainting twins.
CONFIGS_DIR = Path(__file__).parent / "configs"
CLIP_TOKENIZER_DIR = CONFIGS_DIR / "clip-tokenizer"
FAMILIES = ("sd15", "sd15-inpaint", "sd2", "sd2-inpaint", "sdxl", "sdxl-inpaint")
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "sd15": StableDiffusionPipeline,
    "sd15-inpaint": StableDiffusionInpaintPipeline,
    "sd2": StableDiffusionPipeline,
    "sd2-inpaint": StableDiffusionInpaintPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sdxl-inpaint": StableDiffusionXLInpaintPipeline,
}
# diffusers' names for the same models; it answers "v1" and "inpainting" for anything it does not
# recognise, so those two are settled from the key layout instead.
_DIFFUSERS_TYPES = {
    "v2": "sd2",
    "inpainting_v2": "sd2-inpaint",
    "xl_base": "sdxl",
    "xl_inpaint": "sdxl-inpaint",
}
_FALLBACK_TYPES = ("v1", "inpainting")

_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_SD1_CLIP = "cond_stage_model.transformer.text_model."
_SD2_CLIP = "cond_stage_model.model."
_XL_CLIP_L = "conditioner.embedders.0.transformer.text_model."
_XL_CLIP_G = "conditioner.embedders.1.model."


# ---- detection -------------------------------------------------------------------------------


def detect_architecture(checkpoint: Mapping[str, torch.Tensor]) -> str:
    """The family ("sd15", "sd2", "sdxl", each maybe "-inpaint") of an original-layout state dict."""
    try:
        model_type = infer_diffusers_model_type(checkpoint)
    except (KeyError, IndexError, AttributeError):  # half-matching keys of some other model
        model_type = None
    if model_type in _DIFFUSERS_TYPES:
        return _DIFFUSERS_TYPES[model_type]
    if model_type is not None and model_type not in _FALLBACK_TYPES:
        raise ModelUnavailable(
            f"Unsupported checkpoint: it is a {model_type!r} model; only Stable Diffusion 1.x, "
            "2.x and SDXL base checkpoints (and their inpainting versions) can be loaded"
        )
    return _family_from_layout(checkpoint)


def _family_from_layout(checkpoint: Mapping[str, torch.Tensor]) -> str:
    # Small or unusual models (the tiny test models, pruned files) miss the keys diffusers probes.
    conv_in = checkpoint.get(_UNET + "input_blocks.0.0.weight")
    keys = list(checkpoint)
    if conv_in is None or conv_in.ndim != 4:
        family = None
    elif any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        family = "sdxl"
    elif any(k.startswith(_SD2_CLIP) for k in keys):
        family = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in keys):
        family = "sd15"
    else:
        family = None
    if family is None:
        raise ModelUnavailable(
            "Unsupported checkpoint: not a Stable Diffusion 1.x, 2.x or SDXL single file "
            "(no UNet and text encoder in the original layout)"
        )
    return family + "-inpaint" if conv_in.shape[1] == 9 else family


def detect_file_architecture(path: Path) -> str:
    """`detect_architecture` of a checkpoint file; safetensors files are probed without reading them whole."""
    _check_file(path)
    if path.suffix != ".safetensors":
        return detect_architecture(_read_checkpoint(path))
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:
        raise ModelUnavailable(f"Checkpoint {path.name} could not be read: {exc}") from exc
    with handle:
        return detect_architecture(_LazyTensors(handle))


class _LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors of an open safetensors file, each read only when asked for."""

    def __init__(self, handle) -> None:
        self._handle = handle
        self._keys = set(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise ModelUnavailable(f"Checkpoint {path} does not exist")
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ModelUnavailable(f"Checkpoint {path.name} is not a .safetensors or .ckpt file")


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    # diffusers' own reader: pickles are opened with weights_only, so a .ckpt cannot run code.
    try:
        return load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelUnavailable(
            f"Checkpoint {path.name} could not be read: {exc}. Pickled .ckpt files may only hold "
            "tensors; convert others to .safetensors"
        ) from exc


# ---- loading ---------------------------------------------------------------------------------


def config_folder(family: str) -> Path:
    """The shipped diffusers config folder (no weights) for one of `FAMILIES`."""
    if family not in FAMILIES:
        raise ModelUnavailable(f"No shipped config for model family {family!r}")
    return CONFIGS_DIR / family


def config_tokenizer(config_dir: Path, name: str = "tokenizer") -> CLIPTokenizer:
    """The CLIP tokenizer of a config folder; folders without BPE files get the shared CLIP ones."""
    folder = config_dir / name
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(folder)
    settings_file = folder / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    # Only the special tokens and length matter: CLIP's normaliser lowercases by itself.
    keep = ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length")
    return CLIPTokenizer.from_pretrained(
        CLIP_TOKENIZER_DIR, **{k: settings[k] for k in keep if k in settings}
    )


def load_single_file(
    path: Path, *, config_dir: Path | None = None, torch_dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Load an original-layout checkpoint as a diffusers pipeline, offline, safety checker off."""
    family = detect_file_architecture(path)
    config = config_dir if config_dir is not None else config_folder(family)
    # from_single_file downloads configs when `config` is not a folder: never let it get there.
    if not (config / "model_index.json").is_file():
        raise ModelUnavailable(f"Config folder {config} has no model_index.json")
    components: dict[str, object] = dict(_tokenizers(config))
    if not family.startswith("sdxl"):
        components |= {"safety_checker": None, "feature_extractor": None}
        components["requires_safety_checker"] = False
    try:
        return PIPELINES[family].from_single_file(
            str(path),
            config=str(config),
            local_files_only=True,
            torch_dtype=torch_dtype,
            **components,
        )
    except Exception as exc:
        raise ModelUnavailable(
            f"Checkpoint {path.name} could not be loaded as {family}: {exc}"
        ) from exc


def _tokenizers(config_dir: Path) -> dict[str, CLIPTokenizer]:
    index = json.loads((config_dir / "model_index.json").read_text())
    return {
        name: config_tokenizer(config_dir, name)
        for name in ("tokenizer", "tokenizer_2")
        if isinstance(index.get(name), list) and index[name][0] is not None
    }


# ---- export: diffusers -> original layout ----------------------------------------------------


def export_single_file(pipe: DiffusionPipeline, path: Path) -> None:
    """Write an SD 1.x / 2.x / SDXL pipeline as one original-layout `.safetensors` or `.ckpt`."""
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"export to .safetensors or .ckpt, not {path.suffix or 'no suffix'}")
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    for model in [pipe.unet, *encoders]:
        if model is not None and any("lora_" in k or "base_layer" in k for k in model.state_dict()):
            raise ValueError("fuse or unload LoRA adapters before exporting a checkpoint")
    state = _prefixed(_UNET, _unet_to_ldm(pipe.unet)) | _prefixed(_VAE, _vae_to_ldm(pipe.vae))
    if encoders[1] is not None:
        state |= _prefixed(_XL_CLIP_L, _hf_clip(encoders[0]))
        state |= _prefixed(_XL_CLIP_G, _hf_to_open_clip(encoders[1]))
    elif (
        encoders[0].config.hidden_act == "gelu"
    ):  # SD 2's OpenCLIP-H; OpenAI's CLIP-L uses quick_gelu
        state |= _prefixed(_SD2_CLIP, _hf_to_open_clip(encoders[0]))
    else:
        state |= _prefixed(_SD1_CLIP, _hf_clip(encoders[0]))
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _renamed(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    # Longest matching diffusers prefix wins, so "down_blocks.1.resnets.0." beats "down_blocks.1.".
    out = {}
    for key, value in state.items():
        prefix = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
        if prefix is None:
            raise ValueError(f"no original-layout name for {key}")
        out[prefixes[prefix] + key[len(prefix) :]] = value
    return out


_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}


def _unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """UNet keys in LDM's numbering (input_blocks / middle_block / output_blocks), from its config."""
    config = unet.config
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.attentions.0.": "middle_block.1.",
    }
    resnets = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    layers = config.layers_per_block
    last = len(config.block_out_channels) - 1
    index = 1
    for i, block in enumerate(config.down_block_types):
        for j in range(layers):
            resnets[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{index}.0."
            if "CrossAttn" in block:
                prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{index}.1."
            index += 1
        if i < last:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{index}.0.op."
            index += 1
    index = 0
    for i, block in enumerate(config.up_block_types):
        attention = "CrossAttn" in block
        for j in range(layers + 1):
            resnets[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{index}.0."
            if attention:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{index}.1."
            index += 1
        if i < last:
            slot = 2 if attention else 1
            prefixes[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{index - 1}.{slot}."
    for diffusers, ldm in resnets.items():
        prefixes |= {diffusers + part: ldm + new for part, new in _UNET_RESNET.items()}
    # Transformer blocks keep their inner names in both layouts.
    return _renamed(unet.state_dict(), prefixes)


_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    last = len(vae.config.block_out_channels) - 1
    prefixes = {}
    for side in ("encoder", "decoder"):
        prefixes[f"{side}.conv_norm_out."] = f"{side}.norm_out."
        for j in (0, 1):
            prefixes[f"{side}.mid_block.resnets.{j}."] = f"{side}.mid.block_{j + 1}."
        for part, ldm in _VAE_ATTENTION.items():
            prefixes[f"{side}.mid_block.attentions.0.{part}"] = f"{side}.mid.attn_1.{ldm}"
    for i in range(last + 1):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        # LDM numbers the decoder's levels from the bottom.
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{last - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{last - i}.upsample."
    for name in ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."):
        prefixes.setdefault(name, name)
    out = {}
    for key, value in _renamed(vae.state_dict(), prefixes).items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in key and value.ndim == 2:  # LDM's VAE attention uses 1x1 convolutions
            value = value[:, :, None, None]
        out[key] = value
    return out


def _text_state(text_encoder) -> dict[str, torch.Tensor]:
    # transformers 5 flattened CLIPTextModel; CLIPTextModelWithProjection still nests text_model.
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def _hf_clip(text_encoder) -> dict[str, torch.Tensor]:
    """OpenAI CLIP-L as transformers names it below `text_model.` (what SD 1.x / SDXL files hold)."""
    return _text_state(text_encoder)


def _hf_to_open_clip(text_encoder) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower (SD 2's ViT-H, SDXL's bigG): fused qkv, resblocks, transposed projection."""
    state = _text_state(text_encoder)
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T
    parts = {
        "self_attn.out_proj.": "attn.out_proj.",
        "layer_norm1.": "ln_1.",
        "layer_norm2.": "ln_2.",
        "mlp.fc1.": "mlp.c_fc.",
        "mlp.fc2.": "mlp.c_proj.",
    }
    for i in range(text_encoder.config.num_hidden_layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{hf}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(qkv)
            for part, ldm in parts.items():
                out[oc + ldm + kind] = state[hf + part + kind]
    return out

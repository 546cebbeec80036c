"""Single-file checkpoints (original LDM / A1111 layout, `.safetensors` or `.ckpt`): load and export.

Loading goes through diffusers' `from_single_file` with config folders shipped in
`engine/configs` (SD 1.5, SD 2.1, SDXL base, and their inpainting twins), so it never needs the
hub. Exporting writes the inverse layout, so models made or trained here open in A1111 and can be
loaded back (the tests make their checkpoints this way).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import load_file, save_file

from sdserve.errors import ModelUnavailable

CONFIGS = Path(__file__).parent / "configs"
FAMILIES = ("sd15", "sd15-inpaint", "sd2", "sd2-inpaint", "sdxl", "sdxl-inpaint")
_PIPELINES = {
    "sd15": StableDiffusionPipeline,
    "sd15-inpaint": StableDiffusionInpaintPipeline,
    "sd2": StableDiffusionPipeline,
    "sd2-inpaint": StableDiffusionInpaintPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sdxl-inpaint": StableDiffusionXLInpaintPipeline,
}
_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_CLIP = "cond_stage_model.transformer.text_model."
_XL_CLIP_L = "conditioner.embedders.0.transformer.text_model."
_XL_CLIP_G = "conditioner.embedders.1.model."


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a .safetensors or .ckpt file (pickles load with weights_only)."""
    if not path.is_file():
        raise ModelUnavailable(f"Checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("state_dict", state)
    except Exception as exc:
        raise ModelUnavailable(f"Checkpoint {path.name} could not be read: {exc}") from exc


def detect_family(checkpoint: dict) -> str:
    """sd15 / sd2 / sdxl, with an `-inpaint` suffix for 9-channel UNets; by the keys present."""
    if _XL_CLIP_G + "token_embedding.weight" in checkpoint or any(
        k.startswith("conditioner.embedders.1.") for k in checkpoint
    ):
        family = "sdxl"
    elif any(k.startswith("cond_stage_model.model.") for k in checkpoint):
        family = "sd2"
    elif any(k.startswith("cond_stage_model.transformer.") for k in checkpoint):
        family = "sd15"
    else:
        raise ModelUnavailable(
            "Unsupported checkpoint: not a Stable Diffusion 1.x, 2.x or SDXL single file"
        )
    conv_in = checkpoint.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] == 9:
        family += "-inpaint"
    return family


def config_folder(family: str) -> Path:
    """A complete diffusers config folder (no weights) for a shipped family, made once per process."""
    base = family.removesuffix("-inpaint")
    target = Path(tempfile.gettempdir()) / "sdserve-configs" / family
    if (target / "model_index.json").exists():
        return target
    staging = Path(
        tempfile.mkdtemp(
            prefix=f".{family}-", dir=target.parent if target.parent.exists() else None
        )
    )
    shutil.copytree(CONFIGS / base, staging / "folder")
    folder = staging / "folder"
    pad = "<|endoftext|>" if base == "sd15" else "!"
    tokenizers = [("tokenizer", pad if base == "sd2" else "<|endoftext|>")]
    if base == "sdxl":
        tokenizers.append(("tokenizer_2", "!"))
    for name, pad_token in tokenizers:
        shutil.copytree(CONFIGS / "clip-tokenizer", folder / name)
        (folder / name / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": 77, "pad_token": pad_token, "do_lower_case": True})
        )
    if family.endswith("-inpaint"):
        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        unet_config["in_channels"] = 9
        (folder / "unet" / "config.json").write_text(json.dumps(unet_config))
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = _PIPELINES[family].__name__
        (folder / "model_index.json").write_text(json.dumps(index))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.rename(target)
    except OSError:  # another process made it first
        pass
    shutil.rmtree(staging, ignore_errors=True)
    return target


def load_single_file(
    path: Path, *, config_dir: Path | None = None, torch_dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Load a checkpoint file as a diffusers pipeline, offline."""
    family = detect_family(read_checkpoint(path))
    config = config_dir or config_folder(family)
    pipeline_class = _PIPELINES[family]
    try:
        return pipeline_class.from_single_file(
            str(path),
            config=str(config),
            local_files_only=True,
            torch_dtype=torch_dtype,
            **({} if family.startswith("sdxl") else {"safety_checker": None}),
        )
    except Exception as exc:
        raise ModelUnavailable(f"Checkpoint {path.name} could not be loaded: {exc}") from exc


# ---- export: diffusers -> original layout ---------------------------------------------------


def export_single_file(pipe: DiffusionPipeline, path: Path) -> None:
    """Write `pipe` (SD 1.x or SDXL) as one original-layout checkpoint, .safetensors or .ckpt."""
    if any("lora_" in key or "base_layer" in key for key in pipe.unet.state_dict()):
        raise ValueError("fuse or unload LoRA adapters before exporting a checkpoint")
    state: dict[str, torch.Tensor] = {}
    state.update({_UNET + k: v for k, v in _unet_to_ldm(pipe.unet).items()})
    state.update({_VAE + k: v for k, v in _vae_to_ldm(pipe.vae).items()})
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update({_XL_CLIP_L + k: v for k, v in _hf_clip(pipe.text_encoder).items()})
        state.update({_XL_CLIP_G + k: v for k, v in _hf_to_open_clip(pipe.text_encoder_2).items()})
    else:
        state.update({_CLIP + k: v for k, v in _hf_clip(pipe.text_encoder).items()})
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)


def _unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """Rename diffusers UNet keys to LDM ones, walking the block layout of the config."""
    config = unet.config
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    layers = config.layers_per_block
    last = len(config.block_out_channels) - 1
    index = 1
    for i, block in enumerate(config.down_block_types):
        for j in range(layers):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{index}.0."
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
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{index}.0."
            if attention:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{index}.1."
            if j == layers and i < last:
                prefixes[f"up_blocks.{i}.upsamplers.0."] = (
                    f"output_blocks.{index}.{2 if attention else 1}."
                )
            index += 1
    resnet_parts = {
        "norm1.": "in_layers.0.",
        "conv1.": "in_layers.2.",
        "norm2.": "out_layers.0.",
        "conv2.": "out_layers.3.",
        "time_emb_proj.": "emb_layers.1.",
        "conv_shortcut.": "skip_connection.",
    }
    out = {}
    for key, value in unet.state_dict().items():
        prefix = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
        if prefix is None:
            raise ValueError(f"UNet key without an LDM name: {key}")
        rest = key[len(prefix) :]
        if ".resnets." in prefix:
            for part, ldm in resnet_parts.items():
                if rest.startswith(part):
                    rest = ldm + rest[len(part) :]
                    break
        out[prefixes[prefix] + rest] = value
    return out


def _vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    last = len(vae.config.block_out_channels) - 1
    renames = [("conv_shortcut.", "nin_shortcut."), ("conv_norm_out.", "norm_out.")]
    attention_parts = {
        "group_norm.": "norm.",
        "to_q.": "q.",
        "to_k.": "k.",
        "to_v.": "v.",
        "to_out.0.": "proj_out.",
    }
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        for side in ("encoder", "decoder"):
            new = new.replace(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.")
            new = new.replace(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.")
        for i in range(last + 1):
            new = new.replace(
                f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                f"encoder.down.{i}.downsample.conv.",
            )
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            # the decoder's blocks are numbered from the bottom in LDM
            new = new.replace(
                f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{last - i}.upsample.conv."
            )
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{last - i}.block.")
        for old, ldm in renames:
            new = new.replace(old, ldm)
        if ".mid_block.attentions.0." in new:
            new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
            for part, ldm in attention_parts.items():
                new = new.replace(".attn_1." + part, ".attn_1." + ldm)
            if value.ndim == 2:  # LDM's attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out[new] = value
    return out


def _hf_clip(text_encoder) -> dict[str, torch.Tensor]:
    """CLIP-L keys as transformers 4.x named them (what A1111 files hold)."""
    state = text_encoder.state_dict()
    if any(k.startswith("text_model.") for k in state):
        return {k.removeprefix("text_model."): v for k, v in state.items()}
    return dict(state)


def _hf_to_open_clip(text_encoder) -> dict[str, torch.Tensor]:
    """SDXL's second encoder in OpenCLIP layout: fused qkv, resblocks, transposed projection."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    for i in range(text_encoder.config.num_hidden_layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = torch.cat(
                [state[hf + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[oc + f"attn.out_proj.{kind}"] = state[hf + f"self_attn.out_proj.{kind}"]
            out[oc + f"ln_1.{kind}"] = state[hf + f"layer_norm1.{kind}"]
            out[oc + f"ln_2.{kind}"] = state[hf + f"layer_norm2.{kind}"]
            out[oc + f"mlp.c_fc.{kind}"] = state[hf + f"mlp.fc1.{kind}"]
            out[oc + f"mlp.c_proj.{kind}"] = state[hf + f"mlp.fc2.{kind}"]
    return out

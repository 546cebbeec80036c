"""Single-file checkpoints: export to the original layout, load back offline, shipped config folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdserve.engine.checkpoints import (
    FAMILIES,
    config_folder,
    detect_family,
    export_single_file,
    load_single_file,
    read_checkpoint,
)
from sdserve.errors import ModelUnavailable


def _image(pipe) -> np.ndarray:
    return pipe(
        "a fox",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.mark.parametrize(
    "model_id,cls,family",
    [
        ("tiny-sd", StableDiffusionPipeline, "sd15"),
        ("tiny-sdxl", StableDiffusionXLPipeline, "sdxl"),
    ],
)
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_export_and_load_back(tiny_models_dir, tmp_path, model_id, cls, family, suffix):
    pipe = cls.from_pretrained(tiny_models_dir / model_id)
    path = tmp_path / f"model{suffix}"
    export_single_file(pipe, path)
    assert detect_family(read_checkpoint(path)) == family
    loaded = load_single_file(path, config_dir=tiny_models_dir / model_id)
    assert type(loaded) is cls
    assert np.abs(_image(pipe) - _image(loaded)).max() <= 1 / 255


def test_bad_files(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_single_file(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelUnavailable, match="could not be read"):
        load_single_file(junk)
    with pytest.raises(ModelUnavailable, match="Unsupported checkpoint"):
        detect_family({"some.other.weight": torch.zeros(1)})


def test_inpaint_checkpoints_are_recognised():
    keys = {
        "cond_stage_model.transformer.text_model.x": torch.zeros(1),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3),
    }
    assert detect_family(keys) == "sd15-inpaint"


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_config_folders_build_the_real_models(family):
    folder = config_folder(family)
    unet_config = UNet2DConditionModel.load_config(folder / "unet")
    with init_empty_weights():  # real shapes, no memory
        unet = UNet2DConditionModel.from_config(unet_config)
        AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    expected_in = 9 if family.endswith("inpaint") else 4
    assert unet.config.in_channels == expected_in
    params = sum(p.numel() for p in unet.parameters())
    assert {"sd15": 859e6, "sd2": 865e6, "sdxl": 2567e6}[
        family.removesuffix("-inpaint")
    ] == pytest.approx(params, rel=0.01)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77

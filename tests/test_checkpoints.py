"""Single-file checkpoints: export to the original layout, load back offline, shipped config folders."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
)

from sdserve.engine import checkpoints
from sdserve.engine.checkpoints import (
    FAMILIES,
    PIPELINES,
    config_folder,
    config_tokenizer,
    detect_architecture,
    detect_file_architecture,
    export_single_file,
    load_single_file,
)
from sdserve.errors import ModelUnavailable

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" in CLIP's real BPE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models are tiny: extra threads only spin-wait, which is slow when the cores are busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(pipe: DiffusionPipeline) -> np.ndarray:
    extra = {}
    if isinstance(pipe, StableDiffusionInpaintPipeline | StableDiffusionXLInpaintPipeline):
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        extra = {
            "image": Image.new("RGB", (64, 64), (200, 80, 40)),
            "mask_image": Image.fromarray(mask),
        }
    return pipe(
        "a fox",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **extra,
    ).images


def _save_variant(source: Path, target: Path, *, inpaint: bool = False, sd2: bool = False) -> None:
    """A tiny SD 2 or inpainting model: the tiny model with the parts those families change."""
    base = DiffusionPipeline.from_pretrained(source)
    parts = dict(base.components)
    torch.manual_seed(1)
    if inpaint:
        parts["unet"] = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    if sd2:  # OpenCLIP text encoder (gelu), linear transformer projections, v-prediction
        config = CLIPTextConfig.from_dict(
            {**base.text_encoder.config.to_dict(), "hidden_act": "gelu"}
        )
        parts["text_encoder"] = CLIPTextModel(config)
        parts["unet"] = UNet2DConditionModel.from_config(
            {**base.unet.config, "use_linear_projection": True}
        )
        parts["scheduler"] = type(base.scheduler).from_config(
            base.scheduler.config, prediction_type="v_prediction"
        )
    xl = isinstance(base, StableDiffusionXLPipeline)
    cls = {
        (False, False): StableDiffusionPipeline,
        (False, True): StableDiffusionInpaintPipeline,
        (True, True): StableDiffusionXLInpaintPipeline,
    }[(xl, inpaint)]
    if not xl:
        parts["requires_safety_checker"] = False
    cls(**parts).save_pretrained(target)


@pytest.fixture(scope="module")
def models(tiny_models_dir, tmp_path_factory) -> Path:
    """tiny-sd and tiny-sdxl, plus tiny SD 2 and inpainting variants built from them."""
    folder = tmp_path_factory.mktemp("checkpoint-models")
    for model_id in ("tiny-sd", "tiny-sdxl"):
        (folder / model_id).symlink_to(tiny_models_dir / model_id)
    _save_variant(folder / "tiny-sd", folder / "tiny-sd2", sd2=True)
    _save_variant(folder / "tiny-sd", folder / "tiny-sd-inpaint", inpaint=True)
    _save_variant(folder / "tiny-sdxl", folder / "tiny-sdxl-inpaint", inpaint=True)
    return folder


ROUND_TRIPS = [
    ("tiny-sd", "sd15", ".safetensors"),
    ("tiny-sd", "sd15", ".ckpt"),
    ("tiny-sdxl", "sdxl", ".safetensors"),
    ("tiny-sdxl", "sdxl", ".ckpt"),
    ("tiny-sd2", "sd2", ".safetensors"),
    ("tiny-sd-inpaint", "sd15-inpaint", ".safetensors"),
    ("tiny-sdxl-inpaint", "sdxl-inpaint", ".ckpt"),
]


@pytest.mark.parametrize("model_id,family,suffix", ROUND_TRIPS)
def test_export_and_load_back(models, tmp_path, model_id, family, suffix):
    pipe = DiffusionPipeline.from_pretrained(models / model_id)
    path = tmp_path / f"model{suffix}"
    export_single_file(pipe, path)

    loaded = load_single_file(path, config_dir=models / model_id)
    assert type(loaded) is type(pipe) is PIPELINES[family]
    assert np.abs(_image(pipe) - _image(loaded)).max() <= 1 / 255


@pytest.mark.parametrize("model_id,family,suffix", ROUND_TRIPS)
def test_detect_architecture_of_exported_checkpoints(models, tmp_path, model_id, family, suffix):
    path = tmp_path / f"model{suffix}"
    export_single_file(DiffusionPipeline.from_pretrained(models / model_id), path)
    if suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, weights_only=True)["state_dict"]
    assert detect_architecture(state) == family
    assert detect_file_architecture(path) == family


def test_original_key_names(models, tmp_path):
    # Names as in the public v1-5-pruned / sd_xl_base_1.0 files, numbered for the tiny layout
    # (one resnet per level, two levels: input_blocks 1-3, output_blocks 0-3).
    export_single_file(DiffusionPipeline.from_pretrained(models / "tiny-sd"), tmp_path / "sd.ckpt")
    sd = torch.load(tmp_path / "sd.ckpt", weights_only=True)["state_dict"]
    for key in (
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",
        "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    ):
        assert key in sd, key
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    with pytest.raises(ValueError, match="safetensors or .ckpt"):
        export_single_file(
            DiffusionPipeline.from_pretrained(models / "tiny-sd"), tmp_path / "x.bin"
        )
    export_single_file(
        DiffusionPipeline.from_pretrained(models / "tiny-sdxl"), tmp_path / "xl.safetensors"
    )
    xl = load_file(tmp_path / "xl.safetensors")
    for key in (
        "model.diffusion_model.label_emb.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.positional_embedding",
    ):
        assert key in xl, key


def test_shipped_configs_are_used_without_a_config_dir(models, tmp_path, monkeypatch):
    path = tmp_path / "sd2.safetensors"
    export_single_file(DiffusionPipeline.from_pretrained(models / "tiny-sd2"), path)
    calls = []
    monkeypatch.setattr(
        StableDiffusionPipeline, "from_single_file", lambda *a, **kw: calls.append((a, kw))
    )
    load_single_file(path)
    ((_, kwargs),) = calls
    assert kwargs["config"] == str(checkpoints.CONFIGS_DIR / "sd2")
    assert kwargs["local_files_only"] is True
    assert kwargs["safety_checker"] is None and kwargs["requires_safety_checker"] is False
    assert kwargs["tokenizer"].pad_token == "!"


class _Evil:
    def __reduce__(self):
        return (print, ("pickles must not run",))


def test_bad_files(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_single_file(tmp_path / "missing.safetensors")
    for name in ("junk.safetensors", "junk.ckpt"):
        (tmp_path / name).write_bytes(b"\x00" * 64)
        with pytest.raises(ModelUnavailable, match="could not be read"):
            load_single_file(tmp_path / name)
    torch.save({"state_dict": {"x": _Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(ModelUnavailable, match="could not be read"):
        load_single_file(tmp_path / "evil.ckpt")
    with pytest.raises(ModelUnavailable, match="Unsupported checkpoint"):
        detect_architecture({"some.other.weight": torch.zeros(1)})
    with pytest.raises(ModelUnavailable, match="Unsupported checkpoint: it is a 'xl_refiner'"):
        detect_architecture({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": 0})


def test_detect_architecture_of_full_size_key_layouts():
    # The keys and shapes diffusers probes in the public files; meta tensors cost no memory.
    def meta(*shape):
        return torch.empty(shape, device="meta")

    unet, sd2_to_k = (
        "model.diffusion_model.",
        "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
    )
    xl_g = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
    sd1 = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": meta(768)}
    cases = [
        ({unet + "input_blocks.0.0.weight": meta(320, 4, 3, 3), **sd1}, "sd15"),
        ({unet + "input_blocks.0.0.weight": meta(320, 9, 3, 3), **sd1}, "sd15-inpaint"),
        ({unet + sd2_to_k: meta(320, 1024)}, "sd2"),
        (
            {
                unet + sd2_to_k: meta(320, 1024),
                unet + "input_blocks.0.0.weight": meta(320, 9, 3, 3),
            },
            "sd2-inpaint",
        ),
        ({xl_g: meta(1280)}, "sdxl"),
        ({xl_g: meta(1280), unet + "input_blocks.0.0.weight": meta(320, 9, 3, 3)}, "sdxl-inpaint"),
    ]
    for state, family in cases:
        assert detect_architecture(state) == family


def test_missing_config_dir_is_refused_before_any_download(models, tmp_path):
    path = tmp_path / "sd.safetensors"
    export_single_file(DiffusionPipeline.from_pretrained(models / "tiny-sd"), path)
    with pytest.raises(ModelUnavailable, match="no model_index.json"):
        load_single_file(path, config_dir=tmp_path / "nowhere")


# Real parameter counts of the public models' UNets and text encoders.
UNET_PARAMS = {"sd15": 859.5e6, "sd2": 865.9e6, "sdxl": 2567.5e6}
TEXT_PARAMS = {"sd15": [123.1e6], "sd2": [340.4e6], "sdxl": [123.1e6, 694.7e6]}


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_config_folders_build_the_real_models(family):
    folder = config_folder(family)
    base = family.removesuffix("-inpaint")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family].__name__

    with init_empty_weights():  # real shapes, no memory
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if base == "sdxl":
            config_2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            encoders.append(CLIPTextModelWithProjection(config_2))
    assert unet.config.in_channels == (9 if family.endswith("inpaint") else 4)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(UNET_PARAMS[base], rel=1e-3)
    counts = [sum(p.numel() for p in e.parameters()) for e in encoders]
    assert counts == pytest.approx(TEXT_PARAMS[base], rel=1e-3)
    assert unet.config.cross_attention_dim == sum(e.config.hidden_size for e in encoders)

    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["_class_name"] == index["scheduler"][1]
    getattr(diffusers, index["scheduler"][1]).from_config(scheduler_config)
    v_model = family == "sd2"  # 2.1 is a v-model; 2-inpainting was resumed from 2-base (epsilon)
    assert scheduler_config.get("prediction_type", "epsilon") == (
        "v_prediction" if v_model else "epsilon"
    )

    for name, pad in [("tokenizer", "!" if base == "sd2" else "<|endoftext|>")] + (
        [("tokenizer_2", "!")] if base == "sdxl" else []
    ):
        tokenizer = config_tokenizer(folder, name)
        assert tokenizer("a photo of a cat").input_ids == CAT_IDS
        assert (tokenizer.model_max_length, tokenizer.pad_token) == (77, pad)
        assert len(tokenizer) == encoders[0].config.vocab_size == 49408

"""Engine features through the real server: LoRA, embeddings, VAE, clip_skip, schedulers, prompt syntax,
and models from a local diffusers folder or a single checkpoint file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import decode_png, write_lora
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import save_file

BODY = {
    "model_id": "tiny-sd",
    "prompt": "a red fox",
    "width": 64,
    "height": 64,
    "num_inference_steps": 3,
    "safety_checker": "no",
    "enhance_prompt": "no",
    "seed": 99,
}


def pixels(server, key, **change) -> np.ndarray:
    data = server.post("/api/v4/dreambooth", {"key": key, **BODY, **change}).json()
    assert data["status"] == "success", data
    return np.asarray(decode_png(data["output"][0]), dtype=np.int16)


def differs(a, b) -> bool:
    return np.abs(a - b).max() > 2


def same(a, b) -> bool:
    return np.abs(a - b).max() <= 1


@pytest.fixture(scope="module")
def tiny_pipe(tiny_models_dir):
    return StableDiffusionPipeline.from_pretrained(tiny_models_dir / "tiny-sd")


def test_lora_and_multi_lora(server, user_key, tiny_pipe):
    loras = server.data_dir / "loras"
    loras.mkdir(exist_ok=True)
    write_lora(tiny_pipe, loras / "style-a.safetensors", 1)
    write_lora(tiny_pipe, loras / "style-b.safetensors", 2)
    base = pixels(server, user_key)
    a = pixels(server, user_key, lora_model="style-a")
    a_weak = pixels(server, user_key, lora_model="style-a", lora_strength="0.3")
    both = pixels(server, user_key, lora_model="style-a,style-b", lora_strength="0.45,0.55")
    assert differs(base, a) and differs(a, a_weak) and differs(a, both)
    assert same(base, pixels(server, user_key))  # adapters are switched off again
    assert same(a, pixels(server, user_key, lora_model="style-a"))


def test_embedding(server, user_key, tiny_pipe):
    folder = server.data_dir / "embeddings"
    folder.mkdir(exist_ok=True)
    dim = tiny_pipe.text_encoder.config.hidden_size
    save_file(
        {"emb_params": torch.randn(2, dim, generator=torch.Generator().manual_seed(3)) * 3},
        folder / "fox-style.safetensors",
    )
    plain = pixels(server, user_key, prompt="a fox-style fox")
    styled = pixels(server, user_key, prompt="a fox-style fox", embeddings_model="fox-style")
    assert differs(plain, styled)


def test_custom_vae(server, user_key, tiny_pipe):
    torch.manual_seed(5)
    vae = AutoencoderKL.from_config(tiny_pipe.vae.config)
    vae.save_pretrained(server.data_dir / "vae" / "other-vae")
    assert differs(pixels(server, user_key), pixels(server, user_key, vae="other-vae"))


def test_clip_skip(server, user_key):
    assert differs(pixels(server, user_key, clip_skip=1), pixels(server, user_key, clip_skip=2))


@pytest.mark.parametrize(
    "name,expected",
    [
        ("EulerAncestralDiscreteScheduler", "EulerAncestralDiscreteScheduler"),
        ("DDIMScheduler", "DDIMScheduler"),
        ("DPM++ 2M Karras", "DPMSolverMultistepScheduler"),
        ("Euler a", "EulerAncestralDiscreteScheduler"),
        ("LCMScheduler", "LCMScheduler"),
    ],
)
def test_scheduler_names(server, user_key, name, expected):
    data = server.post("/api/v4/dreambooth", {"key": user_key, **BODY, "scheduler": name}).json()
    assert data["status"] == "success", data
    assert data["meta"]["scheduler"] == expected


def test_dpmsolver_sde_variant(server, user_key):
    plain = pixels(server, user_key, scheduler="DPMSolverMultistepScheduler")
    sde = pixels(
        server, user_key, scheduler="DPMSolverMultistepScheduler", algorithm_type="dpmsolver+++"
    )
    assert differs(plain, sde)


def test_a1111_weighting_and_long_prompts(server, user_key):
    plain = pixels(server, user_key, prompt="a red fox")
    assert differs(plain, pixels(server, user_key, prompt="a (red:1.6) fox"))
    assert differs(plain, pixels(server, user_key, prompt="a ((red)) fox"))
    long_prompt = "a red fox " + ", ".join(["in a snowy forest at dawn"] * 8)  # > 77 tokens
    assert len(long_prompt) > 150
    tail_changed = long_prompt + ", purple"
    assert differs(
        pixels(server, user_key, prompt=long_prompt), pixels(server, user_key, prompt=tail_changed)
    )


def test_local_folder_and_single_file_models(server, user_key, tiny_models_dir):
    from sdserve.engine.checkpoints import export_single_file

    models = server.data_dir / "models"
    shutil.copytree(tiny_models_dir / "tiny-sd", models / "my-folder-model")
    fresh = StableDiffusionPipeline.from_pretrained(tiny_models_dir / "tiny-sd")
    export_single_file(fresh, server.data_dir / "my-checkpoint.safetensors")
    export_single_file(fresh, server.data_dir / "my-checkpoint.ckpt")
    catalogue = {
        "my-file-model": {
            "source": str(server.data_dir / "my-checkpoint.safetensors"),
            "config": str(tiny_models_dir / "tiny-sd"),
        },
        "my-ckpt-model": {
            "source": str(server.data_dir / "my-checkpoint.ckpt"),
            "config": str(tiny_models_dir / "tiny-sd"),
        },
    }
    (server.data_dir / "models.json").write_text(json.dumps(catalogue))

    reference = pixels(server, user_key)
    for model_id in ("my-folder-model", "my-file-model", "my-ckpt-model"):
        assert same(reference, pixels(server, user_key, model_id=model_id)), model_id
    listed = {
        m["model_id"]
        for m in server.post("/api/v4/dreambooth/model_list", {"key": user_key}).json()
    }
    assert {"my-folder-model", "my-file-model", "my-ckpt-model"} <= listed


def test_a_lora_named_twice_is_one_adapter_with_the_strengths_added(server, user_key, tiny_pipe):
    loras = server.data_dir / "loras"
    loras.mkdir(exist_ok=True)
    write_lora(tiny_pipe, loras / "style-twice.safetensors", 3)
    twice = pixels(server, user_key, lora_model="style-twice,style-twice", lora_strength="0.5,0.5")
    once = pixels(server, user_key, lora_model="style-twice", lora_strength="1")
    assert same(twice, once)

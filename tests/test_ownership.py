"""Trained and imported assets are their owner's: another key cannot see or use them; the admin can."""

from __future__ import annotations

import base64
import io
import time

import pytest
from conftest import ADMIN_KEY, create_key, wait_for_job
from PIL import Image

GEN = {
    "prompt": "photo of sks widget",
    "width": 64,
    "height": 64,
    "num_inference_steps": 1,
    "safety_checker": "no",
}


def _image() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (220, 20, 20)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _train(server, key, path, **extra) -> str:
    body = {
        "key": key,
        "instance_prompt": "photo of sks widget",
        "class_prompt": "photo of widget",
        "images": [_image()] * 4,
        "training_type": "null",
        "seed": 1,
        **extra,
    }
    answer = server.post(path, body).json()
    assert answer["status"] == "success", answer
    return answer["training_id"]


def _wait_trained(server, key, training_id, timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = server.post(f"/api/v3/fine_tune_status/{training_id}", {"key": key}).json()
        if status["messege"] in ("model_ready", "training_failed"):
            assert status["messege"] == "model_ready", status
            return
        time.sleep(0.2)
    raise AssertionError(f"training {training_id} did not finish")


@pytest.fixture(scope="module")
def assets(server):
    """Key A's trained LoRA and Dreambooth model, and private imports of both."""
    a, b = create_key(server.data_dir), create_key(server.data_dir)
    lora = _train(server, a, "/api/v3/lora_fine_tune", base_model_type="normal", max_train_steps=2)
    dreambooth = _train(server, a, "/api/v3/fine_tune_v2", base_model_id="tiny-sd", steps_unet=2)
    for training_id in (lora, dreambooth):
        _wait_trained(server, a, training_id)
    imports = {}
    for name, source, category in (
        ("lora", lora, "lora"),
        ("model", dreambooth, "stable_diffusion"),
    ):
        model_id = f"private-{name}-{lora.lower()}"
        answer = server.post(
            "/api/v3/load_model",
            {
                "key": a,
                "url": source,
                "model_id": model_id,
                "model_category": category,
                "model_visibility": "private",
            },
        ).json()
        assert answer["status"] == "success", answer
        assert wait_for_job(server, a, answer["id"])["status"] == "success"
        imports[f"private_{name}"] = model_id
    return {"a": a, "b": b, "lora": lora, "dreambooth": dreambooth, **imports}


def _refused(response, *fragments: str) -> str:
    data = response.json()
    assert data["status"] == "error", data
    assert all(f in data["message"] for f in fragments), data
    return data["message"]


def test_another_key_cannot_use_the_owners_loras(server, assets):
    for lora in (assets["lora"], assets["private_lora"]):
        for path in ("/api/v3/text2img", "/api/v4/dreambooth"):
            body = {"key": assets["b"], **GEN, "model_id": "tiny-sd", "lora_model": lora}
            _refused(server.post(path, body), "LoRA model not found", lora)
        video = {"key": assets["b"], **GEN, "model_id": "tiny-sd", "lora_model": lora}
        _refused(server.post("/api/v4/dreambooth/text2video", {**video, "num_frames": 2}), lora)


def test_another_key_cannot_use_the_owners_models(server, assets):
    for model_id in (assets["dreambooth"], assets["private_model"]):
        body = {"key": assets["b"], **GEN, "model_id": model_id}
        _refused(server.post("/api/v4/dreambooth", body), "Model not found")
        video = {**body, "num_frames": 2}
        _refused(server.post("/api/v4/dreambooth/text2video", video), "Model not found")
        reload = {"key": assets["b"], "model_id": model_id}
        _refused(server.post("/api/v4/dreambooth/model_reload", reload), "Model not found")
        train = {
            "key": assets["b"],
            "instance_prompt": "photo of sks widget",
            "class_prompt": "photo of widget",
            "images": [_image()] * 4,
            "base_model_id": model_id,
            "max_train_steps": 1,
        }
        _refused(server.post("/api/v3/fine_tune_v2", train), "Model not found")
        load = {
            "key": assets["b"],
            "url": "http://127.0.0.1:9/x.safetensors",
            "model_id": f"copy-{model_id.lower()}",
            "config_model_id": model_id,
        }
        _refused(server.post("/api/v3/load_model", load), "Model not found")


def test_model_list_shows_each_key_its_own(server, assets):
    def listed(key):
        answer = server.post("/api/v4/dreambooth/model_list", {"key": key}).json()
        return {m["model_id"] for m in answer}

    mine = {assets["dreambooth"], assets["private_model"]}
    assert mine <= listed(assets["a"])
    assert not mine & listed(assets["b"])
    assert "tiny-sd" in listed(assets["b"])
    assert mine <= listed(ADMIN_KEY)


def test_owner_and_admin_still_use_them(server, assets):
    for key in (assets["a"], ADMIN_KEY):
        for lora in (assets["lora"], assets["private_lora"]):
            body = {"key": key, **GEN, "model_id": "tiny-sd", "lora_model": lora}
            assert server.post("/api/v4/dreambooth", body).json()["status"] == "success"
        for model_id in (assets["dreambooth"], assets["private_model"]):
            body = {"key": key, **GEN, "model_id": model_id}
            assert server.post("/api/v4/dreambooth", body).json()["status"] == "success"
            reload = {"key": key, "model_id": model_id}
            assert server.post("/api/v4/dreambooth/model_reload", reload).json()["status"] == (
                "success"
            )

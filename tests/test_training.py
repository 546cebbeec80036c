"""Training through a real server: stages and webhooks, learnability, use of the results, cancel, delete,
resume after SIGKILL, bad input."""

from __future__ import annotations

import base64
import io
import signal
import time

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    ServerProcess,
    WebhookReceiver,
    create_key,
    decode_png,
    start_worker,
    wait_for_job,
)
from diffusers import StableDiffusionPipeline
from PIL import Image

RED = (220, 20, 20)
PROMPT = "photo of sks widget"


def image_data(color=RED, size=(80, 72)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def train_body(**extra) -> dict:
    return {
        "instance_prompt": PROMPT,
        "class_prompt": "photo of widget",
        "images": [image_data()] * 4,
        "training_type": "null",
        "seed": 1,
        **extra,
    }


def wait_stage(
    server,
    key,
    training_id,
    stages=("model_ready", "training_failed", "training_cancelled"),
    timeout=300,
) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = server.post(f"/api/v3/fine_tune_status/{training_id}", {"key": key}).json()
        if status.get("messege") in stages:
            return status
        time.sleep(0.2)
    raise AssertionError(f"training {training_id} stuck at {status}")


def latent_distance(pipe, latents_target) -> float:
    out = pipe(
        PROMPT,
        num_inference_steps=20,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(5),
    ).images
    return (out - latents_target).abs().mean().item()


@pytest.fixture(scope="module")
def trained(server, user_key):
    """One LoRA and one Dreambooth run shared by the tests below, with their stage webhooks."""
    receiver = WebhookReceiver()
    lora = server.post(
        "/api/v3/lora_fine_tune",
        {
            "key": user_key,
            **train_body(
                base_model_type="normal",
                max_train_steps=150,
                learning_rate_unet="5e-3",
                webhook=receiver.url,
            ),
        },
    ).json()
    dreambooth = server.post(
        "/api/v3/fine_tune_v2",
        {
            "key": user_key,
            **train_body(
                base_model_id="tiny-sd",
                steps_unet=100,
                learning_rate_unet="1e-3",
                steps_text_encoder=20,
                learning_rate_text_encoder="1e-4",
            ),
        },
    ).json()
    for response in (lora, dreambooth):
        assert response["status"] == "success" and response["messege"] == "deploying_gpu", response
        assert (
            response["training_id"] == response["model_id"] and len(response["training_id"]) == 10
        )
    statuses = {
        name: wait_stage(server, user_key, r["training_id"])
        for name, r in (("lora", lora), ("dreambooth", dreambooth))
    }
    receiver.wait_for(8)
    yield {
        "lora": lora["training_id"],
        "dreambooth": dreambooth["training_id"],
        "statuses": statuses,
        "webhooks": list(receiver.received),
    }
    receiver.close()


def test_stages_reach_the_status_call_and_the_webhook(trained):
    stages = [
        "deploying_gpu",
        "training_started",
        "training_success",
        "trained_model_compressing",
        "trained_model_uploading",
        "trained_model_uploaded",
        "deploying_model",
        "model_ready",
    ]
    status = trained["statuses"]["lora"]
    assert status["status"] == "success" and status["message"] == "model_ready"
    log = status["data"]
    assert [s for s in stages if f"{s}:" in log] == stages
    assert [w["training_status"] for w in trained["webhooks"]] == stages
    assert all(
        w["model_id"] == trained["lora"] and w["status"] == "success" for w in trained["webhooks"]
    )


def test_training_moves_the_model_toward_the_images(server, trained, tiny_models_dir):
    base = StableDiffusionPipeline.from_pretrained(tiny_models_dir / "tiny-sd")
    base.set_progress_bar_config(disable=True)
    red = base.image_processor.preprocess([Image.new("RGB", (64, 64), RED)])
    with torch.no_grad():
        target = base.vae.encode(red).latent_dist.mean * base.vae.config.scaling_factor
    before = latent_distance(base, target)

    base.load_lora_weights(str(server.data_dir / "loras" / f"{trained['lora']}.safetensors"))
    after_lora = latent_distance(base, target)
    dreambooth = StableDiffusionPipeline.from_pretrained(
        server.data_dir / "models" / trained["dreambooth"]
    )
    dreambooth.set_progress_bar_config(disable=True)
    after_dreambooth = latent_distance(dreambooth, target)
    assert after_lora < 0.9 * before, (before, after_lora)
    assert after_dreambooth < 0.7 * before, (before, after_dreambooth)


def test_trained_lora_in_text2img_and_dreambooth_in_text2video(server, user_key, trained):
    body = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": PROMPT,
        "width": 64,
        "height": 64,
        "num_inference_steps": 4,
        "seed": 9,
        "enhance_prompt": "no",
        "safety_checker": "no",
    }
    plain = server.post("/api/v4/dreambooth", body).json()
    styled = server.post("/api/v4/dreambooth", {**body, "lora_model": trained["lora"]}).json()
    a, b = (np.asarray(decode_png(d["output"][0]), dtype=int) for d in (plain, styled))
    assert styled["meta"]["lora"] == trained["lora"] and np.abs(a - b).max() > 2

    video = server.post(
        "/api/v4/dreambooth/text2video",
        {**body, "model_id": trained["dreambooth"], "num_frames": 8, "output_type": "gif"},
    ).json()
    assert video["status"] == "success", video
    gif = Image.open(io.BytesIO(httpx.get(video["output"][0]).content))
    assert gif.n_frames == 8 and gif.size == (64, 64)


def test_load_model_by_trained_id(server, user_key, trained):
    """load_model's third source: a model trained here, registered under another id."""
    common = {
        "key": user_key,
        "prompt": PROMPT,
        "width": 64,
        "height": 64,
        "num_inference_steps": 3,
        "seed": 9,
        "safety_checker": "no",
    }
    pixels = {}
    for name, model_id, category in (
        ("lora", "my-trained-lora", "lora"),
        ("dreambooth", "my-dreambooth", "stable_diffusion"),
    ):
        answer = server.post(
            "/api/v3/load_model",
            {
                "key": user_key,
                "url": trained[name],
                "model_id": model_id,
                "model_category": category,
            },
        ).json()
        assert answer["status"] == "success", answer
        done = wait_for_job(server, user_key, answer["id"])
        assert done["status"] == "success", done
        if name == "lora":
            for lora in (trained["lora"], model_id):
                out = server.post(
                    "/api/v4/dreambooth", {**common, "model_id": "tiny-sd", "lora_model": lora}
                ).json()
                pixels[lora] = np.asarray(decode_png(out["output"][0]), dtype=int)
        else:
            for mid in (trained["dreambooth"], model_id):
                out = server.post("/api/v4/dreambooth", {**common, "model_id": mid}).json()
                pixels[mid] = np.asarray(decode_png(out["output"][0]), dtype=int)
    assert np.array_equal(pixels[trained["lora"]], pixels["my-trained-lora"])
    assert np.array_equal(pixels[trained["dreambooth"]], pixels["my-dreambooth"])
    other = create_key(server.data_dir)
    refused = server.post(
        "/api/v3/load_model",
        {"key": other, "url": trained["lora"], "model_id": "stolen", "model_category": "lora"},
    ).json()
    assert refused["status"] == "error" and refused["message"] == "Training not found"


def test_finetune_list_and_other_keys(server, user_key, trained):
    listed = server.post("/api/v3/finetune_list", {"key": user_key}).json()
    assert listed["status"] == "success" and listed["messege"] == "model list"
    ids = {row["training_id"] for row in listed["data"]}
    assert {trained["lora"], trained["dreambooth"]} <= ids
    other = create_key(server.data_dir)
    assert server.post("/api/v3/finetune_list", {"key": other}).json()["data"] == []
    for path in (
        f"/api/v3/fine_tune_status/{trained['lora']}",
        f"/api/v3/cancle_training/{trained['lora']}",
        f"/api/v3/finetune/delete/{trained['lora']}",
    ):
        data = server.post(path, {"key": other}).json()
        assert data["status"] == "error" and data["message"] == "Training not found", path
    assert (server.data_dir / "loras" / f"{trained['lora']}.safetensors").exists()


def test_cancel_then_delete(server, user_key):
    started = server.post(
        "/api/v3/lora_fine_tune", {"key": user_key, **train_body(max_train_steps=2000)}
    ).json()
    training_id = started["training_id"]
    wait_stage(server, user_key, training_id, stages=("training_started",))
    assert (
        server.post(f"/api/v3/cancel_training/{training_id}", {"key": user_key}).json()["status"]
        == "success"
    )
    status = wait_stage(server, user_key, training_id, timeout=30)
    assert status["messege"] == "training_cancelled" and status["status"] == "failed"
    assert not (server.data_dir / "loras" / f"{training_id}.safetensors").exists()
    deleted = server.post(f"/api/v3/delete/{training_id}", {"key": user_key}).json()
    assert deleted["status"] == "success"
    gone = server.post(f"/api/v3/fine_tune_status/{training_id}", {"key": user_key}).json()
    assert gone["message"] == "Training not found"


def test_status_shows_steps_and_an_eta_while_training(server, user_key):
    started = server.post(
        "/api/v3/lora_fine_tune", {"key": user_key, **train_body(max_train_steps=80)}
    ).json()
    training_id = started["training_id"]
    deadline = time.time() + 300
    seen = None
    while time.time() < deadline:
        status = server.post(f"/api/v3/fine_tune_status/{training_id}", {"key": user_key}).json()
        progress = status["progress"]
        assert progress["total_steps"] == 80
        assert progress["text"] == f"{progress['step']}/80"
        if status["messege"] == "training_started" and 0 < progress["step"] < 80:
            seen = (time.time(), progress["step"], status["eta"])
            break
        assert status["messege"] != "model_ready", "finished before any step was shown"
        time.sleep(0.1)
    assert seen is not None, "no step count was shown while training"
    observed_at, step, eta = seen
    assert isinstance(eta, float) and eta > 0
    done = wait_stage(server, user_key, training_id)
    remaining = time.time() - observed_at
    # This run's own pace (load included) errs long, never wildly short.
    assert remaining <= 2 * eta + 10, (step, eta, remaining)
    assert done["messege"] == "model_ready"
    assert done["progress"] == {"step": 80, "total_steps": 80, "text": "80/80"}
    assert done["eta"] == 0


def test_delete_removes_the_model_id(server, user_key):
    done = server.post(
        "/api/v3/fine_tune",
        {"key": user_key, **train_body(base_model_id="tiny-sd", max_train_steps=5)},
    ).json()
    training_id = done["training_id"]
    assert wait_stage(server, user_key, training_id)["messege"] == "model_ready"
    assert (server.data_dir / "models" / training_id / "model_index.json").exists()
    server.post(f"/api/v3/finetune/delete/{training_id}", {"key": user_key})
    assert not (server.data_dir / "models" / training_id).exists()
    data = server.post(
        "/api/v4/dreambooth", {"key": user_key, "model_id": training_id, "prompt": "x"}
    ).json()
    assert data["status"] == "error" and data["message"] == "Model not found"


def test_sandbox_simulates_the_stages(server, user_key):
    started = server.post("/api/sandbox/v3/fine_tune", {"key": user_key, **train_body()}).json()
    assert started["status"] == "success" and "sandbox" in started["data"]
    status = server.post(
        f"/api/sandbox/v3/fine_tune_status/{started['training_id']}", {"key": user_key}
    ).json()
    status = wait_stage(server, user_key, started["training_id"])
    assert status["messege"] == "model_ready" and "no model was made" in status["data"]
    assert not (server.data_dir / "models" / started["training_id"]).exists()


@pytest.mark.parametrize(
    "change,field,fragment",
    [
        ({"images": [image_data()] * 2}, "images", "At least 3 images"),
        (
            {"images": [image_data(), image_data(), "bm90IGFuIGltYWdl"]},
            "images[2]",
            "not a valid image",
        ),
        ({"max_train_steps": 0}, "max_train_steps", "between 1 and 2000"),
        ({"max_train_steps": 5000}, "max_train_steps", "between 1 and 2000"),
        ({"learning_rate_unet": "9e-2"}, "learning_rate_unet", "1e-0 ... 6e-10"),
        ({"training_type": "dogs"}, "training_type", "men, female"),
        ({"instance_prompt": ""}, "instance_prompt", "required"),
        ({"base_model_id": "no-such-model"}, None, "Model not found"),
    ],
)
def test_bad_training_requests_leave_nothing(server, user_key, change, field, fragment):
    before = {p.name for p in (server.data_dir / "models").iterdir()}
    listed = len(server.post("/api/v3/finetune_list", {"key": user_key}).json()["data"])
    data = server.post(
        "/api/v3/fine_tune", {"key": user_key, **{**train_body(base_model_id="tiny-sd"), **change}}
    ).json()
    assert data["status"] == "error", data
    assert fragment in data["message"]
    if field:
        assert field in data["messege"] or field in data["message"]
    assert {p.name for p in (server.data_dir / "models").iterdir()} == before
    assert len(server.post("/api/v3/finetune_list", {"key": user_key}).json()["data"]) == listed


def test_resume_after_worker_sigkill(tmp_path):
    env = {"SDSERVE_LEASE_SECONDS": "2", "SDSERVE_TRAIN_CHECKPOINT_EVERY": "10"}
    api = ServerProcess(tmp_path, SDSERVE_IN_PROCESS_WORKER="0", **env).start()
    key = create_key(tmp_path)
    training_id = api.post(
        "/api/v3/lora_fine_tune", {"key": key, **train_body(max_train_steps=400)}
    ).json()["training_id"]

    def worker():
        return start_worker(tmp_path, **env)

    doomed, rescuer = worker(), None
    try:
        checkpoint = tmp_path / "training" / training_id / "checkpoint.pt"
        deadline = time.time() + 120
        while not checkpoint.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert checkpoint.exists()
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        rescuer = worker()
        status = wait_stage(api, key, training_id, timeout=300)
        assert status["messege"] == "model_ready", status
        assert "resumed from the checkpoint at step" in status["data"]
        assert (tmp_path / "loras" / f"{training_id}.safetensors").exists()
    finally:
        for proc in (doomed, rescuer):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
        api.stop()


def test_lycoris_adapter_trains_and_generates(server, user_key, trained):
    started = server.post(
        "/api/v3/lora_fine_tune",
        {
            "key": user_key,
            **train_body(lora_type="lycoris", max_train_steps=20, learning_rate_unet="5e-3"),
        },
    ).json()
    status = wait_stage(server, user_key, started["training_id"])
    assert status["messege"] == "model_ready" and "loha adapter" in status["data"]
    body = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": PROMPT,
        "width": 64,
        "height": 64,
        "num_inference_steps": 3,
        "seed": 9,
        "enhance_prompt": "no",
        "safety_checker": "no",
    }

    def pixels(**change):
        data = server.post("/api/v4/dreambooth", {**body, **change}).json()
        assert data["status"] == "success", data
        return np.asarray(decode_png(data["output"][0]), dtype=int)

    plain = pixels()
    loha = pixels(lora_model=started["training_id"])
    lora = pixels(lora_model=trained["lora"])  # a plain LoRA after a LoHa: the UNet is reset
    assert np.abs(plain - loha).max() > 2 and np.abs(plain - lora).max() > 2
    assert np.abs(loha - pixels(lora_model=started["training_id"])).max() <= 1

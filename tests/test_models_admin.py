"""Model management through a real server: load_model by URL (checkpoint, LoRA, VAE), the model
admin endpoints, bad downloads that must leave nothing registered, and the private-address guard."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time

import numpy as np
import pytest
import torch
from conftest import (
    ADMIN_KEY,
    FileServer,
    ServerProcess,
    create_key,
    decode_png,
    wait_for_job,
    write_lora,
)
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import save_file

from sdserve.engine.checkpoints import _vae_to_ldm, export_single_file
from sdserve.engine.super_resolution import RRDBNet, check_weights_file

GEN = {
    "prompt": "a lighthouse",
    "width": 64,
    "height": 64,
    "num_inference_steps": 3,
    "safety_checker": "no",
    "seed": 5,
}


@pytest.fixture(scope="module")
def files(tiny_models_dir, tmp_path_factory):
    """A model host on loopback with a tiny checkpoint, LoRA and VAE, and some bad files."""
    host = FileServer()
    folder = tmp_path_factory.mktemp("model-files")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models_dir / "tiny-sd")
    export_single_file(pipe, folder / "tiny.safetensors")
    export_single_file(pipe, folder / "tiny.ckpt")
    write_lora(pipe, folder / "style.safetensors", seed=3)
    vae = AutoencoderKL.from_config(pipe.vae.config)  # other random weights
    save_file({k: v.contiguous() for k, v in _vae_to_ldm(vae).items()}, folder / "vae.safetensors")
    dim = pipe.text_encoder.config.hidden_size
    vectors = torch.randn(2, dim, generator=torch.Generator().manual_seed(3)) * 3
    torch.save({"string_to_param": {"*": vectors}, "name": "fox"}, folder / "fox.pt")  # A1111
    upscaler = RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4)  # RealESRGAN_x2plus's shape
    torch.save({"params_ema": upscaler.state_dict()}, folder / "x2.pth")  # as BasicSR saves it
    for path in folder.iterdir():
        if path.is_file():
            host.files[path.name] = path.read_bytes()
    header = json.dumps({"__metadata__": {"pad": "x"}}).encode()
    host.files["huge.safetensors"] = struct.pack("<Q", len(header)) + header + bytes(9 << 20)
    host.files["picture.png"] = b"\x89PNG\r\n\x1a\n" + bytes(1000)
    yield host
    host.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("models-admin"), SDSERVE_MAX_MODEL_MB="8")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def user(srv):
    return create_key(srv.data_dir)


def load(srv, **body) -> dict:
    path = body.pop("path", "/api/v1/enterprise/load_model")
    return srv.post(path, {"key": ADMIN_KEY, **body}).json()


def load_and_wait(srv, **body) -> dict:
    answer = load(srv, **body)
    assert answer["status"] == "success", answer
    return wait_for_job(srv, ADMIN_KEY, answer["id"])


def generate(srv, key, **body) -> dict:
    return srv.post("/api/v4/dreambooth", {"key": key, **GEN, **body}).json()


def pixels(srv, key, **body) -> np.ndarray:
    data = generate(srv, key, **body)
    assert data["status"] == "success", data
    return np.asarray(decode_png(data["output"][0]), dtype=np.float32)


def all_models(srv) -> dict[str, dict]:
    data = srv.post("/api/v1/enterprise/get_all_models", {"key": ADMIN_KEY}).json()
    assert data["status"] == "success"
    return {m["model_id"]: m for m in data["models"]}


def no_leftovers(srv) -> bool:
    downloads = srv.data_dir / "downloads"
    return not downloads.exists() or not any(downloads.iterdir())


def test_checkpoint_by_url_generate_then_delete(srv, user, files, webhook_receiver):
    done = load_and_wait(
        srv,
        url=f"{files.url}/files/tiny.safetensors",
        model_id="imported-sd",
        config_model_id="tiny-sd",
        model_category="stable_diffusion",
        webhook=webhook_receiver.url,
    )
    assert done["status"] == "success", done
    expected_sha = hashlib.sha256(files.files["tiny.safetensors"]).hexdigest()
    assert done["meta"]["sha256"] == expected_sha
    assert webhook_receiver.wait_for(1)[0]["status"] == "success"

    verify = srv.post(
        "/api/v1/enterprise/verify_model", {"key": ADMIN_KEY, "model_id": "imported-sd"}
    )
    assert verify.json() == {
        "status": "success",
        "message": "Model exists on server",
        "messege": "Model exists on server",
        "model_id": "imported-sd",
    }
    listed = all_models(srv)["imported-sd"]
    assert re.fullmatch(r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d", listed["load_data"])
    assert listed["sha256"] == expected_sha and listed["model_category"] == "stable_diffusion"
    assert "imported-sd" in [
        m["model_id"] for m in srv.post("/api/v4/dreambooth/model_list", {"key": user}).json()
    ]

    # Same weights as the built-in model: the same pixels.
    imported = pixels(srv, user, model_id="imported-sd")
    builtin = pixels(srv, user, model_id="tiny-sd")
    assert np.abs(imported - builtin).mean() < 1.0

    deleted = srv.post(
        "/api/v1/enterprise/delete_model", {"key": ADMIN_KEY, "model_id": "imported-sd"}
    )
    assert deleted.json()["message"] == "Model deleted on server"
    assert not list((srv.data_dir / "imported").rglob("imported-sd*"))
    gone = srv.post(
        "/api/v1/enterprise/verify_model", {"key": ADMIN_KEY, "model_id": "imported-sd"}
    )
    assert gone.json()["status"] == "error"
    assert gone.json()["message"] == "Model does not exist on server"
    assert generate(srv, user, model_id="imported-sd")["message"].startswith("Model not found")


def test_ckpt_file_and_v3_load_model_by_a_user_key(srv, user, files):
    answer = load(
        srv,
        path="/api/v3/load_model",
        key=user,
        url=f"{files.url}/files/tiny.ckpt",
        model_id="user-ckpt",
        config_model_id="tiny-sd",
        model_visibility="private",
    )
    assert answer["message"] == "model load started"
    assert wait_for_job(srv, user, answer["id"])["status"] == "success"
    assert generate(srv, user, model_id="user-ckpt")["status"] == "success"
    # private: another key does not see it
    other = create_key(srv.data_dir)
    assert generate(srv, other, model_id="user-ckpt")["message"].startswith("Model not found")


def test_lora_by_url(srv, user, files):
    done = load_and_wait(
        srv, url=f"{files.url}/files/style.safetensors", model_id="style-x", model_category="lora"
    )
    assert done["status"] == "success", done
    plain = pixels(srv, user, model_id="tiny-sd")
    styled = pixels(srv, user, model_id="tiny-sd", lora_model="style-x")
    assert np.abs(plain - styled).mean() > 1.0
    srv.post("/api/v1/enterprise/delete_model", {"key": ADMIN_KEY, "model_id": "style-x"})
    error = generate(srv, user, model_id="tiny-sd", lora_model="style-x")
    assert error["status"] == "error" and "style-x" in json.dumps(error["messege"])


def test_vae_by_url(srv, user, files):
    answer = srv.post(
        "/api/v1/enterprise/load_vae",
        {
            "key": ADMIN_KEY,
            "vae_id": "other-vae",
            "vae_url": f"{files.url}/files/vae.safetensors",
            "vae_type": "safetensors",
        },
    ).json()
    assert answer["message"] == "VAE load started"
    assert wait_for_job(srv, ADMIN_KEY, answer["id"])["status"] == "success"
    plain = pixels(srv, user, model_id="tiny-sd")
    other = pixels(srv, user, model_id="tiny-sd", vae="other-vae")
    assert np.abs(plain - other).mean() > 1.0
    srv.post("/api/v1/enterprise/delete_model", {"key": ADMIN_KEY, "model_id": "other-vae"})
    assert generate(srv, user, model_id="tiny-sd", vae="other-vae")["status"] == "error"


def test_embedding_by_url(srv, user, files):
    done = load_and_wait(
        srv, url=f"{files.url}/files/fox.pt", model_id="fox-emb", model_category="embeddings"
    )
    assert done["status"] == "success", done
    plain = pixels(srv, user, model_id="tiny-sd", prompt="a fox-emb fox")
    styled = pixels(
        srv, user, model_id="tiny-sd", prompt="a fox-emb fox", embeddings_model="fox-emb"
    )
    assert np.abs(plain - styled).mean() > 1.0


def test_super_resolution_weights_by_url(srv, files):
    done = load_and_wait(
        srv,
        url=f"{files.url}/files/x2.pth",
        model_id="RealESRGAN_x2plus",
        model_category="super_resolution",
    )
    assert done["status"] == "success", done
    assert all_models(srv)["RealESRGAN_x2plus"]["model_category"] == "super_resolution"
    (stored,) = (srv.data_dir / "imported" / "super_resolution").glob("RealESRGAN_x2plus*")
    assert check_weights_file(stored).native_scale == 2
    srv.post("/api/v1/enterprise/delete_model", {"key": ADMIN_KEY, "model_id": "RealESRGAN_x2plus"})


def test_interrupted_download_resumes(srv, files):
    done = load_and_wait(
        srv,
        url=f"{files.url}/flaky/tiny.safetensors",
        model_id="resumed",
        config_model_id="tiny-sd",
    )
    assert done["status"] == "success", done
    ranges = [r for path, r in files.requests if path == "/flaky/tiny.safetensors"]
    assert ranges[0] is None and ranges[1].startswith("bytes=")
    assert done["meta"]["sha256"] == hashlib.sha256(files.files["tiny.safetensors"]).hexdigest()
    assert done["meta"]["model_category"] == "stable_diffusion"  # told by the weights


BAD_DOWNLOADS = [
    ("/files/missing.safetensors", "stable_diffusion", "HTTP 404"),
    ("/page", "stable_diffusion", "text/html"),
    ("/truncated/tiny.safetensors", "stable_diffusion", "failed"),
    ("/files/picture.png", "stable_diffusion", "neither a .safetensors nor a .ckpt"),
    ("/files/huge.safetensors", "lora", "larger than the 8 MB limit"),
    ("/files/style.safetensors", "stable_diffusion", "Not a Stable Diffusion checkpoint"),
    ("/files/tiny.safetensors", "stable_diffusion_xl", "model_category is stable_diffusion_xl"),
    ("/files/tiny.safetensors", "lora", "not a LoRA"),
    # a checkpoint whose sizes fit no config it is given
    ("/files/tiny.safetensors", "stable_diffusion", "could not be loaded as sd15"),
    ("/files/style.safetensors", "vae", "not a VAE"),
    ("/files/style.safetensors", "super_resolution", "Not a Real-ESRGAN model"),
]


@pytest.mark.parametrize("path,category,reason", BAD_DOWNLOADS)
def test_bad_downloads_register_nothing(srv, files, path, category, reason):
    done = load_and_wait(srv, url=files.url + path, model_id="bad-one", model_category=category)
    assert done["status"] == "failed"
    assert reason in done["message"], done["message"]
    assert "bad-one" not in all_models(srv)
    assert no_leftovers(srv)
    assert not list((srv.data_dir / "imported").rglob("bad-one*"))


@pytest.mark.parametrize(
    "body,field",
    [
        ({"url": "ftp://example.com/x.safetensors", "model_id": "a"}, "url"),
        ({"url": "file:///etc/passwd", "model_id": "a"}, "url"),
        ({"url": "not a url", "model_id": "a"}, "url"),
        ({"url": "http://x/y.ckpt", "model_id": "../../etc"}, "model_id"),
        ({"url": "http://x/y.ckpt", "model_id": "/abs"}, "model_id"),
        ({"url": "http://x/y.ckpt"}, "model_id"),
        ({"model_id": "a"}, "url"),
        (
            {"url": "http://x/y.ckpt", "model_id": "a", "model_category": "flux_lora"},
            "model_category",
        ),
        ({"url": "http://x/y.ckpt", "model_id": "a", "model_format": "zip"}, "model_format"),
        ({"url": "http://x/y.ckpt", "model_id": "tiny-sd"}, "model_id"),
    ],
)
def test_bad_load_requests(srv, body, field):
    data = load(srv, **body)
    assert data["status"] == "error"
    assert field in data["messege"], data


def test_duplicate_model_id_and_force_load(srv, files):
    first = load_and_wait(
        srv, url=f"{files.url}/files/tiny.safetensors", model_id="dup", config_model_id="tiny-sd"
    )
    assert first["status"] == "success"
    again = load(srv, url=f"{files.url}/files/tiny.ckpt", model_id="dup")
    assert again["status"] == "error" and "already exists" in again["message"]
    forced = load_and_wait(
        srv,
        url=f"{files.url}/files/tiny.ckpt",
        model_id="dup",
        force_load="yes",
        config_model_id="tiny-sd",
    )
    assert forced["status"] == "success"
    files_left = list((srv.data_dir / "imported").rglob("dup-*"))
    assert [p.suffix for p in files_left] == [".ckpt"]  # the replaced file is gone


def test_hub_id_when_offline_is_a_clear_error(srv):
    data = load(srv, url="someone/some-model", model_id="hubby")
    assert data["status"] == "error" and "offline" in data["message"]


def test_enterprise_endpoints_refuse_other_keys(srv, user):
    names = [
        "load_model",
        "system_details",
        "get_all_models",
        "delete_model",
        "clear_queue",
        "restart_server",
        "update_s3",
        "schedulers_list",
        "verify_model",
        "sync_models",
        "video/system_details",
        "text2img",
        "upload_image",
        "plans",
    ]
    for name in names:
        data = srv.post(f"/api/v1/enterprise/{name}", {"key": user, "model_id": "x"}).json()
        assert data["message"] == "Invalid Api Key", (name, data)


def test_system_details_cache_and_schedulers(srv, user):
    generate(srv, user, model_id="tiny-sd")
    details = srv.post("/api/v1/enterprise/system_details", {"key": ADMIN_KEY}).json()
    assert details["status"] == "ok"
    assert {"model_count", "queue_time", "cpu", "ram", "disk", "version", "workers"} <= set(details)
    assert "tiny-sd" in details["loaded_models"]
    cleared = srv.post("/api/v1/enterprise/clear_cache", {"key": ADMIN_KEY}).json()
    assert cleared["message"] == "Cache cleared successfully"
    assert srv.post("/api/v5/clear_cache", {"key": user}).json()["message"] == "Cache cleared"
    assert httpx_get(srv, "/api/v5/clear_cache", user)["status"] == "success"
    deadline = time.time() + 15
    while time.time() < deadline:
        details = srv.post("/api/v1/enterprise/system_details", {"key": ADMIN_KEY}).json()
        if not details["loaded_models"]:
            break
        time.sleep(0.2)
    assert details["loaded_models"] == []
    schedulers = srv.post("/api/v1/enterprise/schedulers_list", {"key": ADMIN_KEY}).json()
    assert "DDPMScheduler" in schedulers["schedulers"]


def httpx_get(srv, path, key):
    import httpx

    return httpx.get(srv.url + path, params={"key": key}, timeout=30).json()


def test_sync_models_from_another_server(srv, files, tmp_path):
    assert (
        load_and_wait(
            srv,
            url=f"{files.url}/files/style.safetensors",
            model_id="shared-style",
            model_category="lora",
        )["status"]
        == "success"
    )
    peer = ServerProcess(tmp_path / "peer").start()
    try:
        data = peer.post(
            "/api/v1/enterprise/sync_models",
            {"key": ADMIN_KEY, "sync_url": srv.url, "sync_key": ADMIN_KEY},
        ).json()
        assert data["status"] == "success", data
        assert "shared-style" in data["model_list"]
        assert data["message"] == f"{len(data['model_list'])} Models synced successfully"
        deadline = time.time() + 60
        while "shared-style" not in all_models(peer) and time.time() < deadline:
            time.sleep(0.2)
        assert (
            all_models(peer)["shared-style"]["sha256"] == all_models(srv)["shared-style"]["sha256"]
        )
        bad = peer.post(
            "/api/v1/enterprise/sync_models",
            {"key": ADMIN_KEY, "sync_url": srv.url, "sync_key": "wrong"},
        ).json()
        assert bad["status"] == "error" and "Invalid Api Key" in bad["message"]
    finally:
        peer.stop()


def test_private_address_guard_is_on_by_default(tmp_path, files):
    guarded = ServerProcess(tmp_path / "guarded", SDSERVE_ALLOW_PRIVATE_URLS="0").start()
    try:
        data = guarded.post(
            "/api/v1/enterprise/load_model",
            {"key": ADMIN_KEY, "url": f"{files.url}/files/tiny.safetensors", "model_id": "x"},
        ).json()
        assert data["status"] == "error" and "private or local address" in data["message"]
        key = create_key(guarded.data_dir)
        img = guarded.post(
            "/api/v3/img2img",
            {
                "key": key,
                "prompt": "x",
                "init_image": "http://127.0.0.1:9/x.png",
                "width": 64,
                "height": 64,
            },
        ).json()
        assert img["status"] == "error" and "private or local address" in img["message"]
        metadata = guarded.post(
            "/api/v3/img2img",
            {
                "key": key,
                "prompt": "x",
                "init_image": "http://169.254.169.254/latest/meta-data",
                "width": 64,
                "height": 64,
            },
        ).json()
        assert "private or local address" in metadata["message"]
    finally:
        guarded.stop()

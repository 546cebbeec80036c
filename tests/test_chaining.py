"""A job's own output URL is a valid input to the next job, with the private-address guard on."""

from __future__ import annotations

import pytest
from conftest import ADMIN_KEY, create_key, decode_png

GEN = {
    "model_id": "tiny-sd",
    "prompt": "a red boat",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "safety_checker": "no",
}


@pytest.fixture(scope="module")
def first(guarded_server):
    """Key A's text2img output, made on a guarded server (which runs on loopback)."""
    a = create_key(guarded_server.data_dir)
    data = guarded_server.post("/api/v3/text2img", {"key": a, **GEN}).json()
    assert data["status"] == "success", data
    url = data["output"][0]
    assert url.startswith(guarded_server.url)
    return {"key": a, "url": url}


def test_img2img_from_the_previous_output(guarded_server, first):
    for key in (first["key"], ADMIN_KEY):
        data = guarded_server.post(
            "/api/v3/img2img", {"key": key, **GEN, "init_image": first["url"], "strength": 0.5}
        ).json()
        assert data["status"] == "success", data
        assert decode_png(data["output"][0]).size == (64, 64)
    inpaint = guarded_server.post(
        "/api/v3/inpaint",
        {"key": first["key"], **GEN, "init_image": first["url"], "mask_image": first["url"]},
    ).json()
    assert inpaint["status"] == "success", inpaint
    check = guarded_server.post(
        "/api/v3/nsfw_image_check", {"key": first["key"], "init_image": first["url"]}
    ).json()
    assert check.get("status") != "error", check
    sandbox = guarded_server.post(
        "/api/sandbox/v3/fine_tune",
        {
            "key": first["key"],
            "instance_prompt": "photo of sks boat",
            "class_prompt": "photo of boat",
            "images": [first["url"]] * 4,
        },
    ).json()
    assert sandbox["status"] == "success", sandbox


def test_another_keys_output_is_refused(guarded_server, first):
    b = create_key(guarded_server.data_dir)
    for path, body in (
        ("/api/v3/img2img", {**GEN, "init_image": first["url"]}),
        ("/api/v3/inpaint", {**GEN, "init_image": first["url"], "mask_image": first["url"]}),
        ("/api/v3/nsfw_image_check", {"init_image": first["url"]}),
    ):
        data = guarded_server.post(path, {"key": b, **body}).json()
        assert data["status"] == "error", (path, data)
        assert "not one of this key's outputs" in data["message"], data
    training = guarded_server.post(
        "/api/v3/lora_fine_tune",
        {
            "key": b,
            "instance_prompt": "photo of sks boat",
            "class_prompt": "photo of boat",
            "images": [first["url"]] * 4,
        },
    ).json()
    assert training["status"] == "error" and "images[0]" in training["message"], training


def test_a_file_url_no_job_made_is_refused(guarded_server, first):
    missing = first["url"].rsplit("/", 1)[0] + "/no-such-output.png"
    data = guarded_server.post(
        "/api/v3/img2img", {"key": first["key"], **GEN, "init_image": missing}
    ).json()
    assert data["status"] == "error" and "not one of this key's outputs" in data["message"]

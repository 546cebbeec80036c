"""The utility endpoints, plans and quotas, clear_queue and a restart under load, on real servers."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
from conftest import ADMIN_KEY, ServerProcess, create_key, decode_png, png_bytes, wait_for_job
from PIL import Image

GEN = {
    "prompt": "a lighthouse",
    "width": 64,
    "height": 64,
    "num_inference_steps": 3,
    "safety_checker": "no",
}


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def test_base64_crop_and_delete_image(server, user_key):
    data = server.post(
        "/api/v3/base64_crop",
        {"key": user_key, "image": data_url(png_bytes((300, 200))), "crop": "true"},
    ).json()
    assert data["status"] == "success" and data["messege"] == "image uploaded"
    assert decode_png(data["link"]).size == (512, 512)
    uncropped = server.post(
        "/api/v3/base64_crop",
        {"key": user_key, "image": data_url(png_bytes((300, 200))), "crop": "false"},
    ).json()
    assert decode_png(uncropped["link"]).size == (300, 200)

    other = create_key(server.data_dir)
    refused = server.post("/api/v3/delete_image", {"key": other, "request_id": data["request_id"]})
    assert refused.json()["message"] == "Image not found"
    deleted = server.post(
        "/api/v3/delete_image", {"key": user_key, "request_id": data["request_id"]}
    )
    assert deleted.json() == {
        "status": "success",
        "messege": "image deleted",
        "message": "image deleted",
    }
    assert httpx.get(data["link"]).status_code == 404
    again = server.post("/api/v3/delete_image", {"key": user_key, "request_id": "abc"}).json()
    assert again["status"] == "error"


def test_delete_image_removes_a_generations_outputs(server, user_key):
    job = server.post("/api/v3/text2img", {"key": user_key, **GEN}).json()
    assert httpx.get(job["output"][0]).status_code == 200
    server.post("/api/v3/delete_image", {"key": user_key, "request_id": job["id"]})
    assert httpx.get(job["output"][0]).status_code == 404
    assert server.post(f"/api/v3/fetch/{job['id']}", {"key": user_key}).json()["output"] == []


def test_base64_to_url_and_upload_image(server, user_key):
    data = server.post(
        "/api/v6/base64_to_url", {"key": user_key, "base64_string": data_url(png_bytes((40, 30)))}
    ).json()
    assert data["status"] == "success" and "/temp/" in data["output"][0]
    assert decode_png(data["output"][0]).size == (40, 30)
    bad = server.post("/api/v6/base64_to_url", {"key": user_key, "base64_string": "!!"}).json()
    assert bad["status"] == "error"

    raw = base64.b64encode(png_bytes((20, 20))).decode()
    refused = server.post("/api/v1/enterprise/upload_image", {"key": user_key, "base64_image": raw})
    assert refused.json()["message"] == "Invalid Api Key"
    up = server.post(
        "/api/v1/enterprise/upload_image",
        {"key": ADMIN_KEY, "base64_image": raw, "image_type": "jpeg"},
    ).json()
    assert up["message"] == "image uploaded" and up["image_url"].endswith(".jpg")
    image = Image.open(io.BytesIO(httpx.get(up["image_url"]).content))
    assert image.format == "JPEG" and image.size == (20, 20)


def test_nsfw_image_check_shape(server, user_key):
    data = server.post(
        "/api/v3/nsfw_image_check", {"key": user_key, "init_image": data_url(png_bytes((64, 64)))}
    ).json()
    assert set(data) == {"images", "has_nsfw_concept"}
    assert data["has_nsfw_concept"] == [False]
    assert decode_png(data["images"]).size == (64, 64)
    enterprise = server.post(
        "/api/v1/enterprise/nsfw_image_check",
        {"key": user_key, "init_image": data_url(png_bytes())},
    ).json()
    assert enterprise["message"] == "Invalid Api Key"
    missing = server.post("/api/v3/nsfw_image_check", {"key": user_key}).json()
    assert missing["status"] == "error" and "init_image" in missing["messege"]


@pytest.mark.parametrize(
    "prompt,nsfw,cp,filtered",
    [
        ("a cat on a sofa, golden hour", False, False, "a cat on a sofa, golden hour"),
        ("a nude woman on a beach", True, False, "a woman on a beach"),
        ("a young girl, naked, beach", True, True, "a, beach"),
        ("a young girl reading a book", False, False, "a young girl reading a book"),
    ],
)
def test_check_nsfw_cp(server, user_key, prompt, nsfw, cp, filtered):
    data = server.post("/api/check_nsfw_cp", {"key": user_key, "prompt": prompt}).json()
    assert data == {
        "status": "success",
        "is_cp": cp,
        "is_nsfw": nsfw,
        "original_prompt": prompt,
        "filtered_prompt": filtered,
    }


def test_plans_quotas_and_subscriptions(server):
    buyer = create_key(server.data_dir)
    none_yet = server.post("/api/v3/buy_subscription", {"key": buyer, "plan_name": "nope"}).json()
    assert none_yet["status"] == "error" and "plan_name" in none_yet["messege"]
    made = server.post(
        "/api/v1/enterprise/plans",
        {
            "key": ADMIN_KEY,
            "plan_name": "basic_monthly",
            "requests_per_month": 2,
            "queue_limit": 3,
            "self_service": "yes",
        },
    ).json()
    assert {
        "name": "basic_monthly",
        "requests_per_month": 2,
        "queue_limit": 3,
        "included_models": 0,
        "self_service": True,
    } in made["plans"]
    server.post("/api/v1/enterprise/plans", {"key": ADMIN_KEY, "plan_name": "premium_yearly"})
    closed = server.post("/api/v3/buy_subscription", {"key": buyer, "plan_name": "premium_yearly"})
    assert closed.json()["status"] == "error"

    bought = server.post(
        "/api/v3/buy_subscription", {"key": buyer, "plan_name": "basic_monthly"}
    ).json()
    assert bought["messege"] == "You have just bought a custom api with basic plan"
    new_key = bought["data"]["key"]
    assert bought["data"]["plan"] == "basic_monthly"
    for _ in range(2):
        assert (
            server.post("/api/v3/text2img", {"key": new_key, **GEN}).json()["status"] == "success"
        )
    over = server.post("/api/v3/text2img", {"key": new_key, **GEN}).json()
    assert over["status"] == "error"
    assert over["message"] == "Insufficient credits. Please add more credits to continue."
    usage = httpx.get(server.url + "/api/subscribed_products", params={"key": new_key}).json()
    assert usage["data"]["imagen"] == {
        "plan": "basic_monthly",
        "total_api_call": 2,
        "api_call_used": 2,
        "api_call_remaining": 0,
        "percentage_used": 100,
    }
    models = server.post("/api/v3/dreambooth/buy_model", {"key": new_key, "quantity": "4"}).json()
    assert models["purchased_models"] == 4 and models["available_models"] == 4

    stranger = create_key(server.data_dir)
    denied = server.post("/api/v3/cancel_subscription", {"key": stranger, "key_to_cancel": new_key})
    assert denied.json()["status"] == "error"
    cancelled = server.post("/api/v3/cancel_subscription", {"key": buyer, "key_to_cancel": new_key})
    assert cancelled.json()["messege"] == "subscription cancelled successfully"
    assert (
        server.post("/api/v3/text2img", {"key": new_key, **GEN}).json()["message"]
        == "Invalid Api Key"
    )


@pytest.fixture
def idle_server(tmp_path):
    """A server with no worker: jobs stay queued."""
    srv = ServerProcess(tmp_path / "idle", SDSERVE_IN_PROCESS_WORKER="0").start()
    yield srv
    srv.stop()


def test_clear_queue(idle_server):
    key = create_key(idle_server.data_dir)
    ids = [
        idle_server.post("/api/v3/text2img", {"key": key, **GEN, "instant_response": "yes"}).json()[
            "id"
        ]
        for _ in range(3)
    ]
    data = idle_server.post("/api/v1/enterprise/clear_queue", {"key": ADMIN_KEY}).json()
    assert data["status"] == "success" and data["cleared"] == 3
    for job_id in ids:
        job = idle_server.post(f"/api/v3/fetch/{job_id}", {"key": key}).json()
        assert job["status"] == "failed" and "Queue cleared" in job["message"]


def test_restart_under_load_loses_no_job(tmp_path):
    srv = ServerProcess(tmp_path / "restart").start()
    try:
        key = create_key(srv.data_dir)
        body = {"key": key, **GEN, "num_inference_steps": 10, "instant_response": "yes"}
        ids = [srv.post("/api/v3/text2img", body).json()["id"] for _ in range(8)]
        pid = srv.proc.pid
        answer = srv.post("/api/v1/enterprise/restart_server", {"key": ADMIN_KEY}).json()
        assert answer == {
            "status": "success",
            "message": "server restarting",
            "messege": "server restarting",
        }
        # It goes down, then comes back as the same process, re-executed.
        deadline = time.time() + 60
        seen_down = False
        while time.time() < deadline:
            try:
                httpx.get(srv.url + "/openapi.json", timeout=1)
                if seen_down:
                    break
            except httpx.HTTPError:
                seen_down = True
            time.sleep(0.1)
        assert seen_down and srv.proc.poll() is None and srv.proc.pid == pid
        ids.append(srv.post("/api/v3/text2img", body).json()["id"])
        results = [wait_for_job(srv, key, job_id) for job_id in ids]
        assert [r["status"] for r in results] == ["success"] * len(ids)
        for result in results:
            assert decode_png(result["output"][0]).size == (64, 64)
    finally:
        srv.stop()

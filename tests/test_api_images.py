"""HTTP round trips through every image endpoint of a real server, decoding the PNGs it returns."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from conftest import ADMIN_KEY, ServerProcess, decode_png, png_bytes
from PIL import Image

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "safety_checker": "no"}
INIT = "data:image/png;base64," + base64.b64encode(png_bytes((80, 80))).decode()
MASK = base64.b64encode(png_bytes((80, 80), (255, 255, 255))).decode()

IMAGE_ENDPOINTS = [
    ("/api/v3/text2img", "text2img", "/api/v3/fetch/"),
    ("/api/v3/img2img", "img2img", "/api/v3/fetch/"),
    ("/api/v3/inpaint", "inpaint", "/api/v3/fetch/"),
    ("/api/v3/dreambooth", "text2img", "/api/v3/dreambooth/fetch/"),
    ("/api/v3/dreambooth/img2img", "img2img", "/api/v3/dreambooth/fetch/"),
    ("/api/v3/dreambooth/inpaint", "inpaint", "/api/v3/dreambooth/fetch/"),
    ("/api/v4/dreambooth", "text2img", "/api/v3/dreambooth/fetch/"),
    ("/api/v4/dreambooth/img2img", "img2img", "/api/v3/dreambooth/fetch/"),
    ("/api/v4/dreambooth/inpaint", "inpaint", "/api/v3/dreambooth/fetch/"),
    ("/api/v6/images/text2img", "text2img", "/api/v6/images/fetch/"),
    ("/api/v6/images/img2img", "img2img", "/api/v6/images/fetch/"),
    ("/api/v6/images/inpaint", "inpaint", "/api/v6/images/fetch/"),
    ("/api/v6/realtime/text2img", "text2img", "/api/v6/realtime/fetch/"),
    ("/api/v6/realtime/img2img", "img2img", "/api/v6/realtime/fetch/"),
    ("/api/v6/realtime/inpaint", "inpaint", "/api/v6/realtime/fetch/"),
]


def _body(key: str, kind: str, **extra) -> dict:
    body = {"key": key, "prompt": "a red fox in snow", "model_id": "tiny-sd", **SMALL, **extra}
    if kind != "text2img":
        body["init_image"] = INIT
    if kind == "inpaint":
        body["mask_image"] = MASK
    return body


@pytest.mark.parametrize("path,kind,fetch_prefix", IMAGE_ENDPOINTS)
def test_endpoint_round_trip(server, user_key, path, kind, fetch_prefix):
    data = server.post(path, _body(user_key, kind, samples="2", seed="1234")).json()
    assert data["status"] == "success", data
    assert isinstance(data["id"], int)
    assert isinstance(data["generationTime"], float)
    assert len(data["output"]) == 2
    for url in data["output"]:
        assert url.startswith(server.url + "/generations/")
        assert decode_png(url).size == (64, 64)
    meta = data["meta"]
    assert meta["seed"] == 1234
    assert meta["n_samples"] == 2
    size_keys = ("width", "height") if "realtime" in path else ("W", "H")
    assert [meta[k] for k in size_keys] == [64, 64]
    if kind != "text2img":
        assert meta["init_image"] == "base64" and meta["strength"] == 0.7

    # the finished job is fetched the same way from its family's fetch path
    fetched = server.post(fetch_prefix + str(data["id"]), {"key": user_key}).json()
    assert fetched["status"] == "success" and fetched["output"] == data["output"]


def test_processing_answer_then_every_fetch_form(server, user_key):
    data = server.post(
        "/api/v4/dreambooth", _body(user_key, "text2img", instant_response="yes")
    ).json()
    assert data["status"] == "processing", data
    assert data["messege"] == data["message"] == "Try to fetch request after seconds estimated"
    assert data["fetch_result"] == f"{server.url}/api/v3/dreambooth/fetch/{data['id']}"
    assert isinstance(data["eta"], float | int) and data["eta"] >= 0
    assert data["output"] == [] and len(data["future_links"]) == 1
    job_id = data["id"]

    # a client POSTs {key} to fetch_result verbatim until success
    for _ in range(200):
        result = httpx.post(data["fetch_result"], json={"key": user_key}, timeout=30).json()
        if result["status"] == "success":
            break
        assert result["status"] == "processing"
        assert "eta" in result and "queue_position" in result
        time.sleep(0.1)
    assert result["output"] == data["future_links"]
    assert decode_png(result["output"][0]).size == (64, 64)

    key_only = {"key": user_key}
    with_request_id = {"key": user_key, "request_id": str(job_id)}
    forms = [
        ("POST", f"/api/v3/fetch/{job_id}", key_only),
        ("POST", f"/api/v3/dreambooth/fetch/{job_id}", key_only),
        ("POST", "/api/v4/dreambooth/fetch", with_request_id),
        ("POST", "/api/v6/images/fetch", with_request_id),
        ("POST", f"/api/v6/images/fetch/{job_id}", key_only),
        ("POST", f"/api/v6/realtime/fetch/{job_id}", key_only),
        ("POST", f"/api/v6/video/fetch/{job_id}", key_only),
        ("POST", f"/api/v6/image_editing/fetch/{job_id}", key_only),
        ("POST", f"/api/v6/3d/fetch/{job_id}", key_only),
        ("POST", "/api/v1/enterprise/fetch", with_request_id),
        ("POST", f"/api/v1/enterprise/images/fetch/{job_id}", key_only),
        ("POST", f"/api/v5/images/fetch/{job_id}", key_only),
    ]
    for method, path, body in forms:
        for use_get in (False, True):
            if use_get:
                response = httpx.get(server.url + path, params=body, timeout=30)
            else:
                response = httpx.request(method, server.url + path, json=body, timeout=30)
            fetched = response.json()
            assert fetched["status"] == "success", (path, use_get, fetched)
            assert fetched["id"] == job_id and fetched["output"] == result["output"]


def test_same_seed_same_pixels(server, user_key):
    def run(seed):
        data = server.post("/api/v4/dreambooth", _body(user_key, "text2img", seed=seed)).json()
        return np.asarray(decode_png(data["output"][0]), dtype=np.int16)

    first, second, other = run(77), run(77), run(78)
    assert np.abs(first - second).max() <= 1
    assert np.abs(first - other).max() > 1


def test_random_seed_is_echoed_and_reproducible(server, user_key):
    data = server.post("/api/v4/dreambooth", _body(user_key, "text2img", seed=-1)).json()
    seed = data["meta"]["seed"]
    assert isinstance(seed, int) and seed > 0
    again = server.post("/api/v4/dreambooth", _body(user_key, "text2img", seed=seed)).json()
    a = np.asarray(decode_png(data["output"][0]), dtype=np.int16)
    b = np.asarray(decode_png(again["output"][0]), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_key_in_bearer_and_key_headers(server, user_key):
    body = {k: v for k, v in _body(user_key, "text2img").items() if k != "key"}
    for headers in ({"Authorization": f"Bearer {user_key}"}, {"key": user_key}):
        data = server.post("/api/v6/images/text2img", body, headers=headers).json()
        assert data["status"] == "success", data


def test_coercion_of_wire_encodings(server, user_key):
    body = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": "x",
        "width": "64",
        "height": 64.0,
        "samples": "1",
        "num_inference_steps": "2",
        "guidance_scale": "3.5",
        "seed": "42",
        "safety_checker": False,
        "enhance_prompt": "no",
        "base64": None,
        "webhook": None,
        "track_id": None,
        "some_unknown_field": {"nested": True},
    }
    data = server.post("/api/v4/dreambooth", body).json()
    assert data["status"] == "success", data
    assert data["meta"]["guidance_scale"] == 3.5 and data["meta"]["seed"] == 42
    assert data["meta"]["prompt"] == "x" and data["meta"]["safetychecker"] == "no"


def test_sizes_and_steps_are_clamped(tmp_path):
    # A server without a worker: the clamped job is big and only its meta matters here.
    api = ServerProcess(tmp_path, SDSERVE_IN_PROCESS_WORKER="0").start()
    try:
        body = _body(
            ADMIN_KEY, "text2img", width=2000, height=70, num_inference_steps=500, samples=9
        )
        body["instant_response"] = True
        meta = api.post("/api/v4/dreambooth", body).json()["meta"]
        assert (meta["W"], meta["H"], meta["steps"], meta["n_samples"]) == (1024, 64, 50, 4)
    finally:
        api.stop()


def test_base64_output_and_temp(server, user_key):
    data = server.post(
        "/api/v4/dreambooth", _body(user_key, "text2img", base64="yes", temp="yes")
    ).json()
    assert data["status"] == "success"
    url = data["output"][0]
    assert "/temp/" in url and url.endswith(".base64")
    text = httpx.get(url).text
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    assert image.size == (64, 64)


def test_enhance_prompt_adds_documented_suffix(server, user_key):
    from sdserve.engine.prompts import enhance_prompt

    body = _body(user_key, "text2img", enhance_prompt="yes", instant_response="yes")
    data = server.post("/api/v4/dreambooth", body).json()
    expected_prompt, expected_negative = enhance_prompt("a red fox in snow", "")
    assert data["meta"]["prompt"] == expected_prompt != "a red fox in snow"
    assert data["meta"]["negative_prompt"] == expected_negative


def test_v3_uses_default_model_and_v3_names(server, user_key):
    data = server.post("/api/v3/text2img", _body(user_key, "text2img")).json()
    assert data["meta"]["model"] == "tiny-sd"
    prefix = data["meta"]["file_prefix"]
    assert data["output"][0].endswith(f"/generations/{prefix}-0.png")
    data = server.post("/api/v4/dreambooth", _body(user_key, "text2img")).json()
    assert data["output"][0].endswith(f"/generations/0-{data['meta']['file_prefix']}.png")


def test_sdxl_model(server, user_key):
    data = server.post(
        "/api/v6/images/text2img", {**_body(user_key, "text2img"), "model_id": "tiny-sdxl"}
    ).json()
    assert data["status"] == "success", data
    assert decode_png(data["output"][0]).size == (64, 64)
    for kind, path in (
        ("img2img", "/api/v6/images/img2img"),
        ("inpaint", "/api/v6/images/inpaint"),
    ):
        data = server.post(path, {**_body(user_key, kind), "model_id": "tiny-sdxl"}).json()
        assert data["status"] == "success", data


def test_system_load_and_model_list(server, user_key):
    load = server.post("/api/v3/system_load", {"key": user_key}).json()
    assert load["status"] == "ok"
    assert isinstance(load["queue_num"], int) and isinstance(load["queue_time"], int)
    models = server.post("/api/v4/dreambooth/model_list", {"key": user_key}).json()
    assert isinstance(models, list)
    assert {"tiny-sd", "tiny-sdxl"} <= {m["model_id"] for m in models}
    # built-ins are ready; hub ids are not downloaded on this offline test server
    status = {m["model_id"]: m["status"] for m in models}
    assert status["tiny-sd"] == status["tiny-sdxl"] == "model_ready"
    assert status["sd-1.5"] == "unavailable"


def test_model_reload(server, user_key):
    data = server.post(
        "/api/v4/dreambooth/model_reload", {"key": user_key, "model_id": "tiny-sdxl"}
    ).json()
    assert data["status"] == "success" and "tiny-sdxl" in data["message"]
    missing = server.post(
        "/api/v4/dreambooth/model_reload", {"key": user_key, "model_id": "nope"}
    ).json()
    assert missing["status"] == "error" and missing["message"] == "Model not found"


def test_openapi_docs(server):
    assert httpx.get(server.url + "/docs").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/api/v4/dreambooth" in spec["paths"] and "/api/v3/fetch/{job_id}" in spec["paths"]
    # every operation has its own id (SDK generators need them unique), GET and POST fetch too
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    assert set(spec["paths"]["/api/v3/fetch/{job_id}"]) == {"get", "post"}
    assert "Duplicate Operation ID" not in server.log.read_text()

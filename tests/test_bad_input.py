"""Every bad input gets a clear ModelsLab-style error, the server keeps serving, and no job is left behind."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import png_bytes
from PIL import Image

OK = {"model_id": "tiny-sd", "prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 2}


def _error(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text  # legacy status policy: errors are 200
    data = response.json()
    assert data["status"] == "error", data
    assert "message" in data and "messege" in data
    return data


def _job_count(server) -> int:
    with sqlite3.connect(server.data_dir / "sdserve.db") as db:
        return db.execute("select count(*) from jobs").fetchone()[0]


@pytest.fixture
def no_new_jobs(server):
    before = _job_count(server)
    yield
    assert _job_count(server) == before, "a rejected request must not leave a job behind"


@pytest.mark.parametrize(
    "change,field,message",
    [
        ({"prompt": None}, "prompt", "The prompt field is required."),
        ({"prompt": "   "}, "prompt", "The prompt field is required."),
        ({"width": "abc"}, "width", "The width must be an integer."),
        ({"height": [1, 2]}, "height", "The height must be an integer."),
        ({"width": 0}, "width", "The width must be between 64 and 8192; above 1024 it is reduced to 1024."),
        ({"height": -512}, "height", "The height must be between 64 and 8192; above 1024 it is reduced to 1024."),
        ({"width": 10**9}, "width", "The width must be between 64 and 8192; above 1024 it is reduced to 1024."),
        ({"num_inference_steps": 0}, "num_inference_steps", None),
        ({"num_inference_steps": -3}, "num_inference_steps", None),
        ({"num_inference_steps": 10**7}, "num_inference_steps", None),
        ({"guidance_scale": "lots"}, "guidance_scale", "The guidance_scale must be a number."),
        ({"samples": 0}, "samples", "The samples must be between 1 and 100; above 4 it is reduced to 4."),
        ({"safety_checker": "maybe"}, "safety_checker", None),
        ({"safety_checker_type": "sparkles"}, "safety_checker_type", None),
        ({"webhook": "ftp://example/hook"}, "webhook", None),
    ],
)
def test_validation_errors_are_field_maps(server, user_key, no_new_jobs, change, field, message):
    body = {"key": user_key, **OK, **change}
    data = _error(server.post("/api/v4/dreambooth", body))
    assert field in data["messege"], data
    assert isinstance(data["messege"][field], list)
    if message:
        assert data["messege"][field] == [message]
    assert isinstance(data["message"], str) and data["message"]


def test_invalid_json(server, no_new_jobs):
    response = httpx.post(
        server.url + "/api/v4/dreambooth",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert _error(response)["message"] == "Invalid API Request"
    response = httpx.post(server.url + "/api/v4/dreambooth", json=[1, 2, 3])
    assert _error(response)["message"] == "Invalid API Request"


def test_oversized_body(server, user_key, no_new_jobs):
    huge = "A" * (31 * 1024 * 1024)
    response = httpx.post(
        server.url + "/api/v4/dreambooth",
        content=json.dumps({"key": user_key, "prompt": huge}).encode(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert "larger than" in _error(response)["message"]


def test_missing_and_unknown_key(server, no_new_jobs):
    for body in ({**OK}, {**OK, "key": "not-a-real-key"}, {**OK, "key": ""}):
        data = _error(server.post("/api/v4/dreambooth", body))
        assert data["message"] == "Invalid Api Key" and "tip" in data


def test_unknown_model(server, user_key, no_new_jobs):
    data = _error(
        server.post("/api/v4/dreambooth", {"key": user_key, **OK, "model_id": "no-such-model"})
    )
    assert data["message"] == "Model not found"


def test_known_model_not_available_offline_says_how_to_import(server, user_key, no_new_jobs):
    data = _error(server.post("/api/v4/dreambooth", {"key": user_key, **OK, "model_id": "sdxl"}))
    assert "huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0" in data["message"]


def test_path_traversal_model_id(server, user_key, no_new_jobs):
    data = _error(
        server.post("/api/v4/dreambooth", {"key": user_key, **OK, "model_id": "../../etc"})
    )
    assert "model_id" in data["messege"]


def test_unknown_and_unusable_scheduler(server, user_key, no_new_jobs):
    for name in ("NoSuchScheduler", "ScoreSdeVeScheduler"):
        data = _error(server.post("/api/v4/dreambooth", {"key": user_key, **OK, "scheduler": name}))
        assert name in data["message"] and "EulerDiscreteScheduler" in data["message"]


def test_unknown_lora(server, user_key, no_new_jobs):
    data = _error(server.post("/api/v4/dreambooth", {"key": user_key, **OK, "lora_model": "nope"}))
    assert data["messege"]["lora_model"] == ["LoRA model not found: nope"]


class _Files(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes]] = {}

    def do_GET(self):
        status, payload = self.routes.get(self.path, (404, b"missing"))
        self.send_response(status)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def file_server():
    big = io.BytesIO()
    Image.new("RGB", (2500, 2500), (1, 2, 3)).save(big, format="BMP")  # 18.75 MB, uncompressed
    _Files.routes = {
        "/ok.png": (200, png_bytes()),
        "/text": (200, b"hello, not an image"),
        "/big.bmp": (200, big.getvalue()),
    }
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_bad_init_images(server, user_key, file_server, no_new_jobs):
    unreachable = "http://127.0.0.1:9/none.png"
    cases = [
        (unreachable, "could not be downloaded"),
        (f"{file_server}/missing.png", "404"),
        (f"{file_server}/text", "not a valid image"),
        (f"{file_server}/big.bmp", "larger than"),
        ("data:image/png;base64,!!!notbase64!!!", "base64"),
        (base64.b64encode(b"plain bytes, not an image").decode(), "not a valid image"),
        ("file:///etc/passwd", "http or https"),
    ]
    for init_image, fragment in cases:
        body = {"key": user_key, **OK, "init_image": init_image}
        data = _error(server.post("/api/v4/dreambooth/img2img", body))
        assert fragment in data["message"], (init_image, data)


def test_good_url_init_image_still_works(server, user_key, file_server):
    body = {"key": user_key, **OK, "init_image": f"{file_server}/ok.png", "safety_checker": "no"}
    data = server.post("/api/v4/dreambooth/img2img", body).json()
    assert data["status"] == "success", data
    assert data["meta"]["init_image"] == f"{file_server}/ok.png"


def test_unknown_job_and_bad_ids(server, user_key):
    for path in ("/api/v3/fetch/99999999", "/api/v3/fetch/abc", "/api/v4/dreambooth/fetch"):
        data = _error(server.post(path, {"key": user_key, "request_id": "nope"}))
        assert data["message"] == "Request not found"


def test_unknown_route_is_json(server):
    response = httpx.post(server.url + "/api/v9/nothing", json={})
    assert response.status_code == 404
    assert response.json()["status"] == "error"


def test_server_still_serves_after_bad_input(server, user_key):
    data = server.post("/api/v4/dreambooth", {"key": user_key, **OK, "safety_checker": "no"}).json()
    assert data["status"] == "success"

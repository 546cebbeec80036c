"""Super resolution through the server: every path and dialect, the shipped Real-ESRGAN weights
really restoring detail, and every bad input answered clearly."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from conftest import ADMIN_KEY
from PIL import Image
from test_super_resolution_engine import drawing, psnr

from sdserve.engine import super_resolution as sr


@pytest.fixture(scope="module")
def wheel():
    return sr.fetch_wheel()  # CI's scripts/setup has it already


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def fetched(url: str) -> Image.Image:
    response = httpx.get(url, timeout=60)
    assert response.status_code == 200, url
    return Image.open(io.BytesIO(response.content))


@pytest.mark.parametrize(
    "model_id", ["RealESRGAN_x4plus", "RealESRGAN_x4plus_anime_6B", "realesr-animevideov3"]
)
def test_each_shipped_model_upscales_better_than_bicubic(server, user_key, wheel, model_id):
    original = drawing(160, seed=3)
    small = original.resize((40, 40), Image.Resampling.BICUBIC)
    answer = server.post(
        "/api/v6/image_editing/super_resolution",
        {"key": user_key, "init_image": data_url(small), "scale": 4, "model_id": model_id},
    ).json()
    assert answer["status"] == "success", answer
    assert isinstance(answer["output"], list)
    upscaled = fetched(answer["output"][0])
    assert upscaled.size == (160, 160)
    bicubic = small.resize((160, 160), Image.Resampling.BICUBIC)
    assert psnr(upscaled.convert("RGB"), original) > psnr(bicubic, original) + 1
    assert answer["meta"]["model_id"] == model_id and answer["meta"]["upscale_factor"] == 4


@pytest.mark.parametrize(
    "path,single",
    [
        ("/api/v5/super_resolution", True),
        ("/api/v3/super_resolution", True),
        ("/api/v1/image_editing/super_resolution", False),
        ("/api/v1/enterprise/super_resolution", True),
        ("/api/v1/enterprise/super-resolution/super_resolution", True),
    ],
)
def test_every_path_answers_in_its_dialect(server, wheel, path, single):
    small = drawing(24, seed=4).resize((30, 20))
    body = {"key": ADMIN_KEY, "url": data_url(small), "scale": 2, "model_id": "realesr-animevideov3"}
    answer = server.post(path, body).json()
    assert answer["status"] == "success", answer
    # era A and enterprise: `output` is one URL string; era B: a list
    assert isinstance(answer["output"], str) is single
    url = answer["output"] if single else answer["output"][0]
    assert fetched(url).size == (60, 40)
    again = server.post(f"/api/v3/fetch/{answer['id']}", {"key": ADMIN_KEY}).json()
    assert again["output"] == answer["output"]


@pytest.mark.parametrize("scale", [1, 3])
def test_the_default_model_answers_every_scale(server, user_key, wheel, scale):
    small = drawing(16, seed=5).resize((21, 13))
    answer = server.post(
        "/api/v5/super_resolution",
        {"key": user_key, "url": data_url(small), "scale": scale, "tile": 0},  # 0: whole image
    ).json()
    assert answer["status"] == "success", answer
    assert fetched(answer["output"]).size == (21 * scale, 13 * scale)
    assert answer["meta"]["model_id"] == sr.DEFAULT_MODEL_ID
    assert answer["meta"]["weights"] == "realesr-animevideov3"  # the stand-in, said plainly


@pytest.mark.parametrize(
    "change,field,text",
    [
        ({"scale": 0}, "scale", "The scale must be between 1 and 4."),
        ({"scale": 5}, "scale", "The scale must be between 1 and 4."),
        ({"url": None}, "init_image", "The init image field is required"),
        ({"url": "bm90IGFuIGltYWdl"}, "init_image", "init_image is not a valid image"),
        ({"tile": 8}, "tile", "The tile must be 0 (no tiling) or at least 32 pixels."),
    ],
)
def test_bad_input_is_a_clear_error(server, user_key, change, field, text):
    body = {"key": user_key, "url": data_url(drawing(16)), "scale": 2, **change}
    answer = server.post("/api/v5/super_resolution", body).json()
    assert answer["status"] == "error", answer
    assert text in answer["message"]


def test_a_model_that_is_not_shipped_says_how_to_import_it(server, user_key):
    body = {"key": user_key, "url": data_url(drawing(16)), "model_id": "RealESRGAN_x2plus"}
    answer = server.post("/api/v5/super_resolution", body).json()
    assert answer["status"] == "error"
    assert "not shipped offline" in answer["message"]
    assert "/api/v3/load_model" in answer["message"] and "super_resolution" in answer["message"]


def test_face_enhance_is_answered_honestly(server, user_key):
    body = {"key": user_key, "url": data_url(drawing(16)), "face_enhance": True}
    answer = server.post("/api/v5/super_resolution", body).json()
    assert answer["status"] == "error" and "face_enhance is not available" in answer["message"]


def test_enterprise_paths_need_the_admin_key(server, user_key):
    body = {"key": user_key, "url": data_url(drawing(16))}
    answer = server.post("/api/v1/enterprise/super_resolution", body).json()
    assert answer["status"] == "error" and answer["message"] == "Invalid Api Key"

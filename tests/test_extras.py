"""Optional extras: a server without NudeNet, PyAV, boto3, psycopg and prometheus-client still
generates images, and each feature that needs a missing one answers with an error naming the extra."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_KEY, ServerProcess, base_env
from PIL import Image

BLOCKER = Path(__file__).parent / "without_extras"
BLOCKED = "nudenet,onnxruntime,av,boto3,botocore,psycopg,psycopg_binary,prometheus_client"
TEXT2IMG = {
    "key": ADMIN_KEY,
    "model_id": "tiny-sd",
    "prompt": "a vase",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
}
VIDEO = {**TEXT2IMG, "num_frames": 4, "fps": 4}


def _without_extras() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(BLOCKER), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "SDSERVE_BLOCK_MODULES": BLOCKED}


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("bare"), **_without_extras()).start()
    yield srv
    srv.stop()


def test_the_blocker_hides_the_modules():
    env = base_env(Path("."), **_without_extras())
    code = "import importlib.util as u; print(u.find_spec('av'), u.find_spec('PIL') is None)"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.stdout.split() == ["None", "False"], run


def test_text2img_works_without_the_extras(bare_server):
    data = bare_server.post("/api/v6/images/text2img", {**TEXT2IMG, "safety_checker": "no"}).json()
    assert data["status"] == "success", data
    image = Image.open(io.BytesIO(httpx.get(data["output"][0], timeout=30).content))
    assert image.size == (64, 64)


def test_nsfw_check_names_the_nsfw_extra(bare_server):
    data = bare_server.post("/api/v6/images/text2img", {**TEXT2IMG, "safety_checker": "yes"}).json()
    assert data["status"] in ("error", "failed"), data
    assert "NSFW check" in data["message"] and "sdserve[nsfw]" in data["message"], data


def test_mp4_names_the_video_extra_and_gif_still_works(bare_server):
    mp4 = bare_server.post("/api/v6/video/text2video", {**VIDEO, "output_type": "mp4"}).json()
    assert mp4["status"] in ("error", "failed"), mp4
    assert "sdserve[video]" in mp4["message"], mp4
    gif = bare_server.post("/api/v6/video/text2video", {**VIDEO, "output_type": "gif"}).json()
    assert gif["status"] == "success", gif
    frames = Image.open(io.BytesIO(httpx.get(gif["output"][0], timeout=30).content))
    assert frames.format == "GIF" and frames.n_frames == 4


def test_metrics_and_s3_name_their_extras(bare_server):
    metrics = httpx.get(bare_server.url + "/metrics", timeout=30)
    assert metrics.status_code == 501 and "sdserve[metrics]" in metrics.json()["message"]
    s3 = bare_server.post(
        "/api/v1/enterprise/update_s3", {"key": ADMIN_KEY, "image_directory": "bucket"}
    ).json()
    assert s3["status"] == "error" and "sdserve[s3]" in s3["message"], s3


def test_postgres_url_without_psycopg_fails_at_start_naming_the_extra(tmp_path):
    env = base_env(
        tmp_path,
        SDSERVE_DATABASE_URL="postgresql://sdserve@127.0.0.1:1/sdserve",
        **_without_extras(),
    )
    run = subprocess.run(
        [sys.executable, "-m", "sdserve.cli", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "sdserve: A PostgreSQL job store" in run.stderr and "sdserve[postgres]" in run.stderr
    assert "Traceback" not in run.stderr

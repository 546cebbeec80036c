"""update_s3: outputs move to an S3-compatible bucket (moto's real server) at run time."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from conftest import ADMIN_KEY, ServerProcess, create_key
from PIL import Image

from sdserve.testing import MotoServer

SECRET = "very-secret-key-value"
GEN = {
    "prompt": "a boat",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "safety_checker": "no",
}


@pytest.fixture(scope="module")
def s3():
    moto = MotoServer().start()
    moto.client().create_bucket(Bucket="outputs")
    yield moto
    moto.stop()


def s3_body(s3, **change) -> dict:
    return {
        "key": ADMIN_KEY,
        "endpoint_url": s3.url,
        "region_name": "us-east-1",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": SECRET,
        "image_directory": "outputs/sdserve",
        **change,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("s3-server")).start()
    yield srv
    srv.stop()


def test_update_s3_switches_new_outputs_to_the_bucket(server, s3):
    key = create_key(server.data_dir)
    before = server.post("/api/v3/text2img", {"key": key, **GEN}).json()
    assert before["output"][0].startswith(server.url)

    bad = server.post("/api/v1/enterprise/update_s3", s3_body(s3, image_directory="no-such-bucket"))
    assert bad.json()["status"] == "error" and SECRET not in bad.text
    answer = server.post("/api/v1/enterprise/update_s3", s3_body(s3))
    data = answer.json()
    assert data["status"] == "success", data
    assert SECRET not in answer.text and data["s3"]["secret_access_key"] == "***"
    after = server.post("/api/v3/text2img", {"key": key, **GEN}).json()
    assert after["status"] == "success", after
    url = after["output"][0]
    assert url.startswith(s3.url + "/outputs/sdserve/generations/")  # presigned
    image = Image.open(io.BytesIO(httpx.get(url).content))
    assert image.format == "PNG" and image.size == (64, 64)
    stored = s3.client().list_objects_v2(Bucket="outputs", Prefix="sdserve/generations/")
    assert len(stored["Contents"]) == 1
    # older outputs keep working where they were written
    assert httpx.get(before["output"][0]).status_code == 200
    fetched = server.post(f"/api/v3/fetch/{after['id']}", {"key": key}).json()
    assert fetched["output"][0].split("?")[0] == url.split("?")[0]
    details = server.post("/api/v1/enterprise/system_details", {"key": ADMIN_KEY})
    assert details.json()["storage"]["kind"] == "s3" and SECRET not in details.text
    assert SECRET not in json.dumps(fetched)

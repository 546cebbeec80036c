"""S3Storage against moto's real standalone S3 server over HTTP (no in-process mocks)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import boto3
import httpx
import pytest
from PIL import Image

from sdserve.storage.local import InvalidStorageKey
from sdserve.storage.s3 import S3Config, S3Storage, S3Unavailable
from sdserve.testing import MotoServer

REGION = "us-east-1"
ACCESS_KEY = "testing"
# moto accepts any credentials; a distinctive secret makes "never echoed" a meaningful check.
SECRET = "testing-secret-must-never-leak"
BUCKET = "outputs"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    moto = MotoServer().start()
    yield moto.url
    moto.stop()


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> str:
    boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=BUCKET)
    return BUCKET


def _config(endpoint: str, bucket: str = BUCKET, **change) -> S3Config:
    return S3Config(
        bucket=bucket,
        endpoint_url=endpoint,
        region_name=REGION,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET,
        **change,
    )


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_round_trip_and_presigned_url(s3_server: str, bucket: str) -> None:
    storage = S3Storage(_config(s3_server, prefix="rt"))
    data = _png()
    assert not storage.exists("generations/a.png")
    storage.put("generations/a.png", data)
    storage.put("generations/a.png", data)  # a re-put overwrites
    assert storage.exists("generations/a.png")
    assert storage.get("generations/a.png") == data

    answer = httpx.get(storage.url("generations/a.png"), timeout=10)
    assert answer.status_code == 200
    assert answer.content == data
    assert answer.headers["content-type"] == "image/png"

    storage.delete("generations/a.png")
    assert not storage.exists("generations/a.png")
    with pytest.raises(FileNotFoundError):
        storage.get("generations/a.png")
    storage.delete("generations/a.png")  # deleting a missing object is fine


def test_public_url(s3_server: str, bucket: str) -> None:
    storage = S3Storage(_config(s3_server, prefix="/site/", public_url="https://cdn.example/"))
    assert storage.url("generations/a.png") == "https://cdn.example/site/generations/a.png"


def test_prefix_places_objects(s3_server: str, bucket: str) -> None:
    raw = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    S3Storage(_config(s3_server, prefix="/pre/fix/")).put("temp/x.bin", b"1")
    S3Storage(_config(s3_server)).put("temp/y.bin", b"2")
    assert raw.get_object(Bucket=bucket, Key="pre/fix/temp/x.bin")["Body"].read() == b"1"
    assert raw.get_object(Bucket=bucket, Key="temp/y.bin")["Body"].read() == b"2"
    assert not S3Storage(_config(s3_server)).exists("temp/x.bin")


@pytest.mark.parametrize("key", ["../x", "a/../b", "/abs", "a//b", "a\\b", ""])
def test_invalid_keys(s3_server: str, bucket: str, key: str) -> None:
    storage = S3Storage(_config(s3_server, prefix="p"))
    with pytest.raises(InvalidStorageKey):
        storage.put(key, b"x")
    for call in (storage.get, storage.delete, storage.url):
        with pytest.raises(InvalidStorageKey):
            call(key)
    assert storage.exists(key) is False


def test_delete_older_than(s3_server: str, bucket: str) -> None:
    storage = S3Storage(_config(s3_server, prefix="age"))
    storage.put("temp/a.png", b"a")
    storage.put("temp/sub/b.png", b"b")
    storage.put("generations/keep.png", b"k")
    assert storage.delete_older_than("temp", 3600) == 0
    assert storage.exists("temp/a.png")
    time.sleep(0.01)  # LastModified must be strictly before the cutoff
    assert storage.delete_older_than("temp", 0) == 2
    assert not storage.exists("temp/a.png")
    assert not storage.exists("temp/sub/b.png")
    assert storage.exists("generations/keep.png")
    assert storage.delete_older_than("empty", 0) == 0


def test_check_good_and_missing_bucket(s3_server: str, bucket: str) -> None:
    S3Storage(_config(s3_server, prefix="chk")).check()
    with pytest.raises(S3Unavailable) as caught:
        S3Storage(_config(s3_server, bucket="no-such-bucket")).check()
    assert "no-such-bucket" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_server_down_fails_fast() -> None:
    moto = MotoServer().start()
    url = moto.url
    moto.stop()
    storage = S3Storage(_config(url))
    calls = [
        lambda: storage.put("temp/a.png", b"x"),
        lambda: storage.get("temp/a.png"),
        lambda: storage.exists("temp/a.png"),
        lambda: storage.delete("temp/a.png"),
        lambda: storage.delete_older_than("temp", 0),
        storage.check,
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(S3Unavailable) as caught:
            call()
        assert time.monotonic() - started < 15
        assert BUCKET in str(caught.value)
        assert SECRET not in str(caught.value)
        assert SECRET not in repr(caught.value)


def test_redacted_hides_secret() -> None:
    shown = S3Config(bucket="b", access_key_id="AKIAEXAMPLE", secret_access_key=SECRET).redacted()
    assert SECRET not in str(shown)
    assert shown["secret_access_key"] == "***"
    assert shown["access_key_id"].startswith("AKIA")
    assert "EXAMPLE" not in shown["access_key_id"]
    assert shown["bucket"] == "b"
    assert S3Config(bucket="b").redacted()["secret_access_key"] is None

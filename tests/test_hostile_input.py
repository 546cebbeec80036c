"""What used to crash a handler (huge or odd ids, deep JSON, lone surrogates, NaN, NUL bytes) gets a
clear error, no job, and an unhandled exception is counted in /metrics without dropping keep-alive."""

from __future__ import annotations

import re
import socket
import sqlite3
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess, create_key

OK = {"model_id": "tiny-sd", "prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 2}
INTERNAL = "Internal server error"


def _jobs(server) -> int:
    with sqlite3.connect(server.data_dir / "sdserve.db") as db:
        return db.execute("select count(*) from jobs").fetchone()[0]


def _raw_post(server, path: str, body: str) -> dict:
    response = httpx.post(
        server.url + path,
        content=body.encode("utf-8", "surrogatepass"),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert INTERNAL not in response.text, response.text
    assert response.status_code == 200, response.text  # legacy policy: errors answer 200
    return response.json()


def _internal_errors(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=60).text
    match = re.search(r"^sdserve_internal_errors_total (\S+)$", text, re.M)
    assert match, "no sdserve_internal_errors_total in /metrics"
    return float(match.group(1))


@pytest.mark.parametrize(
    "path,body",
    [
        ("/api/v3/fetch/9223372036854775808", {}),
        ("/api/v3/fetch/99999999999999999999999", {}),
        ("/api/v6/images/fetch", {"request_id": 2**63}),
        ("/api/v6/images/fetch", {"request_id": "9223372036854775808"}),
        ("/api/v3/fetch/1_0", {}),
        ("/api/v3/fetch/%EF%BC%91", {}),  # a full-width 1
        ("/api/v3/fetch/+1", {}),
        ("/api/v3/fetch/-1", {}),
        ("/api/v6/images/fetch", {"request_id": "1 0"}),
        ("/api/v6/images/fetch", {"request_id": 1.0}),
        ("/api/v6/images/fetch", {"request_id": True}),
    ],
)
def test_ids_are_parsed_strictly(server, user_key, path, body):
    """Job 1 and job 10 exist, so an id read loosely (`1_0` is 10 to int()) would find one."""
    while _jobs(server) < 10:
        server.post("/api/v3/text2img", {**OK, "key": user_key})
    before = _internal_errors(server)
    data = server.post(path, {**body, "key": user_key}).json()
    assert data["status"] == "error" and data["message"] == "Request not found", data
    assert _internal_errors(server) == before


@pytest.mark.parametrize(
    "request_id,message",
    [
        (2**64, "Image not found"),
        ("18446744073709551616", "Image not found"),
        ("1_0", "The request id must be an integer."),
        ("１", "The request id must be an integer."),
    ],
)
def test_delete_image_ids(server, user_key, request_id, message):
    data = server.post("/api/v3/delete_image", {"key": user_key, "request_id": request_id}).json()
    assert data["status"] == "error" and data["message"] == message, data


def test_training_ids_are_tokens(server, user_key):
    for training_id in ("%00", "%F0%9F%98%80", "a" * 200):
        data = server.post(f"/api/v3/fine_tune_status/{training_id}", {"key": user_key}).json()
        assert data["status"] == "error" and data["message"] == "Training not found", data


def test_deeply_nested_json(server, user_key):
    before = _jobs(server)
    for depth in (1000, 100_000):
        nested = "[" * depth + "]" * depth
        data = _raw_post(
            server, "/api/v3/text2img", f'{{"key": "{user_key}", "prompt": "a", "x": {nested}}}'
        )
        assert data["status"] == "error" and data["message"] == "Invalid API Request", data
    assert _jobs(server) == before


@pytest.mark.parametrize(
    "field,value",
    [
        ("prompt", '"a \\ud800 cat"'),
        ("negative_prompt", '"\\udfff"'),
        ("track_id", '"x\\ud83d"'),
        ("prompt", '"a \\u0000 cat"'),
    ],
)
def test_unstorable_strings_rejected_at_the_edge(server, user_key, field, value):
    before = _jobs(server)
    body = (
        f'{{"key": "{user_key}", "prompt": "a cat", "width": 64, "height": 64, "{field}": {value}}}'
    )
    data = _raw_post(server, "/api/v3/text2img", body)
    assert data["status"] == "error" and field in data["messege"], data
    assert _jobs(server) == before


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("field", ["track_id", "guidance_scale"])
def test_non_finite_numbers_rejected_at_the_edge(server, user_key, field, value):
    before = _jobs(server)
    body = (
        f'{{"key": "{user_key}", "prompt": "a cat", "width": 64, "height": 64, "{field}": {value}}}'
    )
    data = _raw_post(server, "/api/v3/text2img", body)
    assert data["status"] == "error", data
    assert data["messege"] == {field: [f"The {field} must be a finite number."]}, data
    assert _jobs(server) == before


def test_nan_in_a_nested_field(server, user_key):
    body = f'{{"key": "{user_key}", "prompt": "a cat", "extra": {{"deep": [1, NaN]}}}}'
    data = _raw_post(server, "/api/v3/text2img", body)
    assert data["status"] == "error" and "extra" in data["messege"], data


@pytest.mark.parametrize(
    "path",
    ["/video_generations/%00", "/generations/%00", "/generations/a%00.png", "/temp/x/%00/y"],
)
def test_nul_byte_in_a_file_url_is_a_404(server, path):
    response = httpx.get(server.url + path, timeout=30)
    assert response.status_code == 404, response.text
    assert response.json()["message"] == "Not found"


def _faulty_server(tmp_path: Path, **env: str) -> ServerProcess:
    """The real app plus one route that raises (tests/faulty_server.py): no input reaches an
    unhandled exception any more, and this is what one must look like when a bug does."""
    srv = ServerProcess(tmp_path, **env)
    script = Path(__file__).with_name("faulty_server.py")
    srv.argv = [sys.executable, str(script), str(srv.port)]
    return srv.start()


@pytest.mark.parametrize("policy,status", [("legacy", 200), ("http", 500)])
def test_unhandled_error_is_counted_and_keeps_the_connection(tmp_path, policy, status):
    srv = _faulty_server(tmp_path, SDSERVE_ERROR_STATUS=policy)
    key = create_key(srv.data_dir)
    assert _internal_errors(srv) == 0
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as conn:
        stream = conn.makefile("rb")
        for _ in range(2):  # the same connection answers again after the error
            body = f'{{"key": "{key}"}}'.encode()
            conn.sendall(
                b"POST /test/raise HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status_line = stream.readline().decode()
            headers = {}
            while (line := stream.readline().decode().strip()) != "":
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
            payload = stream.read(int(headers["content-length"])).decode()
            assert status_line.split()[1] == str(status), status_line
            assert headers.get("connection") != "close", headers
            assert '"status":"error"' in payload and INTERNAL in payload
    assert _internal_errors(srv) == 2
    srv.stop()

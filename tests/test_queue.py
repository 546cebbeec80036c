"""Durability: queued jobs survive a restart, a killed worker's job is finished by another, keys and limits."""

from __future__ import annotations

import signal
import sqlite3
import time

import httpx
from conftest import ADMIN_KEY, ServerProcess, create_key, decode_png, run_cli, start_worker

from sdserve.testing import scaled

BODY = {
    "model_id": "tiny-sd",
    "prompt": "a lighthouse",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "safety_checker": "no",
    "instant_response": "yes",
}


def _wait_success(server, key, job_id, timeout=120) -> dict:
    deadline = time.time() + scaled(timeout)  # a loaded CI machine is slower, not broken
    while time.time() < deadline:
        data = server.post(f"/api/v3/dreambooth/fetch/{job_id}", {"key": key}).json()
        if data["status"] != "processing":
            return data
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def test_queued_jobs_survive_restart(tmp_path):
    api = ServerProcess(tmp_path, SDSERVE_IN_PROCESS_WORKER="0").start()
    key = create_key(tmp_path)
    ids = [
        api.post("/api/v4/dreambooth", {"key": key, **BODY, "seed": i + 1}).json()["id"]
        for i in range(3)
    ]
    assert all(
        api.post(f"/api/v3/fetch/{i}", {"key": key}).json()["status"] == "processing" for i in ids
    )
    api.stop()

    restarted = ServerProcess(tmp_path).start()  # same data dir, now with its worker
    try:
        for job_id in ids:
            data = _wait_success(restarted, key, job_id)
            assert data["status"] == "success", data
            assert decode_png(data["output"][0].replace(api.url, restarted.url)).size == (64, 64)
    finally:
        restarted.stop()


def test_killed_worker_job_is_finished_by_another(tmp_path):
    lease = {"SDSERVE_LEASE_SECONDS": "2"}
    api = ServerProcess(tmp_path, SDSERVE_IN_PROCESS_WORKER="0", **lease).start()
    key = create_key(tmp_path)
    slow = {**BODY, "width": 512, "height": 512, "num_inference_steps": 40}
    job_id = api.post("/api/v4/dreambooth", {"key": key, **slow}).json()["id"]

    doomed = start_worker(tmp_path, **lease)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            data = api.post(f"/api/v3/fetch/{job_id}", {"key": key}).json()
            if data["progress"]["step"] > 0:
                break
            time.sleep(0.1)
        assert data["status"] == "processing" and data["progress"]["step"] > 0, data
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()

        rescuer = start_worker(tmp_path, **lease)
        try:
            data = _wait_success(api, key, job_id, timeout=180)
            assert data["status"] == "success", data
            assert decode_png(data["output"][0]).size == (512, 512)
        finally:
            rescuer.terminate()
            rescuer.wait(timeout=60)
        with sqlite3.connect(tmp_path / "sdserve.db") as db:
            attempts, status = db.execute(
                "select attempts, status from jobs where id=?", (job_id,)
            ).fetchone()
        assert (attempts, status) == (2, "success")
    finally:
        if doomed.poll() is None:
            doomed.kill()
        api.stop()


def test_other_keys_jobs_are_not_found(server, user_key):
    other = create_key(server.data_dir)
    job_id = server.post("/api/v4/dreambooth", {"key": user_key, **BODY}).json()["id"]
    data = server.post(f"/api/v3/fetch/{job_id}", {"key": other}).json()
    assert data["status"] == "error" and data["message"] == "Request not found"
    data = server.post("/api/v4/dreambooth/fetch", {"key": other, "request_id": job_id}).json()
    assert data["status"] == "error"
    # the admin (enterprise) key sees every job
    assert server.post(f"/api/v3/fetch/{job_id}", {"key": ADMIN_KEY}).json()["status"] != "error"


def test_queue_limit_answers_rate_limit(tmp_path):
    api = ServerProcess(tmp_path, SDSERVE_IN_PROCESS_WORKER="0").start()
    try:
        key = create_key(tmp_path, "--queue-limit", "2")
        for _ in range(2):
            assert (
                api.post("/api/v4/dreambooth", {"key": key, **BODY}).json()["status"]
                == "processing"
            )
        response = api.post("/api/v4/dreambooth", {"key": key, **BODY})
        assert response.status_code == 429
        data = response.json()
        assert data["status"] == "error" and data["message"].startswith("Rate limit exceeded")
        assert data["messege"] == data["message"] and data["retry_after"] == 30
    finally:
        api.stop()


def test_keys_cli_create_list_revoke(tmp_path):
    key = create_key(tmp_path, "--label", "bot")
    rows = run_cli("keys", "list", data_dir=tmp_path)
    assert '"label": "bot"' in rows and key[:8] in rows
    assert key not in rows  # only the prefix is ever shown again
    with sqlite3.connect(tmp_path / "sdserve.db") as db:
        stored = [row[0] for row in db.execute("select key_hash from api_keys")]
    assert key not in stored and len(stored[0]) == 64  # hashed
    api = ServerProcess(tmp_path).start()
    try:
        assert api.post("/api/v3/system_load", {"key": key}).json()["status"] == "ok"
        run_cli("keys", "revoke", key[:8], data_dir=tmp_path)
        deadline = time.time() + 10  # servers cache key lookups for 2 s
        while api.post("/api/v3/system_load", {"key": key}).json().get("status") == "ok":
            assert time.time() < deadline, "revoked key still accepted"
            time.sleep(0.2)
        assert api.post("/api/v3/system_load", {"key": key}).json()["message"] == "Invalid Api Key"
    finally:
        api.stop()


def test_models_cli_lists_builtins(tmp_path):
    out = run_cli("models", "list", data_dir=tmp_path)
    assert "tiny-sd\tbuiltin" in out and "tiny-sdxl\tbuiltin" in out


def test_http_status_policy(tmp_path):
    api = ServerProcess(tmp_path, SDSERVE_ERROR_STATUS="http").start()
    try:
        assert api.post("/api/v4/dreambooth", {"key": "bad", **BODY}).status_code == 401
        response = api.post("/api/v4/dreambooth", {"key": ADMIN_KEY, **BODY, "prompt": ""})
        assert response.status_code == 422 and response.json()["messege"]["prompt"]
        assert (
            api.post("/api/v4/dreambooth", {"key": ADMIN_KEY, **BODY, "model_id": "x"}).status_code
            == 404
        )
    finally:
        api.stop()


def test_eta_and_queue_position_from_queue_ahead(tmp_path):
    api = ServerProcess(tmp_path, SDSERVE_IN_PROCESS_WORKER="0").start()
    try:
        key = create_key(tmp_path)
        big = {**BODY, "width": 512, "height": 512, "num_inference_steps": 20}
        first = api.post("/api/v4/dreambooth", {"key": key, **big}).json()
        second = api.post("/api/v4/dreambooth", {"key": key, **big}).json()
        assert second["eta"] > first["eta"] > 0
        assert api.post(f"/api/v3/fetch/{second['id']}", {"key": key}).json()["queue_position"] == 1
        load = api.post("/api/v3/system_load", {"key": key}).json()
        assert load["queue_num"] == 2 and load["queue_time"] >= 1
        assert httpx.get(api.url + "/openapi.json").status_code == 200
    finally:
        api.stop()

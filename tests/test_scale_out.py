"""Scale-out on real components: PostgreSQL, an S3 server (moto's), one API process and several
`sdserve worker` processes with the no-op engine, and the faults a deployment meets."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import (
    ADMIN_KEY,
    FileServer,
    ServerProcess,
    WebhookReceiver,
    create_key,
    decode_png,
    start_worker,
    wait_for_job,
    write_lora,
)
from sqlalchemy import create_engine, text

from sdserve.jobs.store import normalize_database_url
from sdserve.testing import MotoServer, PostgresServer

BODY = {
    "prompt": "x",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "instant_response": "yes",
}


@pytest.fixture(scope="module")
def s3():
    moto = MotoServer().start()
    moto.client().create_bucket(Bucket="sdserve")
    yield moto
    moto.stop()


def deployment_env(database_url: str, s3: MotoServer, **extra: str) -> dict[str, str]:
    return {
        "SDSERVE_DATABASE_URL": database_url,
        "SDSERVE_ENGINE": "noop",
        "SDSERVE_S3_BUCKET": "sdserve",
        "SDSERVE_S3_ENDPOINT_URL": s3.url,
        "SDSERVE_S3_REGION": "us-east-1",
        "SDSERVE_S3_ACCESS_KEY_ID": "testing",
        "SDSERVE_S3_SECRET_ACCESS_KEY": "testing",
        "SDSERVE_LEASE_SECONDS": "3",
        "SDSERVE_WEBHOOK_BACKOFF_SECONDS": "0.2",
        **extra,
    }


def rows(database_url: str, query: str) -> list:
    engine = create_engine(normalize_database_url(database_url))
    try:
        with engine.connect() as connection:
            return connection.execute(text(query)).all()
    finally:
        engine.dispose()


def submit_until_accepted(api: ServerProcess, body: dict, deadline: float) -> int:
    """Submit, retrying while the API is restarting; the id of the accepted job."""
    while time.time() < deadline:
        try:
            data = httpx.post(api.url + "/api/v3/text2img", json=body, timeout=30).json()
        except (httpx.HTTPError, ValueError):  # down or restarting
            time.sleep(0.1)
            continue
        if data.get("status") in ("processing", "success"):
            return data["id"]
        assert "unavailable" in data.get("message", "").lower(), data
        time.sleep(0.1)
    raise AssertionError("a job was never accepted")


def test_three_workers_a_killed_worker_and_an_api_restart_lose_nothing(postgres, s3, tmp_path):
    url = postgres.new_database()
    env = deployment_env(url, s3, SDSERVE_NOOP_SECONDS="0.05")
    receiver = WebhookReceiver()
    api = ServerProcess(tmp_path / "api", SDSERVE_IN_PROCESS_WORKER="0", **env).start()
    workers = [start_worker(tmp_path / f"worker{i}", **env) for i in range(3)]
    try:
        key = create_key(api.data_dir, "--queue-limit", "1000", env=env)
        body = {**BODY, "key": key, "webhook": receiver.url}
        accepted: list[int] = []
        deadline = time.time() + 120

        def client(n: int) -> None:
            for _ in range(n):
                accepted.append(submit_until_accepted(api, body, deadline))

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, 25) for _ in range(8)]
            while len(accepted) < 70:
                time.sleep(0.02)
            workers[0].send_signal(signal.SIGKILL)  # mid-run, holding a leased batch
            while len(accepted) < 140:
                time.sleep(0.02)
            api.stop()  # graceful; clients retry while it is down
            api.start()
            for future in futures:
                future.result()
        assert len(set(accepted)) == 200

        while time.time() < deadline:
            pending = rows(url, "SELECT count(*) FROM jobs WHERE status != 'success'")[0][0]
            if pending == 0:
                break
            time.sleep(0.2)
        jobs = rows(url, "SELECT id, status, result FROM jobs")
        assert len(jobs) == 200 and {status for _, status, _ in jobs} == {"success"}

        # one outbox row per job, and every job's final webhook arrived; delivery is at-least-once,
        # so only a webhook in flight in the killed worker or the stopped API may come twice
        receiver.wait_for(200, timeout=60)
        received = [p["id"] for p in receiver.received]
        assert set(received) == {j[0] for j in jobs}
        assert len(received) - len(set(received)) <= 2
        assert rows(url, "SELECT count(*), count(DISTINCT job_id) FROM webhook_outbox")[0] == (
            200,
            200,
        )
        # the bucket holds each job's output once, and nothing else
        import json

        expected = set()
        for _, _, result in jobs:
            result = json.loads(result) if isinstance(result, str) else result
            expected.update(k.removeprefix("s3:") for k in result["output_keys"])
        listed = s3.client().list_objects_v2(Bucket="sdserve", Prefix="generations/")
        assert {o["Key"] for o in listed.get("Contents", [])} == expected
        assert len(expected) == 200
        # a restarted worker's jobs show more than one attempt; none failed for it
        assert rows(url, "SELECT max(attempts) FROM jobs")[0][0] >= 1
    finally:
        for worker in workers:
            worker.kill() if worker.poll() is None else None
            worker.wait()
        api.stop()
        receiver.close()


def test_database_outage_gives_clear_errors_and_recovers(s3, tmp_path):
    database = PostgresServer().start()
    try:
        url = database.new_database()
        env = deployment_env(url, s3)
        api = ServerProcess(tmp_path / "api", SDSERVE_IN_PROCESS_WORKER="0", **env).start()
        worker = start_worker(tmp_path / "worker", **env)
        try:
            key = create_key(api.data_dir, "--queue-limit", "1000", env=env)
            before = submit_until_accepted(api, {**BODY, "key": key}, time.time() + 30)
            database.stop()
            answers = [
                httpx.post(api.url + "/api/v3/text2img", json={**BODY, "key": key}, timeout=30)
                for _ in range(5)
            ]
            for answer in answers:
                assert answer.status_code != 500
                assert answer.json()["status"] == "error"
                assert "unavailable" in answer.json()["message"].lower()
            assert httpx.get(api.url + "/readyz").status_code == 503
            time.sleep(2)
            database.start()
            after = submit_until_accepted(api, {**BODY, "key": key}, time.time() + 30)
            assert httpx.get(api.url + "/readyz").status_code == 200
            deadline = time.time() + 60
            for job_id in (before, after):
                while time.time() < deadline:
                    data = api.post(f"/api/v3/fetch/{job_id}", {"key": key}).json()
                    if data["status"] == "success":
                        break
                    time.sleep(0.2)
                assert data["status"] == "success", data
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            api.stop()
    finally:
        database.remove()


def test_s3_outage_fails_jobs_clearly_and_loses_none(postgres, tmp_path):
    moto = MotoServer().start()
    moto.client().create_bucket(Bucket="sdserve")
    url = postgres.new_database()
    env = deployment_env(url, moto)
    api = ServerProcess(tmp_path / "api", **env).start()  # its own worker
    try:
        key = create_key(api.data_dir, env=env)
        ok = api.post("/api/v3/text2img", {**BODY, "key": key, "instant_response": "no"}).json()
        assert ok["status"] == "success" and ok["output"][0].startswith(moto.url)
        moto.stop()
        failed = api.post("/api/v3/text2img", {**BODY, "key": key, "instant_response": "no"}).json()
        assert failed["status"] == "failed"
        assert "S3 put on bucket sdserve failed" in failed["message"]
        assert httpx.get(api.url + "/readyz").status_code == 503
        moto.start()
        moto.client().create_bucket(Bucket="sdserve")
        again = api.post("/api/v3/text2img", {**BODY, "key": key, "instant_response": "no"}).json()
        assert again["status"] == "success"
        statuses = rows(url, "SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")
        assert statuses == [("failed", 1), ("success", 2)]
    finally:
        api.stop()
        moto.stop()


def test_health_and_metrics(postgres, s3, tmp_path):
    url = postgres.new_database()
    env = deployment_env(url, s3)
    api = ServerProcess(tmp_path / "api", **env).start()
    try:
        key = create_key(api.data_dir, env=env)
        assert (
            api.post("/api/v3/text2img", {**BODY, "key": key, "instant_response": "no"}).json()[
                "status"
            ]
            == "success"
        )
        assert httpx.get(api.url + "/healthz").json() == {"status": "ok"}
        ready = httpx.get(api.url + "/readyz")
        assert ready.status_code == 200 and ready.json()["database"] == "ok"
        deadline = time.time() + 10
        while time.time() < deadline:
            metrics = httpx.get(api.url + "/metrics").text
            if "sdserve_workers{" in metrics:
                break
            time.sleep(0.5)
        assert 'sdserve_jobs{kind="text2img",status="success"} 1.0' in metrics
        assert "sdserve_queue_depth 0.0" in metrics
        assert "sdserve_job_seconds_count 1.0" in metrics
        assert "sdserve_webhook_failures_total 0.0" in metrics
        assert "sdserve_model_loads_total" in metrics
        assert "sdserve_workers{" in metrics
    finally:
        api.stop()


def test_sigterm_drains_a_worker(postgres, s3, tmp_path):
    url = postgres.new_database()
    env = deployment_env(url, s3, SDSERVE_NOOP_SECONDS="0.5", SDSERVE_MAX_BATCH_SIZE="1")
    api = ServerProcess(tmp_path / "api", SDSERVE_IN_PROCESS_WORKER="0", **env).start()
    worker = start_worker(tmp_path / "worker", **env)
    try:
        key = create_key(api.data_dir, "--queue-limit", "1000", env=env)
        ids = [api.post("/api/v3/text2img", {**BODY, "key": key}).json()["id"] for _ in range(6)]
        while rows(url, "SELECT count(*) FROM jobs WHERE status = 'processing'")[0][0] == 0:
            time.sleep(0.05)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        statuses = dict(rows(url, "SELECT status, count(*) FROM jobs GROUP BY status"))
        assert statuses.get("processing", 0) == 0  # the running job finished, the rest wait
        assert statuses.get("success", 0) >= 1 and statuses.get("queued", 0) >= 1
        replacement = start_worker(tmp_path / "worker2", **env)
        try:
            deadline = time.time() + 60
            while rows(url, "SELECT count(*) FROM jobs WHERE status = 'success'")[0][0] < len(ids):
                assert time.time() < deadline
                time.sleep(0.2)
        finally:
            replacement.terminate()
            replacement.wait(timeout=30)
    finally:
        api.stop()


def test_imported_models_reach_workers_on_other_hosts(postgres, s3, tmp_path, tiny_models_dir):
    from diffusers import StableDiffusionPipeline

    host = FileServer()
    write_lora(
        StableDiffusionPipeline.from_pretrained(tiny_models_dir / "tiny-sd"),
        tmp_path / "style.safetensors",
        seed=4,
    )
    host.files["style.safetensors"] = (tmp_path / "style.safetensors").read_bytes()
    url = postgres.new_database()
    env = deployment_env(url, s3, SDSERVE_ENGINE="diffusers")
    api = ServerProcess(tmp_path / "api", SDSERVE_IN_PROCESS_WORKER="0", **env).start()
    first = start_worker(tmp_path / "host-a", **env)
    body = {
        **BODY,
        "key": ADMIN_KEY,
        "model_id": "tiny-sd",
        "seed": 3,
        "safety_checker": "no",
        "instant_response": "no",
    }
    try:
        load = api.post(
            "/api/v1/enterprise/load_model",
            {
                "key": ADMIN_KEY,
                "url": f"{host.url}/files/style.safetensors",
                "model_id": "shared",
                "model_category": "lora",
            },
        ).json()
        assert wait_for_job(api, ADMIN_KEY, load["id"])["status"] == "success"
        on_a = api.post("/api/v4/dreambooth", {**body, "lora_model": "shared"}).json()
        first.terminate()
        first.wait(timeout=60)
        second = start_worker(tmp_path / "host-b", **env)  # a fresh host: no model files
        try:
            on_b = api.post("/api/v4/dreambooth", {**body, "lora_model": "shared"}).json()
            plain = api.post("/api/v4/dreambooth", body).json()
        finally:
            second.terminate()
            second.wait(timeout=60)
        pixels = [np.asarray(decode_png(d["output"][0]), dtype=int) for d in (on_a, on_b, plain)]
        assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
        assert list((tmp_path / "host-b" / "imported" / "lora").glob("shared-*.safetensors"))
        api.post("/api/v1/enterprise/delete_model", {"key": ADMIN_KEY, "model_id": "shared"})
        assert not s3.client().list_objects_v2(Bucket="sdserve", Prefix="models/").get("Contents")
    finally:
        api.stop()
        host.close()

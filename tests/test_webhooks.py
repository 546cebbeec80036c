"""Webhooks reach a real local receiver, on success and failure, with retries recorded on the job."""

from __future__ import annotations

import sqlite3
import time

from conftest import WebhookReceiver

BODY = {
    "model_id": "tiny-sd",
    "prompt": "a boat",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "safety_checker": "no",
}


def _deliveries(server, job_id):
    with sqlite3.connect(server.data_dir / "sdserve.db") as db:
        return db.execute(
            "select attempt, status_code, ok from webhook_deliveries where job_id=? order by attempt",
            (job_id,),
        ).fetchall()


def test_webhook_on_success(server, user_key, webhook_receiver):
    data = server.post(
        "/api/v4/dreambooth",
        {"key": user_key, **BODY, "webhook": webhook_receiver.url, "track_id": "order-17"},
    ).json()
    assert data["status"] == "success"
    [payload] = webhook_receiver.wait_for(1)
    assert payload["status"] == "success" and payload["id"] == data["id"]
    assert payload["track_id"] == "order-17"
    assert payload["output"] == data["output"] and payload["meta"]["seed"] == data["meta"]["seed"]


def test_webhook_retried_after_receiver_fails(server, user_key):
    receiver = WebhookReceiver(fail_first=2)
    try:
        data = server.post(
            "/api/v4/dreambooth", {"key": user_key, **BODY, "webhook": receiver.url, "track_id": 5}
        ).json()
        [payload] = receiver.wait_for(1, timeout=60)
        assert payload["id"] == data["id"] and payload["track_id"] == "5"
        assert receiver.attempts == 3
        deadline = time.time() + 10  # the sender records the attempt after the receiver answers
        while len(rows := _deliveries(server, data["id"])) < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert [(r[0], r[1], r[2]) for r in rows] == [(1, 500, 0), (2, 500, 0), (3, 200, 1)]
    finally:
        receiver.close()


def test_webhook_on_failure(server, user_key, webhook_receiver, tmp_path):
    # A LoRA file that exists but is not a LoRA: accepted at submit, fails in the worker.
    lora_dir = server.data_dir / "loras"
    lora_dir.mkdir(exist_ok=True)
    (lora_dir / "broken.safetensors").write_bytes(b"not safetensors at all")
    data = server.post(
        "/api/v4/dreambooth",
        {
            "key": user_key,
            **BODY,
            "lora_model": "broken",
            "webhook": webhook_receiver.url,
            "track_id": "t",
        },
    ).json()
    assert data["status"] == "failed", data
    assert "broken" in data["message"] and data["messege"] == data["message"]
    [payload] = webhook_receiver.wait_for(1)
    assert payload["status"] == "failed" and payload["id"] == data["id"]
    assert payload["track_id"] == "t" and payload["message"]

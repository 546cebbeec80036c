"""Webhooks, bucket endpoints and peer URLs obey the private-address guard; one bad row never starves the rest."""

from __future__ import annotations

import sqlite3
import time

import pytest
from conftest import ADMIN_KEY, create_key

BODY = {
    "model_id": "tiny-sd",
    "prompt": "a boat",
    "width": 64,
    "height": 64,
    "num_inference_steps": 1,
    "safety_checker": "no",
}


def _loopback_spellings(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/hook",
        f"http://localhost:{port}/hook",
        f"http://user:pw@127.0.0.1:{port}/hook",
        f"http://[::1]:{port}/hook",
        f"http://[::127.0.0.1]:{port}/hook",  # IPv4-compatible IPv6
        f"http://[::ffff:127.0.0.1]:{port}/hook",  # IPv4-mapped
        f"http://[::ffff:0:7f00:1]:{port}/hook",  # IPv4-translated (SIIT)
        f"http://[64:ff9b::7f00:1]:{port}/hook",  # NAT64
        f"http://[2002:7f00:1::]:{port}/hook",  # 6to4 of 127.0.0.1
        f"http://2130706433:{port}/hook",  # decimal integer
        f"http://0x7f.1:{port}/hook",  # hex, short form
        f"http://0177.0.0.1:{port}/hook",  # octal
        f"http://127.1:{port}/hook",
        f"http://0:{port}/hook",
        f"http://169.254.169.254:{port}/hook",
        f"http://10.0.0.1:{port}/hook",
    ]


def _jobs(server) -> int:
    with sqlite3.connect(server.data_dir / "sdserve.db") as db:
        return db.execute("select count(*) from jobs").fetchone()[0]


def _error(response) -> str:
    data = response.json()
    assert data["status"] == "error", data
    return data["message"]


def test_private_webhooks_refused_at_submit(guarded_server, webhook_receiver):
    key = create_key(guarded_server.data_dir)
    port = int(webhook_receiver.url.rsplit(":", 1)[1].split("/")[0])
    before = _jobs(guarded_server)
    for url in _loopback_spellings(port):
        for path, extra in (
            ("/api/v3/text2img", {}),
            ("/api/v4/dreambooth/text2video", {"num_frames": 2, "model_id": "tiny-sd"}),
        ):
            message = _error(
                guarded_server.post(path, {"key": key, **BODY, **extra, "webhook": url})
            )
            assert "webhook" in message, (url, message)
    assert _jobs(guarded_server) == before  # nothing was queued
    assert webhook_receiver.received == []


def test_private_training_webhook_bucket_and_peer_refused(guarded_server, webhook_receiver):
    key = create_key(guarded_server.data_dir)
    message = _error(
        guarded_server.post(
            "/api/v3/lora_fine_tune",
            {
                "key": key,
                "instance_prompt": "a photo of sks dog",
                "class_prompt": "a dog",
                "images": ["x"],
                "webhook": "http://[::127.0.0.1]:9/hook",
            },
        )
    )
    assert "webhook" in message and "private or local" in message
    message = _error(
        guarded_server.post(
            "/api/v1/enterprise/update_s3",
            {"key": ADMIN_KEY, "image_directory": "b", "endpoint_url": "http://[::127.0.0.1]:9"},
        )
    )
    assert "endpoint_url" in message and "private or local" in message
    message = _error(
        guarded_server.post(
            "/api/v1/enterprise/sync_models",
            {"key": ADMIN_KEY, "sync_url": "http://2130706433:9", "sync_key": "k"},
        )
    )
    assert "sync_url" in message and "private or local" in message


def test_credentials_in_a_webhook_are_refused(server, user_key, webhook_receiver):
    url = webhook_receiver.url.replace("http://", "http://user:secret@")
    message = _error(server.post("/api/v3/text2img", {"key": user_key, **BODY, "webhook": url}))
    assert "user name or password" in message
    assert webhook_receiver.received == []


def _finished_job(server, key) -> int:
    data = server.post("/api/v3/text2img", {"key": key, **BODY}).json()
    assert data["status"] == "success", data
    return data["id"]


def _insert_outbox(server, job_id: int, rows: list[tuple[str, str]]) -> list[int]:
    """Webhook rows as a past submit would have left them (url, payload JSON text)."""
    ids = []
    with sqlite3.connect(server.data_dir / "sdserve.db", timeout=30) as db:
        for url, payload in rows:
            cursor = db.execute(
                "insert into webhook_outbox (job_id, url, payload, state, attempts, next_at) "
                "values (?, ?, ?, 'pending', 0, 0)",
                (job_id, url, payload),
            )
            ids.append(cursor.lastrowid)
    return ids


def _outbox(server, ids: list[int]) -> list[tuple]:
    with sqlite3.connect(server.data_dir / "sdserve.db") as db:
        marks = ",".join("?" * len(ids))
        return db.execute(
            f"select o.id, o.state, o.attempts, d.error from webhook_outbox o "
            f"left join webhook_deliveries d on d.outbox_id = o.id "
            f"where o.id in ({marks}) order by o.id",
            ids,
        ).fetchall()


def _wait_attempted(server, ids: list[int], timeout: float = 30) -> list[tuple]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = _outbox(server, ids)
        if all(row[2] >= 1 for row in rows):
            return rows
        time.sleep(0.1)
    return _outbox(server, ids)


def test_send_time_guard_refuses_a_host_that_turned_private(guarded_server, webhook_receiver):
    """A row accepted earlier whose host now resolves to loopback is refused, and recorded."""
    key = create_key(guarded_server.data_dir)
    job_id = _finished_job(guarded_server, key)
    [row_id] = _insert_outbox(guarded_server, job_id, [(webhook_receiver.url, '{"n": 1}')])
    [(_, state, attempts, error)] = _wait_attempted(guarded_server, [row_id])
    assert attempts == 1 and state == "pending" and "private or local address" in error
    assert webhook_receiver.received == []


def test_credentials_are_not_forwarded(server, user_key, webhook_receiver):
    job_id = _finished_job(server, user_key)
    url = webhook_receiver.url.replace("http://", "http://user:secret@")
    _insert_outbox(server, job_id, [(url, '{"n": 1}')])
    assert webhook_receiver.wait_for(1) == [{"n": 1}]
    assert "authorization" not in webhook_receiver.headers[0]


@pytest.mark.parametrize("poison", ["nan", "invalid_url"])
def test_poison_webhook_rows_fail_alone(server, user_key, webhook_receiver, poison):
    job_id = _finished_job(server, user_key)
    bad = (
        (webhook_receiver.url, '{"track_id": NaN, "eta": Infinity}')
        if poison == "nan"
        else ("http://0177.0.0.1:9999/", '{"n": 0}')
    )
    innocent = [(webhook_receiver.url, f'{{"n": {i}}}') for i in (1, 2, 3)]
    ids = _insert_outbox(server, job_id, [bad, *innocent])  # the poison row is claimed first
    received = webhook_receiver.wait_for(3 + (poison == "nan"))
    assert {"n": 1} in received and {"n": 2} in received and {"n": 3} in received
    rows = _wait_attempted(server, ids)
    assert all(attempts == 1 for _, _, attempts, _ in rows), rows
    if poison == "nan":  # sent as strict JSON: non-finite numbers become null
        assert {"track_id": None, "eta": None} in received
        assert rows[0][1] == "delivered"
    else:
        assert rows[0][1] == "pending" and "not a valid URL" in rows[0][3]

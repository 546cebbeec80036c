"""The job event stream (Server-Sent Events, read here with httpx as any client would) and the
console's JSON endpoints, owner isolation included, against the shared server."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import ADMIN_KEY, decode_png, wait_for_job

from sdserve.testing import scaled

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "instant_response": True}


def new_key(server) -> str:
    """A key made through the admin endpoint (quicker than the CLI)."""
    answer = httpx.post(
        f"{server.url}/api/v1/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json={}
    )
    return answer.json()["key"]


class EventReader:
    """An SSE client in a thread: each event as (name, id, data dict); comments counted."""

    def __init__(self, url: str, params: dict, headers: dict | None = None):
        self.events: list[tuple[str, str, dict]] = []
        self.comments = 0
        self.headers: dict[str, str] = {}
        self.status_code: int | None = None
        self._stop = threading.Event()
        self._args = (url, params, headers or {})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import json

        url, params, headers = self._args
        with httpx.stream("GET", url, params=params, headers=headers, timeout=60) as response:
            self.status_code = response.status_code
            self.headers = dict(response.headers)
            name, event_id, data = "message", "", []
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith(":"):
                    self.comments += 1
                elif line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    self.events.append((name, event_id, json.loads("\n".join(data))))
                    name, event_id, data = "message", "", []

    def of_job(self, job_id: int) -> list[tuple[str, str, dict]]:
        return [event for event in self.events if event[2]["id"] == job_id]

    def wait_for(self, job_id: int, name: str, timeout: float = 120) -> list:
        deadline = time.time() + scaled(timeout)
        while time.time() < deadline:
            if any(event[0] == name for event in self.of_job(job_id)):
                return self.of_job(job_id)
            time.sleep(0.1)
        raise AssertionError(f"no {name} event for job {job_id}: {self.of_job(job_id)}")

    def wait_open(self) -> None:
        deadline = time.time() + scaled(30)
        while self.status_code is None and time.time() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()


@pytest.fixture
def reader_factory():
    readers = []

    def open_reader(url: str, **params) -> EventReader:
        reader = EventReader(url, {"heartbeat": 1, **params})
        reader.wait_open()
        readers.append(reader)
        return reader

    yield open_reader
    for reader in readers:
        reader.close()


def _submit(server, key: str, **fields) -> int:
    body = {"key": key, "prompt": "a lighthouse", **SMALL, **fields}
    data = server.post("/api/v6/images/text2img", body).json()
    assert data["status"] in ("processing", "success"), data
    return data["id"]


def test_a_jobs_events_arrive_in_order_with_progress(server, user_key, reader_factory):
    stream = reader_factory(f"{server.url}/api/v1/jobs/events", key=user_key)
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["x-accel-buffering"] == "no"  # nginx passes each event on at once
    assert "no-cache" in stream.headers["cache-control"]
    job_id = _submit(server, user_key, num_inference_steps=5)
    events = stream.wait_for(job_id, "done")
    names = [name for name, _id, _data in events]
    # Every stage once, in order; steps may be coalesced but never go back.
    assert names[0] == "queued" and names[-1] == "done", names
    assert names.index("started") < len(names) - 1
    assert set(names) <= {"queued", "started", "step", "done"}
    steps = [data["step"] for name, _id, data in events if name == "step"]
    assert steps == sorted(steps) and all(0 < s < 5 for s in steps)
    first = events[0][2]
    assert first["total_steps"] == 5 and first["kind"] == "text2img"
    if first["status"] in ("queued", "processing"):  # a quick job may be done at first look
        assert first["queue_position"] is not None and first["eta"] is not None
    done = events[-1][2]
    assert done["status"] == "success" and done["timings"]["denoise"] > 0
    assert decode_png(done["output"][0]).size == (64, 64)
    assert all(event_id for _name, event_id, _data in events)  # each carries a reconnect cursor


def test_a_reconnect_gets_what_finished_meanwhile_and_heartbeats(server, user_key, reader_factory):
    before = time.time()
    job_id = _submit(server, user_key)
    assert wait_for_job(server, user_key, job_id)["status"] == "success"
    # As EventSource reconnects: Last-Event-ID is the cursor of the last event it had.
    reader = EventReader(
        f"{server.url}/api/v1/jobs/events",
        {"key": user_key, "heartbeat": 1},
        headers={"Last-Event-ID": f"{before:.3f}"},
    )
    try:
        events = reader.wait_for(job_id, "done", timeout=30)
        assert [name for name, _id, _data in events] == ["done"]
        deadline = time.time() + scaled(10)
        while reader.comments < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert reader.comments >= 2  # the opening comment and at least one heartbeat
    finally:
        reader.close()


def test_another_keys_jobs_are_never_shown(server, user_key, reader_factory):
    other = new_key(server)
    watching_other = reader_factory(f"{server.url}/api/v1/jobs/events", key=other)
    mine = _submit(server, user_key)
    assert wait_for_job(server, user_key, mine)["status"] == "success"
    time.sleep(1.0)  # the other key's stream has looked at the store a few times since
    assert watching_other.of_job(mine) == []
    # Following one job of another key is refused, as are its details, cancel and delete.
    refused = httpx.get(
        f"{server.url}/api/v1/jobs/events", params={"key": other, "job_id": mine}, timeout=30
    ).json()
    assert refused["status"] == "error" and refused["message"] == "Request not found"
    auth = {"Authorization": f"Bearer {other}"}
    assert httpx.get(f"{server.url}/api/v1/jobs/{mine}", headers=auth).json()["status"] == "error"
    assert (
        httpx.delete(f"{server.url}/api/v1/jobs/{mine}", headers=auth).json()["status"] == "error"
    )
    cancel = httpx.post(f"{server.url}/api/v1/jobs/{mine}/cancel", headers=auth, json={})
    assert cancel.json()["status"] == "error"
    listed = httpx.get(f"{server.url}/api/v1/jobs", headers=auth).json()["jobs"]
    assert mine not in [job["id"] for job in listed]
    # No key: no stream.
    assert httpx.get(f"{server.url}/api/v1/jobs/events").json()["message"] == "Invalid Api Key"


def test_history_filters_detail_and_delete(server, user_key, webhook_receiver):
    key = new_key(server)
    auth = {"Authorization": f"Bearer {key}"}
    job_id = _submit(server, key, webhook=webhook_receiver.url, track_id="t-1")
    assert wait_for_job(server, key, job_id)["status"] == "success"
    webhook_receiver.wait_for(1)

    def listed(**query):
        answer = httpx.get(f"{server.url}/api/v1/jobs", params=query, headers=auth).json()
        return [job["id"] for job in answer["jobs"]]

    assert listed() == [job_id]
    assert listed(kind="text2img", status="success", model_id="tiny-sd") == [job_id]
    assert listed(kind="img2img") == [] and listed(status="failed") == []
    assert listed(model_id="tiny-sdxl") == []
    bad = httpx.get(f"{server.url}/api/v1/jobs", params={"status": "nope"}, headers=auth).json()
    assert bad["status"] == "error" and "status" in bad["messege"]

    detail = httpx.get(f"{server.url}/api/v1/jobs/{job_id}", headers=auth).json()["job"]
    # What was asked, as the job runs it (the prompt enhanced by default, §3.1)
    assert detail["request"]["prompt"].startswith("a lighthouse")
    assert detail["request"]["width"] == 64
    assert detail["meta"]["prompt"].startswith("a lighthouse")
    assert {"queue_wait", "denoise", "decode"} <= set(detail["timings"])
    assert detail["track_id"] == "t-1"
    deadline = time.time() + scaled(10)
    while not detail["webhook_deliveries"] and time.time() < deadline:
        time.sleep(0.2)
        detail = httpx.get(f"{server.url}/api/v1/jobs/{job_id}", headers=auth).json()["job"]
    assert detail["webhook_deliveries"][0]["ok"] is True
    output = detail["output"][0]
    assert httpx.get(output).status_code == 200

    gone = httpx.delete(f"{server.url}/api/v1/jobs/{job_id}", headers=auth).json()
    assert gone["status"] == "success"
    assert httpx.get(output).status_code == 404
    assert listed() == []


def test_admin_drains_a_worker_sees_the_queue_cancels_and_manages_keys(server, user_key):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    user = {"Authorization": f"Bearer {user_key}"}
    assert httpx.get(f"{server.url}/api/v1/admin/queue", headers=user).json()["status"] == "error"
    assert httpx.get(f"{server.url}/api/v1/me", headers=admin).json()["is_admin"] is True

    workers = httpx.get(f"{server.url}/api/v1/admin/workers", headers=admin).json()["workers"]
    worker_id = workers[0]["worker_id"]
    drained = httpx.post(f"{server.url}/api/v1/admin/workers/{worker_id}/drain", headers=admin)
    assert drained.json()["status"] == "success"
    try:
        deadline = time.time() + scaled(30)
        while time.time() < deadline:
            states = httpx.get(f"{server.url}/api/v1/admin/workers", headers=admin).json()
            if states["workers"][0]["state"] == "draining":
                break
            time.sleep(0.2)
        assert states["workers"][0]["state"] == "draining"
        job_id = _submit(server, user_key)
        time.sleep(1.0)
        queue = httpx.get(f"{server.url}/api/v1/admin/queue", headers=admin).json()["jobs"]
        waiting = [job for job in queue if job["id"] == job_id]
        assert waiting and waiting[0]["status"] == "queued"  # a drained worker claims nothing
        assert waiting[0]["owner"].startswith("key:") and waiting[0]["queue_position"] == 0
        cancel = httpx.post(f"{server.url}/api/v1/jobs/{job_id}/cancel", headers=admin, json={})
        assert cancel.json()["status"] == "success"
    finally:
        httpx.post(f"{server.url}/api/v1/admin/workers/{worker_id}/resume", headers=admin)
    fetched = server.post(f"/api/v3/fetch/{job_id}", {"key": user_key}).json()
    assert fetched["status"] == "failed" and "Cancelled" in fetched["message"]
    chart = httpx.get(f"{server.url}/api/v1/admin/throughput", headers=admin).json()
    assert len(chart["images_per_second"]) == len(chart["queue_depth"]) == 60
    assert sum(chart["outputs"]) >= 1

    plan = {"key": ADMIN_KEY, "plan_name": "console_plan", "requests_per_month": 5}
    assert server.post("/api/v1/enterprise/plans", plan).json()["status"] == "success"
    created = httpx.post(
        f"{server.url}/api/v1/admin/keys", headers=admin, json={"label": "from test"}
    ).json()
    new_key = created["key"]
    assert httpx.get(f"{server.url}/api/v1/me", params={"key": new_key}).json()["is_admin"] is False
    keys = httpx.get(f"{server.url}/api/v1/admin/keys", headers=admin).json()["keys"]
    row = next(k for k in keys if k["prefix"] == new_key[:8])
    assert row["label"] == "from test" and row["used_this_month"] == 0
    on_plan = httpx.post(
        f"{server.url}/api/v1/admin/keys/{row['id']}/plan",
        headers=admin,
        json={"plan": "console_plan"},
    ).json()
    assert on_plan["status"] == "success"
    assert (
        httpx.get(f"{server.url}/api/v1/me", params={"key": new_key}).json()["plan"]
        == "console_plan"
    )
    revoked = httpx.post(f"{server.url}/api/v1/admin/keys/{row['id']}/revoke", headers=admin)
    assert revoked.json()["status"] == "success"
    lost = httpx.get(f"{server.url}/api/v1/me", params={"key": new_key}).json()
    assert lost["message"] == "Invalid Api Key"

"""The family seam: a family registered from outside the server's code (tests/plugins/echo_family.py:
schema, engine, registration) is served end to end: submit, worker, fetch and webhook."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
from conftest import ADMIN_KEY, ServerProcess

PLUGINS = Path(__file__).parent / "plugins"


def test_a_family_registered_in_a_few_lines_makes_the_whole_round_trip(tmp_path, webhook_receiver):
    path = os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))
    server = ServerProcess(
        tmp_path / "seam", SDSERVE_EXTRA_FAMILIES="echo_family:FAMILY", PYTHONPATH=path
    ).start()
    try:
        body = {"key": ADMIN_KEY, "text": "hello ", "times": 3, "webhook": webhook_receiver.url}
        answer = server.post("/api/test/echo", {**body, "track_id": "t-1"}).json()
        assert answer["status"] == "success", answer
        assert answer["meta"] == {"text": "hello ", "times": 3}
        assert httpx.get(answer["output"][0]).text == "hello hello hello "
        [hook] = webhook_receiver.wait_for(1)
        assert hook["id"] == answer["id"] and hook["track_id"] == "t-1"
        assert hook["output"] == answer["output"]

        queued = server.post("/api/test/echo", {**body, "instant_response": True}).json()
        assert queued["status"] == "processing"
        assert queued["fetch_result"] == f"{server.url}/api/test/echo/fetch/{queued['id']}"
        for _ in range(600):  # the family's own fetch path, as its dialect registered it
            done = server.post(queued["fetch_result"].removeprefix(server.url), {"key": ADMIN_KEY})
            if done.json()["status"] == "success":
                break
            time.sleep(0.1)
        assert httpx.get(done.json()["output"][0]).text == "hello hello hello "
        # one id space: any fetch path finds it
        again = server.post(f"/api/v3/fetch/{queued['id']}", {"key": ADMIN_KEY}).json()
        assert again["output"] == done.json()["output"]

        refused = server.post("/api/test/echo", {"key": ADMIN_KEY}).json()
        assert refused["status"] == "error" and refused["messege"] == {
            "text": ["The text field is required."]
        }
    finally:
        server.stop()

"""Limits a careless or hostile request meets (issue 13): prompt caps, a job's time limit, and a
job row that stores the prompt once."""

from __future__ import annotations

import json
import sqlite3

from conftest import ADMIN_KEY, ServerProcess

BODY = {"model_id": "tiny-sd", "width": 64, "height": 64, "num_inference_steps": 2}


def test_prompts_are_capped_in_characters_and_in_tokens(server, user_key):
    for path in ("/api/v4/dreambooth", "/api/v6/video/text2video"):
        long = server.post(path, {"key": user_key, **BODY, "prompt": "a" * 10_001}).json()
        assert long["status"] == "error"
        assert long["messege"] == {"prompt": ["The prompt may not be longer than 10000 characters."]}
        tokens = server.post(path, {"key": user_key, **BODY, "prompt": "cat, " * 600}).json()
        assert tokens["messege"] == {"prompt": ["The prompt may not be longer than 1000 tokens."]}
        negative = server.post(
            path, {"key": user_key, **BODY, "prompt": "a cat", "negative_prompt": "dog " * 3000}
        ).json()
        assert "negative_prompt" in negative["messege"]


def test_the_job_row_holds_the_prompt_once(server, user_key):
    prompt = "a very long and detailed description of a lighthouse at dusk " * 10
    answer = server.post(
        "/api/v4/dreambooth", {"key": user_key, **BODY, "prompt": prompt, "enhance_prompt": "no"}
    ).json()
    assert answer["status"] == "success" and answer["meta"]["prompt"] == prompt.strip()
    with sqlite3.connect(server.data_dir / "sdserve.db") as db:
        params, result = db.execute(
            "select params, result from jobs where id=?", (answer["id"],)
        ).fetchone()
    assert (params + result).count("lighthouse at dusk") == 10  # the one copy in params


def test_a_job_past_its_time_limit_fails_clearly(tmp_path):
    server = ServerProcess(tmp_path / "slow", SDSERVE_JOB_TIMEOUT_SECONDS="1").start()
    try:
        slow = {**BODY, "width": 1024, "height": 1024, "num_inference_steps": 50, "prompt": "x"}
        answer = server.post("/api/v4/dreambooth", {"key": ADMIN_KEY, **slow}).json()
        assert answer["status"] == "failed", answer
        assert "time limit of 1 seconds" in answer["message"]
        # the worker is free again: the next job is served
        quick = server.post("/api/v4/dreambooth", {"key": ADMIN_KEY, **BODY, "prompt": "y"}).json()
        assert quick["status"] == "success", quick
        assert json.dumps(quick)  # answered in full
    finally:
        server.stop()

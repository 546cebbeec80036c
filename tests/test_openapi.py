"""The OpenAPI document declares every operation's request and answers, and what the server really
answers matches what it declares: success and error envelopes, job answers at every stage, the
admin and utility answers (fuzzed answers are checked the same way in test_fuzz)."""

from __future__ import annotations

import base64

import httpx
import pytest
from conftest import ADMIN_KEY, png_bytes, wait_for_job

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.core.failures import Failure  # noqa: E402  (after importorskip)

SMALL = {"width": "64", "height": "64", "num_inference_steps": "1", "model_id": "tiny-sd"}


@pytest.fixture(scope="module")
def document(server) -> dict:
    return httpx.get(f"{server.url}/openapi.json", timeout=60).json()


def test_every_operation_declares_its_request_and_answers(document):
    missing = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            name = f"{method.upper()} {path}"
            responses = operation["responses"]
            ok = responses.get("200", {}).get("content", {})
            if not any(content.get("schema") for content in ok.values()):
                missing.append(f"{name}: no answer schema")
            if method == "post" and "requestBody" not in operation:
                missing.append(f"{name}: no request body")
            if path.startswith("/api/") and "4XX" not in responses:
                missing.append(f"{name}: no error answer")
            if "422" in responses:  # FastAPI's own validation answer, which this server never sends
                missing.append(f"{name}: declares FastAPI's 422")
    assert not missing, "\n".join(missing)


def _png_data_url() -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes((32, 32))).decode()


def test_real_answers_match_the_declared_schemas(server, user_key):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    checked: list[str] = []

    def call(method: str, path: str, body: dict | None = None, operation_path: str = "") -> dict:
        response = httpx.request(method, server.url + path, json=body, timeout=180)
        operation = schema[operation_path or path][method]
        operation.validate_response(response)  # raises with what does not match
        checked.append(f"{method} {path}")
        return response.json() if "json" in response.headers["content-type"] else {}

    # A job at each stage, through a family route and fetch
    queued = call(
        "POST",
        "/api/v6/images/text2img",
        {"key": user_key, "prompt": "a fox", "instant_response": "yes", **SMALL},
    )
    assert queued["status"] == "processing", queued
    wait_for_job(server, user_key, queued["id"])
    done = call(
        "POST", f"/api/v3/fetch/{queued['id']}", {"key": user_key}, "/api/v3/fetch/{job_id}"
    )
    assert done["status"] == "success", done
    call(
        "GET",
        f"/api/v6/images/fetch/{queued['id']}?key={user_key}",
        None,
        "/api/v6/images/fetch/{job_id}",
    )
    call("POST", "/api/v1/enterprise/fetch", {"key": ADMIN_KEY, "request_id": queued["id"]})
    call("POST", "/api/v7/images/text-to-image", {"key": user_key, "prompt": "a fox", **SMALL})

    # Errors: a bad key, a validation error (`messege` is a field map), an unknown job
    assert call("POST", "/api/v3/system_load", {"key": "nope"})["status"] == "error"
    invalid = call("POST", "/api/v6/images/text2img", {"key": user_key, "width": "wide"})
    assert isinstance(invalid["messege"], dict), invalid
    call("POST", "/api/v3/fetch/999999999", {"key": user_key}, "/api/v3/fetch/{job_id}")

    # Models, the server and its queue
    call("POST", "/api/v3/system_load", {"key": user_key})
    call("POST", "/api/v4/dreambooth/model_list", {"key": user_key})
    call("POST", "/api/v6/images/model_reload", {"key": user_key, "model_id": "tiny-sd"})
    for name in ("get_all_models", "system_details", "schedulers_list", "plans"):
        call("POST", f"/api/v1/enterprise/{name}", {"key": ADMIN_KEY})
    for model_id in ("tiny-sd", "no-such-model"):
        call("POST", "/api/v1/enterprise/verify_model", {"key": ADMIN_KEY, "model_id": model_id})
    call("POST", "/api/v1/enterprise/model_file", {"key": ADMIN_KEY, "model_id": "nope"})
    call("POST", "/api/v5/clear_cache", {"key": user_key})

    # Training, utilities and plans
    call("POST", "/api/v3/finetune_list", {"key": user_key})
    call(
        "POST",
        "/api/v3/fine_tune_status/abcdefghij",
        {"key": user_key},
        "/api/v3/fine_tune_status/{training_id}",
    )
    url = call("POST", "/api/v6/base64_to_url", {"key": user_key, "base64_string": _png_data_url()})
    call("POST", "/api/v3/base64_crop", {"key": user_key, "image": _png_data_url(), "crop": "yes"})
    call(
        "POST",
        "/api/v1/enterprise/upload_image",
        {"key": ADMIN_KEY, "base64_image": _png_data_url()},
    )
    call("POST", "/api/v3/nsfw_image_check", {"key": user_key, "init_image": _png_data_url()})
    call("POST", "/api/check_nsfw_cp", {"key": user_key, "prompt": "a fox"})
    call("POST", "/api/v3/delete_image", {"key": user_key, "request_id": url["id"]})
    call("GET", f"/api/subscribed_products?key={user_key}", None, "/api/subscribed_products")
    call("GET", "/healthz")
    call("GET", "/readyz")

    # The check itself bites: another operation's answer is not this one's.
    verdict = httpx.post(f"{server.url}/api/check_nsfw_cp", json={"key": user_key, "prompt": "a"})
    with pytest.raises(Failure, match="Response violates schema"):
        schema["/api/v3/system_load"]["POST"].validate_response(verdict)
    assert len(checked) >= 30, checked


def test_chat_and_console_answers_match_the_declared_schemas(server, user_key):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    checked: list[str] = []

    def call(method: str, path: str, body: dict | None = None, operation_path: str = "", key=""):
        headers = {"Authorization": f"Bearer {key}"} if key else None
        response = httpx.request(method, server.url + path, json=body, headers=headers, timeout=180)
        schema[operation_path or path.split("?")[0]][method].validate_response(response)
        checked.append(f"{method} {path} {response.status_code}")
        return response.json() if "json" in response.headers["content-type"] else response.text

    # Chat: ModelsLab's answers, OpenAI's objects, their stream and their errors
    ask = [{"role": "user", "content": "Hi"}]
    tiny = {"key": user_key, "max_tokens": 3, "seed": 1}
    said = call("POST", "/api/v6/llm/uncensored_chat", {**tiny, "messages": ask})
    assert said["status"] == "success", said
    queued = call(
        "POST",
        "/api/v1/chat_llm/chat",
        {"key": user_key, "prompt": "Hi", "max_new_tokens": 2, "instant_response": True},
    )
    assert queued["status"] in ("processing", "success"), queued
    for name in ("get_queued_response", "get_chat"):
        call("POST", f"/api/v1/chat_llm/{name}", {"key": user_key, "chat_id": queued["chat_id"]})
    openai = "/api/uncensored-chat/v1"
    call("POST", f"{openai}/chat/completions", {**tiny, "messages": ask})
    call("POST", f"{openai}/completions", {**tiny, "prompt": "Once"})
    assert "[DONE]" in call("POST", f"{openai}/completions", {**tiny, "prompt": "A", "stream": 1})
    call("GET", f"{openai}/models", key=user_key)
    assert call("POST", f"{openai}/chat/completions", {**tiny, "messages": []})["error"]
    assert call("GET", f"{openai}/models", key="nope")["error"]["code"] == "invalid_api_key"
    call("POST", "/api/v7/llm/chat/completions", {**tiny, "messages": ask})
    call("POST", "/api/v7/llm/chat/completions", {**tiny, "messages": ask, "model": "nope"})

    # The console: the caller, pickers, jobs and trainings; the admin's views; errors
    call("GET", f"/api/v1/me?key={user_key}")
    call("GET", f"/api/v1/console/options?key={user_key}")
    listed = call("GET", f"/api/v1/jobs?key={user_key}&limit=5")
    assert listed["jobs"], listed
    call("GET", f"/api/v1/jobs/{said['id']}?key={user_key}", None, "/api/v1/jobs/{job_id}")
    call("GET", f"/api/v1/jobs?key={user_key}&status=nope", None, "/api/v1/jobs")
    call("GET", f"/api/v1/trainings?key={user_key}")
    for name in ("queue", "workers", "throughput", "keys"):
        call("GET", f"/api/v1/admin/{name}?key={ADMIN_KEY}")
    made = call("POST", "/api/v1/admin/keys", {"key": ADMIN_KEY, "label": "openapi"})
    key_id = next(
        k["id"]
        for k in call("GET", f"/api/v1/admin/keys?key={ADMIN_KEY}")["keys"]
        if k["prefix"] == made["prefix"]
    )
    call(
        "POST",
        f"/api/v1/admin/keys/{key_id}/plan",
        {"key": ADMIN_KEY},
        "/api/v1/admin/keys/{key_id}/plan",
    )
    call(
        "POST",
        f"/api/v1/admin/keys/{key_id}/revoke",
        {"key": ADMIN_KEY},
        "/api/v1/admin/keys/{key_id}/revoke",
    )
    call(
        "POST",
        "/api/v1/admin/workers/nope/drain",
        {"key": ADMIN_KEY},
        "/api/v1/admin/workers/{worker_id}/drain",
    )
    call("GET", f"/api/v1/admin/queue?key={user_key}")  # not the admin key: an error
    call(
        "POST",
        f"/api/v1/jobs/{said['id']}/cancel",
        {"key": user_key},
        "/api/v1/jobs/{job_id}/cancel",
    )  # finished already: an error
    call("DELETE", f"/api/v1/jobs/{said['id']}?key={user_key}", None, "/api/v1/jobs/{job_id}")
    assert len(checked) >= 25, checked

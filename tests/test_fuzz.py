"""A bounded schemathesis run over every operation of a live server: no 5xx, no "Internal server
error" body, and every answer of the shape the OpenAPI document declares, whatever a client sends.
SDSERVE_FUZZ_EXAMPLES sets the cases per operation (a third of them for chat operations, which run a
model)."""

from __future__ import annotations

import os

import httpx
import pytest
from conftest import ServerProcess, create_key

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (after importorskip)
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

EXAMPLES = int(os.environ.get("SDSERVE_FUZZ_EXAMPLES", "6"))
# Chat operations run a model for most valid bodies: fewer cases, so the run stays as short.
CHAT_EXAMPLES = max(1, EXAMPLES // 3)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    # No model runs (noop engine): the queue, storage and every handler are the real thing.
    srv = ServerProcess(
        tmp_path_factory.mktemp("fuzz"),
        SDSERVE_ENGINE="noop",
        SDSERVE_SYNC_WAIT_SECONDS="2",
        SDSERVE_ALLOW_PRIVATE_URLS="0",  # no fuzzed URL reaches this machine's services
        SDSERVE_IMAGE_FETCH_TIMEOUT="2",
        SDSERVE_DOWNLOAD_TIMEOUT="2",
        # Chat jobs run on the real tiny chat model (its own lane). Fuzzed bodies may ask for up
        # to 30,000 tokens: the server reduces that to 8, and an answer never waits long.
        SDSERVE_CHAT_MAX_TOKENS="8",
        SDSERVE_CHAT_WAIT_SECONDS="30",
    ).start()
    yield srv, create_key(srv.data_dir)
    srv.stop()


def test_no_operation_answers_an_internal_error(fuzz_server):
    srv, key = fuzz_server
    # Operation by operation with hypothesis directly: schemathesis' pytest plugin does not
    # run under pytest 9.
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=CHAT_EXAMPLES if "chat" in (operation.tags or ()) else EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases every CI run; SDSERVE_FUZZ_EXAMPLES explores more
            phases=[Phase.explicit, Phase.generate],  # no shrinking: the run stays bounded
            suppress_health_check=list(HealthCheck),
        )
        def call(case):
            if isinstance(case.body, dict):
                case.body.setdefault("key", key)  # mostly a real key: handlers get past auth
            response = case.call(
                base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=60
            )
            problem = None
            if response.status_code >= 500 or "Internal server error" in response.text:
                problem = response.text[:300]
            else:
                try:
                    case.validate_response(response, checks=[response_schema_conformance])
                except (Failure, FailureGroup) as exc:  # what differs from the declared answer
                    problem = f"not the declared answer: {str(exc)[:600]}"
            if problem:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{problem}\n  {case.as_curl_command()}"
                )

        call()
    assert operations > 100, operations
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])


def test_the_fuzzed_server_counted_no_internal_error(fuzz_server):
    srv, _key = fuzz_server
    metrics = httpx.get(f"{srv.url}/metrics", timeout=60).text
    assert "sdserve_internal_errors_total 0.0" in metrics

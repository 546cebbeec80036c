"""Shared fixtures: real `sdserve` server processes on free ports, tiny models, a webhook receiver."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from sdserve.testing import (
    PostgresServer,
    StartFailed,
    free_port,
    kill_started,
    postgres_bin,
    scaled,
    start_process,
    started_count,
    stop_process,
    wait_until_serving,
)

ADMIN_KEY = "test-admin-key"


def base_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SDSERVE_DATA_DIR=str(data_dir),
        SDSERVE_ADMIN_KEY=ADMIN_KEY,
        SDSERVE_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        # long enough that a slow CI machine still answers `success` synchronously
        SDSERVE_SYNC_WAIT_SECONDS="120",
        # tests serve inputs and models from loopback; the guard is tested with it off
        SDSERVE_ALLOW_PRIVATE_URLS="1",
        # a test server would first load and time the default model; the warm-up has its tests
        SDSERVE_WARMUP_BUCKETS="",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(overrides)
    return env


class ServerProcess:
    """`sdserve serve` in a subprocess (its own process group), as a user runs it."""

    def __init__(self, data_dir: Path, argv: list[str] | None = None, **env: str):
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = base_env(data_dir, **env)
        self.argv = argv or [
            sys.executable,
            "-m",
            "sdserve.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / f"server-{self.port}.log"

    def start(self, seconds: float = 60) -> ServerProcess:
        """Wait up to `seconds` (scaled to the machine) for it to answer; if it does not, it is
        killed with everything it started, and the error holds its log."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = start_process(self.argv, self.env, self.log)

        def ready() -> bool:
            return httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200

        wait_until_serving(self.proc, ready, f"server on port {self.port}", self.log, seconds)
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc:
            stop_process(self.proc, sig, grace=scaled(30))

    def post(self, path: str, body: dict | None = None, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=180, **kwargs)


def run_cli(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "sdserve.cli", *args, "--data-dir", str(data_dir)],
        env=base_env(data_dir, **(env or {})),
        capture_output=True,
        text=True,
        timeout=scaled(120),
        check=True,
    )
    return out.stdout


def start_worker(data_dir: Path, **env: str) -> subprocess.Popen:
    """`sdserve worker` in a subprocess, on the same data dir as a server; killed at the end of
    the test that started it, whatever happens in it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return start_process(
        [sys.executable, "-m", "sdserve.cli", "worker", "--data-dir", str(data_dir)],
        base_env(data_dir, **env),
        data_dir / f"worker-{time.monotonic_ns()}.log",
    )


def create_key(data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    """A new API key; `env` names the database when it is not the data dir's SQLite file."""
    out = run_cli("keys", "create", *extra, data_dir=data_dir, env=env)
    return out.strip().splitlines()[-1]


def png_bytes(size=(64, 64), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(url: str) -> Image.Image:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, url
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    return image


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    """The shared server. One slow start is retried once (a loaded machine), so that it does not
    turn into an error in every test that uses it; a second failure shows both logs."""
    data_dir = tmp_path_factory.mktemp("server")
    try:
        srv = ServerProcess(data_dir).start()
    except StartFailed as first:
        try:
            srv = ServerProcess(data_dir).start(seconds=120)
        except StartFailed as second:
            pytest.fail(f"the shared test server did not start twice:\n{first}\n---\n{second}")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """Kill what a test started (servers, workers) and did not stop, even when it failed."""
    before = started_count()
    yield
    kill_started(since=before)


def pytest_sessionfinish(session, exitstatus):
    kill_started(kept_too=True)  # session- and module-wide servers too, however the run ends


@pytest.fixture(scope="session")
def user_key(server) -> str:
    return create_key(server.data_dir)


@pytest.fixture(scope="session")
def guarded_server(tmp_path_factory) -> ServerProcess:
    """A server with the private-address guard on, as deployed by default."""
    data_dir = tmp_path_factory.mktemp("guarded")
    srv = ServerProcess(data_dir, SDSERVE_ALLOW_PRIVATE_URLS="0").start()
    yield srv
    srv.stop()


class WebhookReceiver:
    """A real HTTP server on loopback that records POSTs and can fail the first N of them."""

    def __init__(self, fail_first: int = 0):
        self.received: list[dict] = []
        self.headers: list[dict[str, str]] = []  # of each received POST, lower-case names
        self.attempts = 0
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                payload = json.loads(self.rfile.read(length) or b"{}")
                receiver.attempts += 1
                if receiver.attempts <= receiver.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                receiver.received.append(payload)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 30) -> list[dict]:
        deadline = time.time() + timeout
        while len(self.received) < count and time.time() < deadline:
            time.sleep(0.05)
        return self.received

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def webhook_receiver():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    from sdserve.engine.tiny import ensure_tiny_model

    folder = tmp_path_factory.mktemp("tiny-models")
    for model_id in ("tiny-sd", "tiny-sdxl"):
        ensure_tiny_model(model_id, folder)
    return folder


def copy_tiny(tiny_models_dir: Path, model_id: str, dest: Path) -> Path:
    target = dest / model_id
    if not target.exists():
        shutil.copytree(tiny_models_dir / model_id, target)
    return target


def write_lora(pipe, path: Path, seed: int) -> None:
    """A random-weight LoRA for a tiny pipeline, in diffusers' .safetensors layout."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        adapter_name=f"make{seed}",
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if f"make{seed}" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    state = get_peft_model_state_dict(unet, adapter_name=f"make{seed}")
    unet.delete_adapters(f"make{seed}")
    folder = path.parent / f".{path.stem}"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state)
    shutil.move(folder / "pytorch_lora_weights.safetensors", path)


class FileServer:
    """A real HTTP server on loopback serving bytes by name, with HTTP Range, like a model host.

    `/files/<name>` serves the file; `/flaky/<name>` cuts the first full download off halfway
    (resumes work); `/truncated/<name>` always stops halfway; `/page` is an HTML page.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self._cut: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                path, range_header = self.path, self.headers.get("range")
                server.requests.append((path, range_header))
                mode, _, name = path.lstrip("/").partition("/")
                if mode == "page":
                    return self._send(200, b"<html>log in first</html>", "text/html")
                data = server.files.get(name)
                if data is None or mode not in ("files", "flaky", "truncated"):
                    return self._send(404, b"not found", "text/plain")
                start = 0
                if range_header and range_header.startswith("bytes="):
                    start = int(range_header[6:].split("-")[0])
                cut = mode == "truncated" or (mode == "flaky" and name not in server._cut)
                if mode == "flaky":
                    server._cut.add(name)
                self.send_response(206 if start else 200)
                self.send_header("content-type", "application/octet-stream")
                self.send_header("content-length", str(len(data) - start))
                if start:
                    self.send_header("content-range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                body = data[start:]
                if cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _send(self, status, body, kind):
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def wait_for_job(server, key: str, job_id: int, timeout: float = 120) -> dict:
    """Fetch until the job is finished (or `timeout`, scaled to the machine); the last answer."""
    deadline = time.time() + scaled(timeout)
    while True:
        data = server.post(f"/api/v3/fetch/{job_id}", {"key": key}).json()
        if data["status"] in ("success", "failed", "error") or time.time() > deadline:
            return data
        time.sleep(0.2)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server; `.ci/run` installs Debian's postgresql, so CI never skips these."""
    if postgres_bin() is None:
        if os.environ.get("SDSERVE_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required (SDSERVE_REQUIRE_POSTGRES=1) but not installed")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer().start()
    yield server
    server.remove()

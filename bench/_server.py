"""Starts a throwaway `sdserve serve` process for a benchmark, with an admin key and a temp data dir."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import httpx

from sdserve.testing import start_process, stop_process, timeout_scale, wait_until_serving

ADMIN_KEY = "bench-admin-key"
_PIDS: dict[str, int] = {}


def server_pid(url: str) -> int:
    return _PIDS[url]


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process (Linux VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def running_server(data_dir: str | None = None, **env: str):
    """Yields the server's base URL; `server_pid()` inside gives its pid."""
    with tempfile.TemporaryDirectory(prefix="sdserve-bench-") as tmp:
        tmp = data_dir or tmp
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        environ = dict(
            os.environ,
            SDSERVE_DATA_DIR=tmp,
            SDSERVE_ADMIN_KEY=ADMIN_KEY,
            SDSERVE_OFFLINE="1",
            HF_HUB_OFFLINE="1",
            **env,
        )
        log = Path(tmp) / "server.log"
        timeout_scale()  # measured once, before the server starts: not while it warms up
        proc = start_process(
            [
                sys.executable,
                "-m",
                "sdserve.cli",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            environ,
            log,
        )
        url = f"http://127.0.0.1:{port}"
        _PIDS[url] = proc.pid
        try:
            # On failure this kills the server's process group and raises with its log.
            wait_until_serving(
                proc,
                lambda: httpx.get(url + "/healthz", timeout=5).status_code == 200,
                "benchmark server",
                log,
            )
            yield url
        finally:
            stop_process(proc, grace=60)

"""Starts a throwaway `sdserve serve` process for a benchmark, with an admin key and a temp data dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ADMIN_KEY = "bench-admin-key"


@contextmanager
def running_server(**env: str):
    with tempfile.TemporaryDirectory(prefix="sdserve-bench-") as tmp:
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
        proc = subprocess.Popen(
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
            env=environ,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/openapi.json", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=60)

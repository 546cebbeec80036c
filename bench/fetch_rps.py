"""Fetch requests per second against a real server (one finished job, many concurrent pollers).

Run: .venv/bin/python bench/fetch_rps.py [--seconds 10 --concurrency 32]
Uses `wrk` (Debian package) as the load generator when installed, else a Python asyncio client;
either way it runs on the same 2-core machine as the server and competes with it for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time

import httpx
from _server import ADMIN_KEY, running_server

BODY = {
    "key": ADMIN_KEY,
    "model_id": "tiny-sd",
    "prompt": "x",
    "width": 64,
    "height": 64,
    "num_inference_steps": 1,
    "safety_checker": "no",
}


def with_wrk(url: str, seconds: float, concurrency: int) -> float:
    script = (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(json.dumps({'key': ADMIN_KEY}))}\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{int(seconds)}s", "-s", lua.name, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"errors during the run:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def with_python(url: str, seconds: float, concurrency: int) -> float:
    async def run() -> int:
        done = 0
        deadline = time.perf_counter() + seconds
        async with httpx.AsyncClient(timeout=30) as client:

            async def loop():
                nonlocal done
                while time.perf_counter() < deadline:
                    response = await client.post(url, json={"key": ADMIN_KEY})
                    assert response.json()["status"] == "success"
                    done += 1

            await asyncio.gather(*(loop() for _ in range(concurrency)))
        return done

    started = time.perf_counter()
    return asyncio.run(run()) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--client", choices=("wrk", "python"), default="wrk" if shutil.which("wrk") else "python"
    )
    args = parser.parse_args()
    measure = with_wrk if args.client == "wrk" else with_python
    with running_server() as url:
        job = httpx.post(url + "/api/v4/dreambooth", json=BODY, timeout=120).json()
        assert job["status"] == "success", job
        fetch = f"{url}/api/v3/dreambooth/fetch/{job['id']}"
        measure(fetch, 2, args.concurrency)  # warm-up
        rate = measure(fetch, args.seconds, args.concurrency)
    print(
        f"fetch: {rate:.0f} requests/s ({args.client} client, {args.concurrency} connections, "
        f"{args.seconds:.0f} s; target >= 1000/s)"
    )


if __name__ == "__main__":
    main()

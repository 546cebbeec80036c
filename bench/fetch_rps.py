"""Fetch requests per second against a running server (one finished job, many concurrent pollers).

Run: .venv/bin/python bench/fetch_rps.py [--seconds 10 --concurrency 32]
The load generator runs on the same 2-core machine as the server, so it competes for CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from _server import ADMIN_KEY, running_server

BODY = {"key": ADMIN_KEY, "model_id": "tiny-sd", "prompt": "x", "width": 64, "height": 64,
        "num_inference_steps": 1, "safety_checker": "no"}


async def hammer(url: str, seconds: float, concurrency: int) -> tuple[int, int]:
    done = errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def loop():
            nonlocal done, errors
            while time.perf_counter() < deadline:
                response = await client.post(url, json={"key": ADMIN_KEY})
                if response.status_code == 200 and response.json()["status"] == "success":
                    done += 1
                else:
                    errors += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done, errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with running_server() as url:
        job = httpx.post(url + "/api/v4/dreambooth", json=BODY, timeout=120).json()
        fetch = f"{url}/api/v3/dreambooth/fetch/{job['id']}"
        asyncio.run(hammer(fetch, 1, args.concurrency))  # warm-up
        started = time.perf_counter()
        done, errors = asyncio.run(hammer(fetch, args.seconds, args.concurrency))
        elapsed = time.perf_counter() - started
    print(f"fetch: {done / elapsed:.0f} requests/s over {elapsed:.1f} s, {args.concurrency} concurrent, "
          f"{errors} errors (target: >= 1000/s)")


if __name__ == "__main__":
    main()

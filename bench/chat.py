"""Chat tokens per second and time to first token, through the server's OpenAI route: the
embedded tiny model (a chat job on the chat lane), and the proxy backend (a second sdserve whose
upstream is the first), for 1 and 16 concurrent streams.

Run: .venv/bin/python bench/chat.py [--tokens 64 --concurrency 1,16]
On this CPU machine it measures the server's own cost around a 29 k-parameter model; with a real
model it measures the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
from _server import ADMIN_KEY, running_server

MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


async def one_stream(client: httpx.AsyncClient, url: str, tokens: int, seed: int):
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": tokens, "seed": seed}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    started = time.perf_counter()
    first, made = None, 0
    async with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                made = event["usage"]["completion_tokens"]
            choices = event.get("choices") or []
            if first is None and choices and choices[0].get("delta", {}).get("content"):
                first = time.perf_counter() - started
    return first or 0.0, made, time.perf_counter() - started


async def measure(url: str, tokens: int, concurrency: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        await one_stream(client, url, tokens, 0)  # the model loads once, outside the figures
        started = time.perf_counter()
        runs = await asyncio.gather(
            *(one_stream(client, url, tokens, seed) for seed in range(1, concurrency + 1))
        )
        wall = time.perf_counter() - started
    made = sum(r[1] for r in runs)
    return {
        "streams": concurrency,
        "ttft_median_s": round(statistics.median(r[0] for r in runs), 3),
        "tokens": made,
        "tokens_per_s_total": round(made / wall, 1),
        "tokens_per_s_per_stream": round(statistics.median(r[1] / r[2] for r in runs), 1),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,16")
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]
    with running_server() as embedded:
        upstream = {
            "SDSERVE_CHAT_UPSTREAM_URL": embedded + "/uncensored-chat/v1",
            "SDSERVE_CHAT_UPSTREAM_KEY": ADMIN_KEY,
        }
        with running_server(**upstream) as proxy:
            for name, base in (("embedded", embedded), ("proxy", proxy)):
                for level in levels:
                    url = base + "/uncensored-chat/v1/chat/completions"
                    result = asyncio.run(measure(url, args.tokens, level))
                    print(json.dumps({"backend": name, **result}), flush=True)


if __name__ == "__main__":
    main()

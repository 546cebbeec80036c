"""Server overhead per tiny-model job: request-to-success latency minus the model work a plain
diffusers call also does (prompt encoding, denoising, decoding: fetch's `timings`).

Run: .venv/bin/python bench/overhead.py [--jobs 50]
Also times the same pipeline call in plain diffusers in this process, as the reference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _server import ADMIN_KEY, running_server

BODY = {
    "key": ADMIN_KEY,
    "model_id": "tiny-sd",
    "prompt": "a lighthouse at dusk",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "safety_checker": "no",
    "enhance_prompt": "no",
}


def plain_diffusers(jobs: int) -> list[float]:
    from diffusers import StableDiffusionPipeline

    from sdserve.engine.tiny import ensure_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model("tiny-sd", Path(tmp)))
        pipe.set_progress_bar_config(disable=True)
        times = []
        for i in range(jobs + 3):
            started = time.perf_counter()
            pipe(
                BODY["prompt"],
                width=64,
                height=64,
                num_inference_steps=2,
                generator=torch.Generator().manual_seed(i),
            )
            times.append(time.perf_counter() - started)
        return times[3:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50)
    args = parser.parse_args()

    with running_server() as url, httpx.Client(timeout=60) as client:
        for i in range(3):  # warm-up: model load, first-call allocations
            client.post(url + "/api/v4/dreambooth", json={**BODY, "seed": i + 1}).raise_for_status()
        latencies, pipeline, overheads = [], [], []
        for i in range(args.jobs):
            started = time.perf_counter()
            data = client.post(url + "/api/v4/dreambooth", json={**BODY, "seed": 1000 + i}).json()
            latency = time.perf_counter() - started
            assert data["status"] == "success", data
            latencies.append(latency)
            # what a plain diffusers call does too: encode the prompts, denoise, decode
            seconds = sum(data["timings"].get(k, 0.0) for k in ("encode", "denoise", "decode"))
            pipeline.append(seconds)
            overheads.append(latency - seconds)

    plain = plain_diffusers(args.jobs)
    ms = lambda xs, q=0.5: 1000 * statistics.quantiles(xs, n=100)[int(q * 100) - 1]  # noqa: E731
    print(f"jobs: {args.jobs} (tiny-sd, 64x64, 2 steps, sequential)")
    print(
        f"request to success      p50 {ms(latencies):7.1f} ms   p95 {ms(latencies, 0.95):7.1f} ms"
    )
    print(f"pipeline call (server)  p50 {ms(pipeline):7.1f} ms   p95 {ms(pipeline, 0.95):7.1f} ms")
    print(f"plain diffusers call    p50 {ms(plain):7.1f} ms   p95 {ms(plain, 0.95):7.1f} ms")
    print(
        f"server overhead         p50 {ms(overheads):7.1f} ms   p95 {ms(overheads, 0.95):7.1f} ms  "
        f"(target: p50 < 15 ms)"
    )


if __name__ == "__main__":
    main()

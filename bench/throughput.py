"""Images (or clips) per second through the server with N concurrent clients (cross-request
batching), against plain diffusers one at a time and batched, in the same run; p50/p95 latency,
per-stage times from the responses' `timings`, GPU memory peak and MFU from counted FLOPs.

Run on CPU (tiny shapes):   .venv/bin/python bench/throughput.py [--video]
Run on a GPU (full shapes): .venv/bin/python bench/throughput.py --full [--video]
Full shapes = SD1.5 UNet / VAE / CLIP-L with random weights (the compute is the real model's),
512x512, 30 steps, fp16; with --video, text2video clips of 16 frames at 25 steps through the v1.5
motion adapter, against plain AnimateDiffPipeline. MFU = counted FLOPs per output x outputs/s /
the device's peak (`--peak-tflops`, 989 for an H100's or H200's dense fp16/bf16).
bench/gpu.sh runs this step by step (`--plain-batches 1,16 --clients ''`, then
`--plain-batches '' --clients 1,8,32`), each with `--json` and a time budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _gpu import (
    GpuMemoryPeak,
    bench_models,
    device_facts,
    latency_summary,
    stage_summary,
    write_json,
)
from _server import ADMIN_KEY, running_server
from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, StableDiffusionPipeline
from torch.utils.flop_counter import FlopCounterMode


def _shapes(args) -> dict:
    size = args.size or (512 if args.full else 64)
    if args.video:
        steps = args.steps or (25 if args.full else 4)
        return {"width": size, "height": size, "num_inference_steps": steps, "num_frames": 16}
    steps = args.steps or (30 if args.full else 4)
    return {"width": size, "height": size, "num_inference_steps": steps}


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def plain_diffusers(model: Path, adapter: Path, args, device: str, result: dict) -> None:
    """Plain diffusers pipeline calls, one prompt per image, at each of `--plain-batches`."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=dtype)
    extra = {}
    if args.video:
        motion = MotionAdapter.from_pretrained(adapter, dtype=dtype)
        pipe = AnimateDiffPipeline.from_pipe(pipe, motion_adapter=motion)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as the server is asked
        extra = {"num_frames": 16, "decode_chunk_size": 8}
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    shapes = _shapes(args)

    def run(batch: int, seed: int) -> None:
        pipe(
            ["a lighthouse at dawn"] * batch,
            height=shapes["height"],
            width=shapes["width"],
            num_inference_steps=shapes["num_inference_steps"],
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)],
            **extra,
        )
        if device == "cuda":
            torch.cuda.synchronize()

    plain = result.setdefault("plain", {})
    with FlopCounterMode(display=False) as counter:
        run(1, 0)  # the warm-up, counted: FLOPs of one output
    plain["gflops_per_output"] = round(counter.get_total_flops() / 1e9, 1)
    write_json(args.json, result)
    for batch in _ints(args.plain_batches):
        if batch > 1:
            run(batch, 0)  # warm-up at this batch size
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        latencies = []
        for call in range(max(2, args.baseline_images // batch)):
            started = time.perf_counter()
            run(batch, 100 * call)
            latencies.append(time.perf_counter() - started)
        plain[f"batch_{batch}"] = {
            "batch": batch,
            "calls": len(latencies),
            "outputs_per_s": round(batch * len(latencies) / sum(latencies), 3),
            **latency_summary(latencies),
            "torch_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20)
            if device == "cuda"
            else None,
        }
        write_json(args.json, result)


async def drive(url: str, model_id: str, args, clients: int, requests: int, **extra) -> dict:
    """`requests` requests from `clients` concurrent clients; latencies, timings and errors."""
    body = {
        "key": ADMIN_KEY,
        "model_id": model_id,
        "prompt": "a lighthouse at dawn",
        "safety_checker": "no",
        "enhance_prompt": "no",
        **_shapes(args),
        **extra,
    }
    endpoint = "/api/v4/dreambooth"
    if args.video:
        endpoint = "/api/v6/video/text2video"
        body["scheduler"] = "DDIMScheduler"
        body.setdefault("output_type", args.output_type)
    latencies: list[float] = []
    timings: list[dict] = []
    errors: list[str] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:

        async def client(count: int, offset: int) -> None:
            for i in range(count):
                started = time.perf_counter()
                try:
                    answer = (
                        await http.post(url + endpoint, json={**body, "seed": offset + i})
                    ).json()
                except (httpx.HTTPError, ValueError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if answer.get("status") != "success":
                    errors.append(str(answer.get("message") or answer)[:300])
                    continue
                latencies.append(time.perf_counter() - started)
                timings.append(answer.get("timings") or {})

        per_client = max(1, requests // clients)
        started = time.perf_counter()
        await asyncio.gather(*(client(per_client, 1000 * c) for c in range(clients)))
        wall = time.perf_counter() - started
    batch_sizes = [t["batch_size"] for t in timings if "batch_size" in t]
    return {
        "clients": clients,
        "requests": per_client * clients,
        "ok": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": round(wall, 3),
        "outputs_per_s": round(len(latencies) / wall, 3),
        **latency_summary(latencies),
        "mean_batch_size": round(sum(batch_sizes) / len(batch_sizes), 2) if batch_sizes else None,
        "stages": stage_summary(timings),
    }


def server_levels(data_dir: Path, model_id: str, adapter: Path, args, result: dict) -> None:
    env = {
        "SDSERVE_MAX_BATCH_SIZE": str(args.max_batch),
        "SDSERVE_BATCH_WINDOW_MS": str(args.window_ms),
        "SDSERVE_MAX_BATCH_COST": "100000",
        "SDSERVE_QUEUE_LIMIT_PER_KEY": "100000",
        "SDSERVE_SYNC_WAIT_SECONDS": "600",
        "SDSERVE_VIDEO_DECODE_CHUNK": "8",
    }
    if args.full:
        env["SDSERVE_MOTION_ADAPTER"] = str(adapter)
    env.update(dict(pair.split("=", 1) for pair in args.env))
    result["server_env"] = env
    server = result.setdefault("server", {})
    started = time.perf_counter()
    with running_server(data_dir=str(data_dir), **env) as url:
        server["start_s"] = round(time.perf_counter() - started, 2)
        # Warm-up: loads the model and runs the batch sizes the first level will use.
        started = time.perf_counter()
        levels = _ints(args.clients)
        warm = asyncio.run(drive(url, model_id, args, max(levels), max(levels)))
        server["warmup"] = {"s": round(time.perf_counter() - started, 2), "errors": warm["errors"]}
        server["warmup_first_error"] = warm["first_error"]
        write_json(args.json, result)
        single = []
        for _ in range(args.single):  # one request alone: the latency a lone user sees
            alone = asyncio.run(drive(url, model_id, args, 1, 1))
            if alone["ok"]:
                single.append(alone["p50_s"])
        server["single_request"] = latency_summary(single) | {"n": len(single)}
        write_json(args.json, result)
        for clients in levels:
            server[f"clients_{clients}"] = asyncio.run(
                drive(url, model_id, args, clients, clients * args.requests_per_client)
            )
            write_json(args.json, result)
        if args.nsfw_clients:
            level = asyncio.run(
                drive(
                    url,
                    model_id,
                    args,
                    args.nsfw_clients,
                    args.nsfw_clients * args.requests_per_client,
                    safety_checker="yes",
                )
            )
            server[f"clients_{args.nsfw_clients}_nsfw"] = level
            write_json(args.json, result)


def _add_mfu(result: dict, peak_tflops: float) -> None:
    gflops = result.get("plain", {}).get("gflops_per_output")
    if not gflops or result["facts"]["device"] == "cpu":
        return
    for group in (result.get("plain", {}), result.get("server", {})):
        for entry in group.values():
            if isinstance(entry, dict) and entry.get("outputs_per_s"):
                entry["mfu"] = round(
                    gflops * 1e9 * entry["outputs_per_s"] / (peak_tflops * 1e12), 4
                )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="SD1.5 shapes (a GPU)")
    parser.add_argument("--video", action="store_true", help="text2video clips, not images")
    parser.add_argument("--size", type=int, help="override the shape (a quick rehearsal)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--clients", default="32", help="concurrency levels, e.g. 1,8,32; '' skips")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--single", type=int, default=4, help="lone requests timed")
    parser.add_argument("--nsfw-clients", type=int, default=0, help="a level with the NSFW check")
    parser.add_argument(
        "--plain-batches", default="1", help="plain diffusers batch sizes; '' skips"
    )
    parser.add_argument("--baseline-images", type=int, default=8, help="outputs per batch size")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=25)
    parser.add_argument("--output-type", default="mp4", help="clips' format (--video)")
    parser.add_argument("--env", action="append", default=[], help="server setting K=V")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--model-dir", help="build the model here once and reuse it")
    parser.add_argument("--gflops-per-output", type=float, help="for MFU when plain is skipped")
    parser.add_argument("--json", help="write the result here (after each measurement)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {
        "facts": device_facts(),
        "settings": {**vars(args), "shapes": _shapes(args)},
    }
    if args.gflops_per_output:
        result["plain"] = {"gflops_per_output": args.gflops_per_output}

    with tempfile.TemporaryDirectory(prefix="sdserve-throughput-") as tmp:
        data = Path(args.model_dir or tmp)
        with GpuMemoryPeak() as memory:
            started = time.perf_counter()
            model, adapter, model_id = bench_models(args.full, data)
            result["model_build_s"] = round(time.perf_counter() - started, 2)
            if _ints(args.plain_batches):
                plain_diffusers(model, adapter, args, device, result)
                if device == "cuda":
                    torch.cuda.empty_cache()
            if _ints(args.clients):
                server_levels(data, model_id, adapter, args, result)
        result["gpu_memory_peak_mib"] = memory.peak_mib
    _add_mfu(result, args.peak_tflops)
    write_json(args.json, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Images (or clips) per second through the server with N concurrent clients (cross-request
batching), against plain diffusers one at a time, in the same run; p50/p95 latency and MFU from
counted FLOPs.

Run on CPU (tiny shapes):   .venv/bin/python bench/throughput.py [--video]
Run on a GPU (full shapes): .venv/bin/python bench/throughput.py --full [--video]
Full shapes = SD1.5 UNet / VAE / CLIP-L with random weights (the compute is the real model's),
512x512, 30 steps, fp16; with --video, text2video clips of 16 frames at 25 steps through the v1.5
motion adapter, against plain AnimateDiffPipeline. MFU = counted FLOPs per output x outputs/s /
the device's peak (`--peak-tflops`, 989 for an H100's dense fp16/bf16).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _server import ADMIN_KEY, running_server
from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, StableDiffusionPipeline
from torch.utils.flop_counter import FlopCounterMode
from video import build_full_model

from sdserve.engine.tiny import TINY_MOTION_ADAPTER, ensure_tiny_model


def _shapes(args) -> dict:
    size = 512 if args.full else 64
    if args.video:
        steps = 25 if args.full else 4
        return {"width": size, "height": size, "num_inference_steps": steps, "num_frames": 16}
    return {"width": size, "height": size, "num_inference_steps": 30 if args.full else 4}


def plain_diffusers(model: Path, adapter: Path, args, device: str) -> tuple[list[float], float]:
    """One image or clip at a time, as servers without batching run; (latencies, FLOPs each)."""
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

    def one(seed: int) -> None:
        pipe(
            "a lighthouse at dawn",
            height=shapes["height"],
            width=shapes["width"],
            num_inference_steps=shapes["num_inference_steps"],
            generator=torch.Generator("cpu").manual_seed(seed),
            **extra,
        )
        if device == "cuda":
            torch.cuda.synchronize()

    one(0)  # warm-up
    with FlopCounterMode(display=False) as counter:
        one(1)
    latencies = []
    for seed in range(args.baseline_images):
        started = time.perf_counter()
        one(seed)
        latencies.append(time.perf_counter() - started)
    return latencies, counter.get_total_flops()


async def drive(url: str, model_id: str, args) -> tuple[float, list[float]]:
    body = {
        "key": ADMIN_KEY,
        "model_id": model_id,
        "prompt": "a lighthouse at dawn",
        "safety_checker": "no",
        "enhance_prompt": "no",
        **_shapes(args),
    }
    endpoint = "/api/v4/dreambooth"
    if args.video:
        endpoint = "/api/v6/video/text2video"
        body["scheduler"] = "DDIMScheduler"
    latencies: list[float] = []
    async with httpx.AsyncClient(
        timeout=600, limits=httpx.Limits(max_connections=args.clients)
    ) as http:

        async def client(count: int, offset: int) -> None:
            for i in range(count):
                started = time.perf_counter()
                answer = (await http.post(url + endpoint, json={**body, "seed": offset + i})).json()
                assert answer["status"] == "success", answer
                latencies.append(time.perf_counter() - started)

        per_client = max(1, args.images // args.clients)
        started = time.perf_counter()
        await asyncio.gather(*(client(per_client, 1000 * c) for c in range(args.clients)))
        return time.perf_counter() - started, latencies


def _p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="SD1.5 shapes (a GPU)")
    parser.add_argument("--video", action="store_true", help="text2video clips, not images")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--images", type=int, default=128, help="requests: images or clips")
    parser.add_argument("--baseline-images", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=25)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    with tempfile.TemporaryDirectory(prefix="sdserve-throughput-") as tmp:
        data = Path(tmp)
        if args.full:
            model, adapter = build_full_model(data)
            model_id = "bench-sd15"
        else:
            model = ensure_tiny_model("tiny-sd", data / "models")
            adapter = ensure_tiny_model(TINY_MOTION_ADAPTER, data / "models")
            model_id = "tiny-sd"
        baseline, flops = plain_diffusers(model, adapter, args, device)
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
        with running_server(data_dir=tmp, **env) as url:
            asyncio.run(
                drive(url, model_id, argparse.Namespace(**{**vars(args), "images": args.clients}))
            )
            single = []
            for _ in range(4):  # one request alone: the latency a lone user sees
                started = time.perf_counter()
                asyncio.run(
                    drive(
                        url,
                        model_id,
                        argparse.Namespace(**{**vars(args), "clients": 1, "images": 1}),
                    )
                )
                single.append(time.perf_counter() - started)
            wall, latencies = asyncio.run(drive(url, model_id, args))

    served = len(latencies) / wall
    plain = 1 / statistics.median(baseline)
    peak = args.peak_tflops * 1e12
    unit = "clips" if args.video else "images"
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shapes": _shapes(args),
        "clients": args.clients,
        f"plain_diffusers_{unit}_per_s": round(plain, 2),
        f"server_{unit}_per_s": round(served, 2),
        "speedup": round(served / plain, 2),
        "server_p50_s": round(statistics.median(latencies), 3),
        "server_p95_s": round(_p(latencies, 0.95), 3),
        "single_request_s": round(statistics.median(single), 3),
        f"gflops_per_{unit[:-1]}": round(flops / 1e9, 1),
        "mfu_server": round(flops * served / peak, 4) if device == "cuda" else None,
        "mfu_plain": round(flops * plain / peak, 4) if device == "cuda" else None,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

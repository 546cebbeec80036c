"""AnimateDiff text2video: seconds per clip and peak memory, through the server vs plain diffusers.

Run on CPU (tiny shapes):   .venv/bin/python bench/video.py
Run on a GPU (full shapes): .venv/bin/python bench/video.py --full [--json PATH]
Full shapes = SD1.5 UNet / VAE / CLIP-L and the v1.5 motion adapter, with random weights (the
compute is the real model's): 16 frames, 512x512, 25 steps, fp16. Both sides run the same
weights, scheduler, frame count and VAE decode chunk.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
from _server import ADMIN_KEY, peak_rss_mb, running_server, server_pid
from diffusers import (
    AnimateDiffPipeline,
    DDIMScheduler,
    MotionAdapter,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)


def build_full_model(folder: Path) -> tuple[Path, Path]:
    """A random-weight SD1.5 diffusers folder and v1.5 motion adapter, from sdserve's shipped configs."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    configs = Path(__import__("sdserve").__file__).parent / "engine" / "configs" / "sd15"
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(configs / "tokenizer")
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_pretrained(configs / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Saved in fp16: half the disk and load time; both sides load it in their own dtype.
    pipe.to(torch.float16).save_pretrained(folder / "models" / "bench-sd15")
    adapter = MotionAdapter().to(torch.float16)  # defaults = the v1.5 adapter shape
    adapter.save_pretrained(folder / "bench-adapter")
    return folder / "models" / "bench-sd15", folder / "bench-adapter"


def plain_diffusers(model: Path, adapter: Path, args, device: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    dtype = torch.float16 if device == "cuda" else torch.float32
    base = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    pipe = AnimateDiffPipeline.from_pipe(
        base, motion_adapter=MotionAdapter.from_pretrained(adapter, torch_dtype=dtype)
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as the server is asked
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def clip(seed: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        pipe(
            args.prompt,
            num_frames=args.frames,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            generator=torch.Generator("cpu").manual_seed(seed),
            decode_chunk_size=8,
            output_type="pil",
        )
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    with FlopCounterMode(display=False) as counter:
        clip(0)  # the warm-up, counted: FLOPs of one clip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [clip(i + 1) for i in range(args.clips)]
    return {
        "clips": len(times),
        **latency_summary(times),
        "gflops_per_clip": round(counter.get_total_flops() / 1e9, 1),
        "torch_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20)
        if device == "cuda"
        else None,
    }


def through_server(model_id: str, args, env: dict, data_dir: str | None) -> dict:
    body = {
        "key": ADMIN_KEY,
        "model_id": model_id,
        "prompt": args.prompt,
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "num_frames": args.frames,
        "scheduler": "DDIMScheduler",
        "enhance_prompt": "no",
        "output_type": args.output_type,
    }
    latencies, pipeline, timings, errors = [], [], [], []
    server_env = {"SDSERVE_SYNC_WAIT_SECONDS": "600", "SDSERVE_VIDEO_DECODE_CHUNK": "8", **env}
    with running_server(data_dir, **server_env) as url:
        with httpx.Client(timeout=900) as client:
            for i in range(args.clips + 1):
                started = time.perf_counter()
                data = client.post(
                    url + "/api/v4/dreambooth/text2video", json={**body, "seed": i + 1}
                ).json()
                if data.get("status") != "success":
                    errors.append(str(data.get("message") or data)[:300])
                elif i:  # the first clip loads the model
                    latencies.append(time.perf_counter() - started)
                    pipeline.append(data["timings"]["denoise"] + data["timings"]["decode"])
                    timings.append(data["timings"])
        peak = peak_rss_mb(server_pid(url))
    return {
        "clips": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        **latency_summary(latencies),
        "pipeline_p50_s": round(statistics.median(pipeline), 4) if pipeline else None,
        "stages": stage_summary(timings),
        "server_peak_rss_mib": round(peak),
        "server_env": server_env,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="SD1.5 + motion adapter shapes (GPU)")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--prompt", default="a lighthouse on a cliff, waves crashing")
    parser.add_argument("--output-type", default="mp4", help="mp4 needs PyAV; gif / webp do not")
    parser.add_argument("--frames", type=int, help="override the shape (a quick rehearsal)")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--env", action="append", default=[], help="server setting K=V")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--model-dir", help="build the model here once and reuse it")
    parser.add_argument("--json", help="write the result here (after each measurement)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    frames, size, steps = (16, 512, 25) if args.full else (16, 128, 10)
    args.frames, args.size, args.steps = (
        args.frames or frames,
        args.size or size,
        args.steps or steps,
    )
    shape = {"frames": args.frames, "size": args.size, "steps": args.steps, "device": device}
    result: dict = {"facts": device_facts(), "settings": {**vars(args), "shape": shape}}

    with tempfile.TemporaryDirectory(prefix="sdserve-video-bench-") as tmp:
        data = Path(args.model_dir or tmp)
        with GpuMemoryPeak() as memory:
            model, adapter, model_id = bench_models(args.full, data)
            env = {"SDSERVE_MOTION_ADAPTER": str(adapter)} if args.full else {}
            env.update(dict(pair.split("=", 1) for pair in args.env))
            if not args.skip_server:
                result["server"] = through_server(model_id, args, env, str(data))
                write_json(args.json, result)
            if not args.skip_plain:
                result["plain"] = plain_diffusers(model, adapter, args, device)
        result["gpu_memory_peak_mib"] = memory.peak_mib
    gflops = result.get("plain", {}).get("gflops_per_clip")
    if gflops and device == "cuda":
        for side in ("plain", "server"):
            if result.get(side, {}).get("p50_s"):
                result[side]["mfu"] = round(
                    gflops * 1e9 / result[side]["p50_s"] / (args.peak_tflops * 1e12), 4
                )
    write_json(args.json, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""AnimateDiff text2video: seconds per clip and peak memory, through the server vs plain diffusers.

Run on CPU (tiny shapes):   .venv/bin/python bench/video.py
Run on a GPU (full shapes): .venv/bin/python bench/video.py --full
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
from _server import ADMIN_KEY, peak_rss_mb, running_server, server_pid
from diffusers import (
    AnimateDiffPipeline,
    DDIMScheduler,
    MotionAdapter,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from sdserve.engine.tiny import TINY_MOTION_ADAPTER, ensure_tiny_model


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
    pipe.save_pretrained(folder / "models" / "bench-sd15")
    MotionAdapter().save_pretrained(folder / "bench-adapter")  # defaults = the v1.5 adapter shape
    return folder / "models" / "bench-sd15", folder / "bench-adapter"


def plain_diffusers(model: Path, adapter: Path, args, device: str) -> tuple[list[float], float]:
    dtype = torch.float16 if device == "cuda" else torch.float32
    base = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    pipe = AnimateDiffPipeline.from_pipe(
        base, motion_adapter=MotionAdapter.from_pretrained(adapter, torch_dtype=dtype)
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as the server is asked
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.clips + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        pipe(
            args.prompt,
            num_frames=args.frames,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            generator=torch.Generator("cpu").manual_seed(i),
            decode_chunk_size=8,
            output_type="pil",
        )
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return times[1:], peak


def through_server(
    model_id: str, args, env: dict, data_dir: str | None
) -> tuple[list[float], list[float], float]:
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
    }
    latencies, pipeline = [], []
    with running_server(
        data_dir, SDSERVE_SYNC_WAIT_SECONDS="600", SDSERVE_VIDEO_DECODE_CHUNK="8", **env
    ) as url:
        with httpx.Client(timeout=900) as client:
            for i in range(args.clips + 1):
                started = time.perf_counter()
                data = client.post(
                    url + "/api/v4/dreambooth/text2video", json={**body, "seed": i + 1}
                ).json()
                assert data["status"] == "success", data
                if i:  # the first clip loads the model
                    latencies.append(time.perf_counter() - started)
                    pipeline.append(data["timings"]["denoise"] + data["timings"]["decode"])
        peak = peak_rss_mb(server_pid(url))
    return latencies, pipeline, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="SD1.5 + motion adapter shapes (GPU)")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--prompt", default="a lighthouse on a cliff, waves crashing")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.frames, args.size, args.steps = (16, 512, 25) if args.full else (16, 128, 10)

    with tempfile.TemporaryDirectory(prefix="sdserve-video-bench-") as tmp:
        tmp = Path(tmp)
        if args.full:
            model, adapter = build_full_model(tmp)
            model_id, env, data_dir = (
                "bench-sd15",
                {"SDSERVE_MOTION_ADAPTER": str(adapter)},
                str(tmp),
            )
        else:
            model = ensure_tiny_model("tiny-sd", tmp / "models")
            adapter = ensure_tiny_model(TINY_MOTION_ADAPTER, tmp / "models")
            model_id, env, data_dir = "tiny-sd", {}, None
        latencies, pipeline, server_peak = through_server(model_id, args, env, data_dir)
        plain, plain_peak = plain_diffusers(model, adapter, args, device)

    shape = f"{args.frames} frames, {args.size}x{args.size}, {args.steps} steps, {device}"
    print(json.dumps({"shape": shape, "clips": args.clips}))
    print(f"through the server (request to success)  {statistics.median(latencies):8.3f} s/clip")
    print(f"  of which the pipeline call             {statistics.median(pipeline):8.3f} s/clip")
    print(f"plain diffusers AnimateDiffPipeline      {statistics.median(plain):8.3f} s/clip")
    if device == "cuda":
        print(f"plain diffusers peak GPU memory          {plain_peak:8.0f} MiB")
    print(f"server process peak RSS                  {server_peak:8.0f} MiB")


if __name__ == "__main__":
    main()

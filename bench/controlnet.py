"""ControlNet txt2img (canny hint): seconds per image through the server vs plain diffusers'
`StableDiffusionControlNetPipeline`, in the same run, on the same weights and hint.

Run on CPU (tiny shapes):   .venv/bin/python bench/controlnet.py
Run on a GPU (full shapes): .venv/bin/python bench/controlnet.py --full [--json PATH]
Full shapes = an SD1.5 UNet / VAE / CLIP-L with random weights and a ControlNet of the SD1.5 shape
(`ControlNetModel.from_unet`), 512x512, 20 steps (fp16 on a GPU). Tiny = tiny-sd and its tiny
canny net, 128x128, 10 steps.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _gpu import GpuMemoryPeak, device_facts, latency_summary, stage_summary, write_json
from _server import ADMIN_KEY, running_server
from diffusers import ControlNetModel, DiffusionPipeline, StableDiffusionControlNetPipeline
from PIL import Image, ImageDraw

from sdserve.engine import hints


def _models(full: bool, data: Path) -> tuple[Path, Path, str]:
    """(base folder, ControlNet folder, model_id): the net where the server finds it."""
    if full:
        from video import build_full_model

        base = data / "models" / "bench-sd15"
        if not (base / "model_index.json").exists():
            build_full_model(data)
        net = data / "controlnet" / "canny"
        if not (net / "config.json").exists():
            unet = DiffusionPipeline.from_pretrained(base).unet
            ControlNetModel.from_unet(unet).to(torch.float16).save_pretrained(net)
        return base, net, "bench-sd15"
    from sdserve.engine.controlnet import ensure_tiny_controlnet
    from sdserve.engine.tiny import ensure_tiny_model

    base = ensure_tiny_model("tiny-sd", data / "models")
    return base, ensure_tiny_controlnet("tiny-sd", "canny", data / "models"), "tiny-sd"


def _scene(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (220, 215, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((size // 5, size // 6, size // 2, size // 2), fill=(80, 130, 210))
    draw.rectangle((0, int(size * 0.7), size, size), fill=(120, 90, 60))
    return image


def plain_diffusers(base: Path, net: Path, hint: Image.Image, args, device: str) -> dict:
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionControlNetPipeline.from_pipe(
        DiffusionPipeline.from_pretrained(base, torch_dtype=dtype),
        controlnet=ControlNetModel.from_pretrained(net, torch_dtype=dtype),
    ).to(device)
    pipe.set_progress_bar_config(disable=True)

    def image(seed: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        pipe(
            args.prompt,
            image=hint,
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            controlnet_conditioning_scale=0.5,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    image(0)  # warm-up
    return {"images": args.images, **latency_summary([image(i + 1) for i in range(args.images)])}


def through_server(model_id: str, hint: Image.Image, args, data_dir: str) -> dict:
    buffer = io.BytesIO()
    hint.save(buffer, format="PNG")
    body = {
        "key": ADMIN_KEY,
        "model_id": model_id,
        "prompt": args.prompt,
        "controlnet_model": "canny",
        "control_image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "safety_checker": "no",
        "enhance_prompt": "no",
    }
    latencies, timings, errors = [], [], []
    with running_server(data_dir, SDSERVE_SYNC_WAIT_SECONDS="600") as url:
        with httpx.Client(timeout=900) as client:
            for i in range(args.images + 1):
                started = time.perf_counter()
                data = client.post(url + "/api/v5/controlnet", json={**body, "seed": i + 1}).json()
                if data.get("status") != "success":
                    errors.append(str(data.get("message") or data)[:300])
                elif i:  # the first loads the model and the net
                    latencies.append(time.perf_counter() - started)
                    timings.append(data.get("timings", {}))
    return {
        "images": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        **latency_summary(latencies),
        "stages": stage_summary(timings),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="SD1.5 + ControlNet shapes (GPU)")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--prompt", default="a cosy living room, warm light")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--model-dir", help="build the models here once and reuse them")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, steps = (512, 20) if args.full else (128, 10)
    args.size, args.steps = args.size or size, args.steps or steps
    result: dict = {"facts": device_facts(), "settings": vars(args) | {"device": device}}
    with tempfile.TemporaryDirectory(prefix="sdserve-controlnet-bench-") as tmp:
        data = Path(args.model_dir or tmp)
        with GpuMemoryPeak() as memory:
            base, net, model_id = _models(args.full, data)
            hint = hints.make_hint("canny", _scene(args.size))
            result["server"] = through_server(model_id, hint, args, str(data))
            write_json(args.json, result)
            result["plain"] = plain_diffusers(base, net, hint, args, device)
        result["gpu_memory_peak_mib"] = memory.peak_mib
    write_json(args.json, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

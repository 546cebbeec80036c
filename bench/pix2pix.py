"""Instruct pix2pix, the representative image-editing case: seconds per edit through the server
(`/api/v6/image_editing/pix2pix`) against plain diffusers on the same weights, in the same run.

Run on CPU (tiny shapes):   .venv/bin/python bench/pix2pix.py
Run on a GPU (full shapes): .venv/bin/python bench/pix2pix.py --full [--json PATH]
Full shapes = SD1.5 VAE / CLIP-L and an 8-channel SD1.5 UNet (timbrooks/instruct-pix2pix's
layout) with random weights, 512x512, 20 steps, fp16 on the GPU. Tiny = the built-in tiny-pix2pix,
128x128, 10 steps.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _gpu import device_facts, latency_summary, stage_summary, write_json
from _server import ADMIN_KEY, running_server
from diffusers import StableDiffusionInstructPix2PixPipeline
from PIL import Image


def build_model(full: bool, folder: Path) -> tuple[Path, str]:
    """(model folder, model_id): the tiny built-in one, or SD1.5 shapes with an 8-channel UNet."""
    if not full:
        from sdserve.engine.editing_models import ensure_tiny_edit_model

        return ensure_tiny_edit_model("tiny-pix2pix", folder / "models"), "tiny-pix2pix"
    model = folder / "models" / "bench-pix2pix"
    if not (model / "model_index.json").exists():
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        configs = Path(__import__("sdserve").__file__).parent / "engine" / "configs" / "sd15"
        unet_config = {**UNet2DConditionModel.load_config(configs / "unet"), "in_channels": 8}
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
            text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")),
            tokenizer=CLIPTokenizer.from_pretrained(configs / "tokenizer"),
            unet=UNet2DConditionModel.from_config(unet_config),
            scheduler=DDIMScheduler.from_pretrained(configs / "scheduler"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.to(torch.float16).save_pretrained(model)
    return model, "bench-pix2pix"


def source_image(size: int) -> Image.Image:
    return Image.radial_gradient("L").resize((size, size)).convert("RGB")


def plain_diffusers(model: Path, args, device: str) -> dict:
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(model, dtype=dtype)
    pipe.to(device).set_progress_bar_config(disable=True)
    image = source_image(args.size)

    def edit(seed: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        pipe(
            args.prompt,
            image=image,
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            image_guidance_scale=1.5,
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    edit(0)  # warm-up
    times = [edit(i + 1) for i in range(args.edits)]
    return {"edits": len(times), **latency_summary(times)}


def through_server(model_id: str, args, data_dir: str) -> dict:
    buffer = io.BytesIO()
    source_image(args.size).save(buffer, format="PNG")
    body = {
        "key": ADMIN_KEY,
        "model_id": model_id,
        "init_image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
        "prompt": args.prompt,
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "guidance_scale": 7.0,
        "image_guidance_scale": 1.5,
        "safety_checker": "no",
    }
    latencies, pipeline, timings, errors = [], [], [], []
    with running_server(data_dir, SDSERVE_SYNC_WAIT_SECONDS="600") as url:
        with httpx.Client(timeout=900) as client:
            for i in range(args.edits + 1):
                started = time.perf_counter()
                data = client.post(
                    url + "/api/v6/image_editing/pix2pix", json={**body, "seed": i + 1}
                ).json()
                if data.get("status") != "success":
                    errors.append(str(data.get("message") or data)[:300])
                elif i:  # the first edit loads the model
                    latencies.append(time.perf_counter() - started)
                    pipeline.append(data["timings"]["denoise"])
                    timings.append(data["timings"])
    return {
        "edits": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        **latency_summary(latencies),
        "pipeline_p50_s": round(statistics.median(pipeline), 4) if pipeline else None,
        "stages": stage_summary(timings),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="SD1.5 shapes, 8-channel UNet (GPU)")
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--prompt", default="make it look like winter")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--model-dir", help="build the model here once and reuse it")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, steps = (512, 20) if args.full else (128, 10)
    args.size, args.steps = args.size or size, args.steps or steps
    result: dict = {"facts": device_facts(), "settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="sdserve-pix2pix-bench-") as tmp:
        data = Path(args.model_dir or tmp)
        model, model_id = build_model(args.full, data)
        result["server"] = through_server(model_id, args, str(data))
        result["plain"] = plain_diffusers(model, args, device)
    server, plain = result["server"].get("p50_s"), result["plain"].get("p50_s")
    if server and plain:
        result["server_over_plain"] = round(server / plain, 3)
    write_json(args.json, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Text to 3D: seconds per mesh through the server (`/api/v6/3d/text_to_3d`) against plain
diffusers (ShapEPipeline latents, `decode_to_mesh`, a trimesh glb export) in the same run.

Run on CPU (the built-in tiny Shap-E):  .venv/bin/python bench/three_d.py
Options: --meshes N, --steps S, --resolution R (marching-cubes grid), --model-id (a Shap-E
folder in the data dir or `openai/shap-e` when it is downloaded), --json PATH.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx
import torch
from _gpu import device_facts, latency_summary, stage_summary, write_json
from _server import ADMIN_KEY, running_server

from sdserve.engine import shap_e
from sdserve.media.mesh import encode_mesh
from sdserve.settings import Settings


def plain_diffusers(args, data_dir: Path, device: str):
    """A function making one mesh with plain diffusers, as the server is asked to."""
    settings = Settings(data_dir=data_dir, offline=True)
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = shap_e.load(
        shap_e.resolve(args.model_id, settings), settings, torch.device(device), dtype
    )

    def mesh(seed: int) -> float:
        started = time.perf_counter()
        latents = pipe(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=15.0,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        ).images
        raw = pipe.shap_e_renderer.decode_to_mesh(
            latents[0][None], device, grid_size=args.resolution, query_batch_size=8192
        )
        colors = torch.stack([raw.vertex_channels[c] for c in "RGB"], 1).float().cpu().numpy()
        encode_mesh(raw.verts.float().cpu().numpy(), raw.faces.cpu().numpy(), colors, "glb")
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return mesh


def compare(args, data_dir: Path, device: str) -> dict:
    """Server and plain meshes taken in turns, so that a busy machine slows both alike."""
    body = {
        "key": ADMIN_KEY,
        "model_id": args.model_id,
        "prompt": args.prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": 15,
        "resolution": args.resolution,
        "output_format": "glb",  # chunk_size defaults to 8192, as plain's query batch
    }
    served, plain, timings, errors = [], [], [], []
    with running_server(str(data_dir), SDSERVE_SYNC_WAIT_SECONDS="600") as url:
        with httpx.Client(timeout=900) as client:
            for i in range(args.meshes + 1):
                started = time.perf_counter()
                data = client.post(url + "/api/v6/3d/text_to_3d", json={**body, "seed": i + 1})
                data = data.json()
                if data.get("status") != "success":
                    errors.append(str(data.get("message") or data)[:300])
                elif i:  # the first mesh loads the model (and builds the tiny one)
                    client.get(data["output"][0]).raise_for_status()
                    served.append(time.perf_counter() - started)
                    timings.append(data["timings"])
                if i == 0:
                    mesh = plain_diffusers(args, data_dir, device)
                    mesh(0)  # warm-up
                else:
                    plain.append(mesh(i))
    return {
        "server": {
            "meshes": len(served),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            **latency_summary(served),
            "stages": stage_summary(timings),
        },
        "plain": {"meshes": len(plain), **latency_summary(plain)},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--meshes", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--model-id", default=shap_e.TINY_TEXT)
    parser.add_argument("--prompt", default="a small wooden chair")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict = {"facts": device_facts(), "settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="sdserve-3d-bench-") as tmp:
        result.update(compare(args, Path(tmp), device))
    server, plain = result["server"].get("p50_s"), result["plain"].get("p50_s")
    if server and plain:
        result["server_overhead_s"] = round(server - plain, 4)
    write_json(args.json, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

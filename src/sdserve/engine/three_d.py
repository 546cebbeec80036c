"""Text and image to 3D with Shap-E: latents from the prior, then a turntable of rendered views
and/or a marching-cubes mesh from the same latents, per sample."""

from __future__ import annotations

import io
import threading
import time
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from sdserve.engine import shap_e
from sdserve.engine.base import EngineJob, EngineOutput, OutputFile, Runtime
from sdserve.engine.registry import free_device_memory
from sdserve.errors import EngineError, SdserveError
from sdserve.media.mesh import (
    MESH_FORMATS,
    encode_mesh,
    encode_turntable_gif,
    turntable_video_frames,
)
from sdserve.media.video import encode_video

OutputFormat = Literal["gif", "mp4", "glb", "obj", "stl", "ply"]
TURNTABLE_VIEWS = 20  # diffusers' pan cameras: one turn round the object
VIDEO_FPS = 20
# NeRF samples per ray, coarse + fine: Shap-E's own for real models; the tiny models' renderer
# is random, and 8 + 8 keeps its turntables quick.
_SAMPLES = {"real": (64, 128), "tiny": (8, 8)}
_MAX_RAY_BATCH = 4096  # rays rendered at once (diffusers' default)


class ThreeDParams(BaseModel):
    """What a 3D job asks of the engine (stored on the job)."""

    model_config = ConfigDict(extra="ignore")

    task: shap_e.Task
    model_id: str
    prompt: str = ""
    steps: int
    guidance_scale: float
    seed: int
    samples: int = 1
    outputs: list[OutputFormat]  # per sample, in this order: the job's files
    frame_size: int = 256  # turntable views, pixels per side
    seconds: int = 4  # turntable length
    grid_size: int = 128  # marching-cubes grid per axis
    chunk_size: int = 4096  # points per renderer query batch
    remove_bg: bool = False
    foreground_ratio: float = 0.85

    @property
    def cost(self) -> float:
        # One unit is one 512x512 diffusion step. The prior is cheap; NeRF rendering (192 samples
        # a ray at 256 px is ~250 M network queries for 20 views) and the mesh grid dominate.
        render = 100 * (self.frame_size / 256) ** 2 if self.needs_frames else 0.0
        mesh = 10 * (self.grid_size / 128) ** 3 if self.mesh_formats else 0.0
        return self.samples * (0.2 * self.steps + render + mesh)

    @property
    def decode_steps(self) -> int:
        """One sample's views and mesh in progress steps, each worth a prior step's cost (one prior
        step runs every sample): a running job's eta follows its progress, and decoding is most of
        a job's time."""
        decode = self.cost / self.samples - 0.2 * self.steps
        return max(1, round(decode / (0.2 * self.samples)))

    @property
    def total_steps(self) -> int:
        return self.steps + self.samples * self.decode_steps

    @property
    def needs_frames(self) -> bool:
        return "gif" in self.outputs or "mp4" in self.outputs

    @property
    def mesh_formats(self) -> list[str]:
        return [f for f in self.outputs if f in MESH_FORMATS]


class ThreeDEngine:
    """Shap-E jobs, one at a time: each is solo (its renders dominate, and do not batch)."""

    kinds = ("txt_to_3d", "img_to_3d")

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings = runtime.settings
        self._lock = threading.Lock()

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        with self._lock:
            return [self._run(job) for job in jobs]

    def _run(self, job: EngineJob) -> EngineOutput | Exception:
        p = ThreeDParams.model_validate(job.params)
        try:
            return self.generate(p, self._input_image(job, p) if p.task == "image" else None, job)
        except SdserveError as exc:
            return exc
        except torch.cuda.OutOfMemoryError:
            free_device_memory()
            return EngineError("Out of GPU memory: try a smaller frame_size or resolution")
        except Exception as exc:
            return EngineError(f"3D generation failed: {exc}")

    def pipeline(self, model_id: str):
        """The model's Shap-E pipeline, resident within the worker's shared memory budget."""
        source = shap_e.resolve(model_id, self.settings)

        def load():
            return shap_e.load(source, self.settings, self.runtime.device, self.runtime.dtype)

        return self.runtime.cache.get(f"shap-e:{model_id}", load)

    def generate(self, p: ThreeDParams, image: Image.Image | None, job: EngineJob) -> EngineOutput:
        # 1. load the model
        started = time.perf_counter()
        source = shap_e.resolve(p.model_id, self.settings)
        pipe = self.pipeline(p.model_id)
        device = self.runtime.device
        loaded = time.perf_counter()

        # 2. the prior: one latent per sample (the parameters of an implicit 3D function)
        generator = torch.Generator("cpu").manual_seed(p.seed)
        condition = {"prompt": p.prompt} if p.task == "text" else {"image": image}
        latents = pipe(
            **condition,
            num_images_per_prompt=p.samples,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            generator=generator,
            output_type="latent",
        ).images
        if not torch.isfinite(latents).all():
            raise EngineError("Generation failed: the model produced NaN values")
        job.events.step(p.steps, p.total_steps)
        denoised = time.perf_counter()

        # 3. per sample: the turntable views and the mesh, each decoded from the latent
        renderer = pipe.shap_e_renderer
        coarse, fine = _SAMPLES["tiny" if source.tiny else "real"]
        files: list[OutputFile] = []
        render = mesh_time = encode = 0.0
        mesh_meta: dict = {}
        for index, latent in enumerate(latents):
            frames: list[Image.Image] = []
            if p.needs_frames:
                mark = time.perf_counter()
                views = renderer.decode_to_image(
                    latent[None],
                    device,
                    size=p.frame_size,
                    ray_batch_size=_ray_batch(p.frame_size),
                    n_coarse_samples=coarse,
                    n_fine_samples=fine,
                )
                frames = _to_images(views)
                render += time.perf_counter() - mark
            mesh = None
            if p.mesh_formats:
                mark = time.perf_counter()
                mesh = renderer.decode_to_mesh(
                    latent[None], device, grid_size=p.grid_size, query_batch_size=p.chunk_size
                )
                mesh_time += time.perf_counter() - mark
                mesh_meta = {"vertices": len(mesh.verts), "faces": len(mesh.faces)}
            mark = time.perf_counter()
            files.extend(OutputFile(_encode(fmt, p, frames, mesh)) for fmt in p.outputs)
            encode += time.perf_counter() - mark
            job.events.step(p.steps + (index + 1) * p.decode_steps, p.total_steps)

        stages = {
            "model_load": loaded - started,
            "denoise": denoised - loaded,
            "render": render,
            "mesh": mesh_time,
            "encode": encode,
            "batch_size": 1,
        }
        meta = {"engine": "shap-e", **mesh_meta}
        return EngineOutput(files, stages, meta)

    def _input_image(self, job: EngineJob, p: ThreeDParams) -> Image.Image:
        image = Image.open(io.BytesIO(job.inputs.read("image")))
        image.load()
        if p.remove_bg:
            from sdserve.engine.removebg import remove_background  # edit family's rembg model

            image = center_foreground(remove_background(image.convert("RGB")), p.foreground_ratio)
        return on_white(image)


def center_foreground(image: Image.Image, ratio: float) -> Image.Image:
    """An RGBA cut-out centred on a square transparent canvas, its larger side `ratio` of the
    canvas (the framing image-to-3D models are trained on)."""
    image = image.convert("RGBA")
    box = image.getchannel("A").getbbox()
    if box is None:  # nothing found in front: keep the picture whole
        return image
    subject = image.crop(box)
    side = round(max(subject.size) / ratio)
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    canvas.paste(subject, ((side - subject.width) // 2, (side - subject.height) // 2))
    return canvas


def on_white(image: Image.Image) -> Image.Image:
    """RGB, transparent parts white: Shap-E's image model saw objects on white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _ray_batch(size: int) -> int:
    """The largest divisor of the 20 views' ray count that is at most _MAX_RAY_BATCH: the
    renderer reshapes its batches back into whole views and drops a remainder."""
    rays = TURNTABLE_VIEWS * size * size
    return max(d for d in range(1, min(rays, _MAX_RAY_BATCH) + 1) if rays % d == 0)


def _to_images(views: torch.Tensor) -> list[Image.Image]:
    pixels = (views.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(view) for view in pixels]


def _encode(fmt: str, p: ThreeDParams, frames: list[Image.Image], mesh) -> bytes:
    if fmt == "gif":
        return encode_turntable_gif(frames, p.seconds)
    if fmt == "mp4":
        return encode_video(turntable_video_frames(frames, p.seconds, VIDEO_FPS), VIDEO_FPS, "mp4")
    colors = torch.stack([mesh.vertex_channels[c] for c in "RGB"], dim=1)
    return encode_mesh(
        mesh.verts.float().cpu().numpy(),
        mesh.faces.cpu().numpy(),
        colors.float().cpu().numpy(),
        fmt,
    )

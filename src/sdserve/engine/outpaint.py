"""Outpainting: an inpaint pipeline on a canvas that reaches past the image, the original pixels
pasted back where they were.

Two modes (reference §11.1, families-notes §4):
- walk (era A): one inpaint step per `walk` direction. left/right/up/down shift the current image
  by (dx, dy) and fill the exposed strip; backward shrinks it to the centre and fills the border.
  As a video, the frames between two canvases pan (a crop sliding over both) or zoom.
- canvas (era B): the image scaled to fit a width x height canvas, centred; the padding, plus
  `overlap` pixels into the image on the padded sides, is generated.

A 9-channel inpainting UNet is used when the model has one; a plain model inpaints through the
pipeline's latent-blending path.
"""

from __future__ import annotations

import io
import time
from typing import Literal

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict

from sdserve.engine import editing_models
from sdserve.engine.base import EngineJob, EngineOutput, OutputFile, Runtime, one_by_one
from sdserve.engine.editing_models import Progress, Screening, generators
from sdserve.errors import EngineError
from sdserve.media.images import encode_png
from sdserve.media.video import encode_video

Direction = Literal["left", "right", "up", "down", "backward"]
DIRECTIONS = ("left", "right", "up", "down", "backward")
_FILL = (127, 127, 127)  # what the exposed area holds before it is generated


class OutpaintParams(BaseModel):
    """What an outpaint job asks of the engine (stored on the job)."""

    model_config = ConfigDict(extra="ignore")

    mode: Literal["walk", "canvas"]
    model_id: str
    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    samples: int = 1
    # walk
    walk: list[Direction] = []
    dx: int = 32
    dy: int = 32
    interpolation_steps: int = 60
    as_video: bool = False
    fps: int = 120
    # canvas
    overlap: int = 10
    safety_checker: bool = False
    safety_checker_type: str = "sensitive_content_text"

    @property
    def calls(self) -> int:
        """Inpaint pipeline calls per sample."""
        return len(self.walk) if self.mode == "walk" else 1

    @property
    def frame_count(self) -> int:
        return 1 + len(self.walk) * self.interpolation_steps


# ---- geometry ----------------------------------------------------------------------------------


def walk_step(
    image: Image.Image, direction: Direction, dx: int, dy: int
) -> tuple[Image.Image, Image.Image]:
    """The canvas for one walk step (the image moved or shrunk) and its mask (255: generate)."""
    width, height = image.size
    canvas = Image.new("RGB", (width, height), _FILL)
    mask = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(mask)
    if direction == "backward":
        inner = image.resize((width - 2 * dx, height - 2 * dy), Image.Resampling.LANCZOS)
        canvas.paste(inner, (dx, dy))
        draw.rectangle((dx, dy, width - dx - 1, height - dy - 1), fill=0)
        return canvas, mask
    offset = {"right": (-dx, 0), "left": (dx, 0), "down": (0, -dy), "up": (0, dy)}[direction]
    canvas.paste(image, offset)
    x, y = offset
    draw.rectangle((max(x, 0), max(y, 0), width + min(x, 0) - 1, height + min(y, 0) - 1), fill=0)
    return canvas, mask


def fixed_canvas(
    image: Image.Image, width: int, height: int, overlap: int
) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    """The image scaled to fit `width` x `height`, centred, its mask, and the box it occupies."""
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    fitted = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
    left, top = (width - size[0]) // 2, (height - size[1]) // 2
    canvas = Image.new("RGB", (width, height), _FILL)
    canvas.paste(fitted, (left, top))
    right, bottom = left + size[0], top + size[1]
    # The overlap bites into the image only on the sides that have padding to blend with.
    keep = (
        left + overlap if left > 0 else 0,
        top + overlap if top > 0 else 0,
        right - overlap if right < width else width,
        bottom - overlap if bottom < height else height,
    )
    mask = Image.new("L", (width, height), 255)
    if keep[2] > keep[0] and keep[3] > keep[1]:
        ImageDraw.Draw(mask).rectangle((keep[0], keep[1], keep[2] - 1, keep[3] - 1), fill=0)
    return canvas, mask, (left, top, right, bottom)


def transition(
    before: Image.Image, after: Image.Image, direction: Direction, dx: int, dy: int, count: int
) -> list[Image.Image]:
    """`count` frames from `before` to `after` (the last is `after`): a pan over both canvases for
    a shift, a zoom out of `after` for backward."""
    width, height = after.size
    frames = []
    if direction == "backward":
        for k in range(1, count + 1):
            rest = 1 - k / count
            box = (dx * rest, dy * rest, width - dx * rest, height - dy * rest)
            frames.append(after.resize((width, height), Image.Resampling.BICUBIC, box=box))
        return frames
    horizontal = direction in ("left", "right")
    shift = dx if horizontal else dy
    strip = Image.new("RGB", (width + dx, height) if horizontal else (width, height + dy))
    # Where each canvas lies on the strip: the walk moves the view towards `after`.
    forwards = direction in ("right", "down")
    first, second = (0, shift) if forwards else (shift, 0)
    strip.paste(before, (first, 0) if horizontal else (0, first))
    strip.paste(after, (second, 0) if horizontal else (0, second))
    for k in range(1, count + 1):
        moved = round(shift * k / count)
        at = first + (moved if forwards else -moved)
        box = (at, 0, at + width, height) if horizontal else (0, at, width, at + height)
        frames.append(strip.crop(box))
    return frames


# ---- the engine ---------------------------------------------------------------------------------


class OutpaintEngine:
    """Outpaint jobs: one walk or canvas per sample, each through the model's inpaint pipeline."""

    kinds = ("outpaint",)

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.screening = Screening(runtime.settings.nsfw_threshold)

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        return one_by_one(jobs, self._run)

    def _run(self, job: EngineJob) -> EngineOutput:
        p = OutpaintParams.model_validate(job.params)
        image = Image.open(io.BytesIO(job.inputs.read("image"))).convert("RGB")
        # 1. the model, as its inpaint pipeline
        started = time.perf_counter()
        source = editing_models.resolve(p.model_id, "inpaint", self.runtime.registry, None)
        pipe = editing_models.load(self.runtime, source, "inpaint")
        loaded = time.perf_counter()
        # 2. each sample's walk or canvas, with its own seed
        progress = Progress(job.events.step, p.steps * p.calls * p.samples)
        results: list[list[Image.Image]] = []
        for generator in generators(p.seed, p.samples):
            if p.mode == "walk":
                results.append(self._walk(pipe, p, image, generator, progress))
            else:
                results.append([self._canvas(pipe, p, image, generator, progress)])
        generated = time.perf_counter()
        # 3. the NSFW check (of each sample's final image) and encoding
        finals, flags = self.screening.screen(
            [frames[-1] for frames in results], p.safety_checker, p.safety_checker_type
        )
        files = []
        for frames, final, flagged in zip(results, finals, flags, strict=True):
            if p.as_video:
                shown = [final] * len(frames) if flagged else frames
                files.append(OutputFile(encode_video(shown, p.fps, "mp4"), flagged))
            else:
                files.append(OutputFile(encode_png(final), flagged))
        stages = {
            "model_load": loaded - started,
            "denoise": generated - loaded,
            "encode": time.perf_counter() - generated,
            "batch_size": 1,
        }
        meta = {"frames": p.frame_count} if p.as_video else {}
        return EngineOutput(files, stages, meta)

    def _walk(self, pipe, p: OutpaintParams, image, generator, progress) -> list[Image.Image]:
        """The walk's frames: the start, then per step its transition ending at the new canvas
        (without `as_video`, only the canvases are kept and the last one is the answer)."""
        current = image.resize((p.width, p.height), Image.Resampling.LANCZOS)
        frames = [current]
        for direction in p.walk:
            canvas, mask = walk_step(current, direction, p.dx, p.dy)
            after = self._inpaint(pipe, p, canvas, mask, generator, progress)
            if p.as_video:
                frames += transition(current, after, direction, p.dx, p.dy, p.interpolation_steps)
            else:
                frames.append(after)
            current = after
        return frames

    def _canvas(self, pipe, p: OutpaintParams, image, generator, progress) -> Image.Image:
        canvas, mask, _ = fixed_canvas(image, p.width, p.height, p.overlap)
        return self._inpaint(pipe, p, canvas, mask, generator, progress)

    def _inpaint(self, pipe, p: OutpaintParams, canvas, mask, generator, progress) -> Image.Image:
        """One inpaint call; the unmasked pixels are the canvas's own afterwards (the VAE's round
        trip shifts colours)."""
        out = pipe(
            prompt=p.prompt,
            negative_prompt=p.negative_prompt or None,
            image=canvas,
            mask_image=mask,
            width=p.width,
            height=p.height,
            strength=1.0,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            generator=generator,
            callback_on_step_end=progress.callback(),
        ).images[0]
        if out.size != canvas.size:
            raise EngineError(f"Outpainting made a {out.size} image for a {canvas.size} canvas")
        return Image.composite(out.convert("RGB"), canvas, mask)

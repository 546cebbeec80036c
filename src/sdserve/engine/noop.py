"""An engine with no model (`SDSERVE_ENGINE=noop`): for queue benchmarks and fault tests.

It answers every kind the built-in engines run, after `SDSERVE_NOOP_SECONDS`: image jobs with
flat PNGs of the requested size coloured by the seed, video jobs with a flat clip, trainings and
model jobs with their stages and no weights. Everything around it (queue, storage, webhooks) is
the real thing.
"""

from __future__ import annotations

import time

from PIL import Image

from sdserve.engine.base import EngineJob, EngineOutput, OutputFile
from sdserve.engine.training import SANDBOX_STAGES
from sdserve.errors import EngineError
from sdserve.media.images import encode_png
from sdserve.settings import Settings

_IMAGE_KINDS = ("text2img", "img2img", "inpaint", "controlnet")
_VIDEO_KINDS = ("animatediff", "t2v", "svd")
_TRAINING_KINDS = ("train_lora", "train_dreambooth", "train_sandbox")
_MODEL_KINDS = ("model_load", "model_reload")


class NoopEngine:
    kinds = _IMAGE_KINDS + _VIDEO_KINDS + _TRAINING_KINDS + _MODEL_KINDS

    def __init__(self, settings: Settings):
        self.settings = settings

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        started = time.perf_counter()
        if self.settings.noop_seconds:
            time.sleep(self.settings.noop_seconds)
        outputs = [self._answer(job) for job in jobs]
        seconds = time.perf_counter() - started
        for output in outputs:
            if isinstance(output, EngineOutput):
                output.stages = {"denoise": seconds, "batch_size": len(jobs), **output.stages}
        return outputs

    def _answer(self, job: EngineJob) -> EngineOutput | Exception:
        p = job.params
        steps = int(p.get("steps") or 1)
        job.events.step(steps, steps)
        if job.kind in _IMAGE_KINDS:
            size = (p["width"], p["height"])
            return EngineOutput(
                [
                    OutputFile(encode_png(Image.new("RGB", size, _color(p["seed"] + i))))
                    for i in range(p["samples"])
                ]
            )
        if job.kind in _VIDEO_KINDS:
            from sdserve.media.video import encode_video

            frame = Image.new("RGB", (p["width"], p["height"]), _color(p["seed"]))
            clip = encode_video([frame] * p["num_frames"], p["fps"], p["output_type"])
            return EngineOutput([OutputFile(clip)])
        if job.kind in _TRAINING_KINDS:
            for name, line in SANDBOX_STAGES:
                job.events.stage(name, f"noop engine: {line}")
            return EngineOutput([], meta={"training_id": p.get("training_id")})
        if job.kind in _MODEL_KINDS:
            return EngineOutput([], meta={"model_id": job.model_id})
        return EngineError(f"The no-op engine does not run {job.kind} jobs")


def _color(seed: int) -> tuple[int, int, int]:
    return (seed * 97 % 256, seed * 57 % 256, seed * 31 % 256)

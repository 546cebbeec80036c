"""Video files: H.264 MP4 (yuv420p, faststart) with PyAV, GIF and WebP with Pillow; decoding init videos.

PyAV is the optional `video` extra, imported only when an MP4 is written or a video decoded."""

from __future__ import annotations

import io
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from sdserve.errors import BadImage
from sdserve.extras import require

VIDEO_FORMATS = ("mp4", "gif", "webp")


def encode_video(frames: list[Image.Image], fps: int, fmt: str) -> bytes:
    """Encode RGB frames; the frame count, size and fps of the file match the arguments."""
    if fmt == "mp4":
        return _encode_mp4(frames, fps)
    buffer = io.BytesIO()
    duration_ms = round(1000 / fps)
    frames[0].save(
        buffer,
        format="GIF" if fmt == "gif" else "WEBP",
        save_all=True,
        append_images=frames[1:],
        duration=duration_ms,
        loop=0,
        **({"lossless": False, "quality": 90} if fmt == "webp" else {"disposal": 2}),
    )
    return buffer.getvalue()


def _encode_mp4(frames: list[Image.Image], fps: int) -> bytes:
    # faststart moves the index to the front so browsers can play while downloading; the muxer
    # needs a real file for that second pass.
    with tempfile.TemporaryDirectory(prefix="sdserve-mp4-") as tmp:
        path = Path(tmp) / "out.mp4"
        _write_mp4(path, frames, fps)
        return path.read_bytes()


def _write_mp4(path: Path, frames: list[Image.Image], fps: int) -> None:
    av = require("av", "MP4 output (output_type mp4)")
    with av.open(
        str(path), mode="w", format="mp4", options={"movflags": "+faststart"}
    ) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"  # what browsers decode
        stream.options = {"crf": "18", "preset": "medium"}
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.asarray(image.convert("RGB")), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_video(data: bytes, field: str, max_frames: int) -> list[Image.Image]:
    """RGB frames of a video (any container PyAV reads), at most `max_frames`."""
    av = require("av", "Reading an init video")
    try:
        with av.open(io.BytesIO(data)) as container:
            frames = []
            for frame in container.decode(video=0):
                frames.append(frame.to_image().convert("RGB"))
                if len(frames) >= max_frames:
                    break
    except (av.FFmpegError, ValueError, IndexError):
        raise BadImage(field, f"{field} is not a readable video") from None
    if not frames:
        raise BadImage(field, f"{field} has no video frames")
    return frames

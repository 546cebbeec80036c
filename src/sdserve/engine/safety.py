"""Offline NSFW check with NudeNet's detector, and the replacement images of `safety_checker_type`."""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from sdserve.extras import require

if TYPE_CHECKING:
    from nudenet import NudeDetector

# NudeNet classes that make an image NSFW; covered, face, belly and feet classes do not.
NSFW_CLASSES = frozenset(
    {
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
)
REPLACEMENTS = ("sensitive_content_text", "blur", "pixelate", "black")
SENSITIVE_TEXT = "Sensitive content"
_PIXELATE_CELLS = 16  # blocks along the longer side, whatever the image size

# One detector per process: its ONNX session is read-only after loading and safe to share
# between threads, and loading it is the slow part.
_detector: NudeDetector | None = None
_detector_lock = threading.Lock()


def _get_detector() -> NudeDetector:
    global _detector
    if _detector is None:
        with _detector_lock:
            if _detector is None:
                # Imported here: onnxruntime and OpenCV cost start-up time and memory that a
                # server whose clients never ask for the check need not pay, and NudeNet is
                # an optional extra.
                nudenet = require("nudenet", "The NSFW check (safety_checker)")
                _detector = nudenet.NudeDetector()
    return _detector


class NsfwChecker:
    """Flags an image when NudeNet sees an exposed-nudity class scored above `threshold`.

    NudeNet itself drops detections scored below 0.2, so lower thresholds act as 0.2.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold

    def detections(self, image: Image.Image) -> list[dict[str, Any]]:
        """NudeNet's raw findings: dicts with `class`, `score` and `box`."""
        # NudeNet converts RGBA to BGR and back to RGB itself; RGBA is the layout it expects.
        return _get_detector().detect(np.asarray(image.convert("RGBA")))

    def is_nsfw(self, image: Image.Image) -> bool:
        return flags_nsfw(self.detections(image), self.threshold)


def flags_nsfw(detections: list[dict[str, Any]], threshold: float) -> bool:
    """The flagging rule on NudeNet's findings, separate so it can be tested without explicit images."""
    return any(d["class"] in NSFW_CLASSES and d["score"] > threshold for d in detections)


def replace_nsfw(image: Image.Image, kind: str) -> Image.Image:
    """The RGB image shown instead of a flagged one (`safety_checker_type`), of the same size."""
    image = image.convert("RGB")
    width, height = image.size
    if kind == "blur":
        # Heavy enough that no shape survives at any output size.
        return image.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 10))
    if kind == "pixelate":
        scale = _PIXELATE_CELLS / max(width, height)
        cells = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = image.resize(cells, Image.Resampling.BOX)  # BOX: each cell is its area's mean
        return small.resize((width, height), Image.Resampling.NEAREST)
    if kind == "black":
        return Image.new("RGB", (width, height), (0, 0, 0))
    if kind == "sensitive_content_text":
        return _sensitive_content_card(width, height)
    raise ValueError(f"unknown safety_checker_type {kind!r}; expected one of {REPLACEMENTS}")


def _sensitive_content_card(width: int, height: int) -> Image.Image:
    card = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(card)
    # Size the text to 80% of the width (and at most a fifth of the height) by measuring it at
    # a reference size: Pillow's default font scales linearly.
    left, top, right, bottom = ImageFont.load_default(size=100).getbbox(SENSITIVE_TEXT)
    size = min(80 * width / (right - left), 20 * height / (bottom - top))
    # Below 8 px the glyphs blur into grey; on tiny images a clipped but legible text is better.
    font = ImageFont.load_default(size=max(8, math.floor(size)))
    left, top, right, bottom = draw.textbbox((0, 0), SENSITIVE_TEXT, font=font)
    origin = ((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top)
    draw.text(origin, SENSITIVE_TEXT, fill=(255, 255, 255), font=font)
    return card

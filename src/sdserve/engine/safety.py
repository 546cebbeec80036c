"""NSFW check with NudeNet's detector (its ONNX model ships inside the wheel, so it works offline)."""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# NudeNet classes that make an image NSFW; covered and face classes do not.
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


class NsfwChecker:
    def __init__(self, threshold: float):
        self.threshold = threshold
        self._detector = None
        self._lock = threading.Lock()

    def detections(self, image: Image.Image) -> list[dict]:
        with self._lock:
            if self._detector is None:  # loaded on first use: most servers never need it
                from nudenet import NudeDetector

                self._detector = NudeDetector()
            # NudeNet converts RGBA -> BGR itself, so hand it RGBA.
            return self._detector.detect(np.asarray(image.convert("RGBA")))

    def is_nsfw(self, image: Image.Image) -> bool:
        return flags_nsfw(self.detections(image), self.threshold)


def flags_nsfw(detections: list[dict], threshold: float) -> bool:
    return any(d["class"] in NSFW_CLASSES and d["score"] >= threshold for d in detections)


def replace_nsfw(image: Image.Image, kind: str) -> Image.Image:
    """The image to show instead of a flagged one (`safety_checker_type`), same size."""
    size = image.size
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=max(size) / 12))
    if kind == "pixelate":
        small = image.resize((max(1, size[0] // 32), max(1, size[1] // 32)), Image.BILINEAR)
        return small.resize(size, Image.NEAREST)
    black = Image.new("RGB", size, (0, 0, 0))
    if kind == "black":
        return black
    draw = ImageDraw.Draw(black)
    font = ImageFont.load_default(size=max(10, size[0] // 14))
    text = "Sensitive content"
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    position = ((size[0] - (right - left)) / 2, (size[1] - (bottom - top)) / 2)
    draw.text(position, text, fill=(255, 255, 255), font=font)
    return black

"""The offline NSFW detector, its flagging rule, and the replacements of `safety_checker_type`."""

from __future__ import annotations

import threading
import time

import nudenet
import numpy as np
import pytest
from PIL import Image

from sdserve.engine import safety
from sdserve.engine.safety import REPLACEMENTS, NsfwChecker, flags_nsfw, replace_nsfw


def gradient(size=(96, 64)) -> Image.Image:
    """Red rises left to right, blue top to bottom: a harmless, smoothly varying picture."""
    y, x = np.indices((size[1], size[0]))
    red = x * 255 // max(1, size[0] - 1)
    blue = y * 255 // max(1, size[1] - 1)
    return Image.fromarray(np.stack([red, np.full_like(red, 90), blue], axis=-1).astype(np.uint8))


def checkerboard(size=(96, 64), cell=4) -> Image.Image:
    y, x = np.indices((size[1], size[0]))
    return Image.fromarray((((x // cell + y // cell) % 2) * 255).astype(np.uint8)).convert("RGB")


def test_nudenet_detector_runs_offline():
    detections = nudenet.NudeDetector().detect(np.asarray(gradient().convert("RGBA")))
    assert isinstance(detections, list)


def test_checker_passes_harmless_images():
    checker = NsfwChecker(threshold=0.5)
    for image in (gradient(), gradient((512, 512)), checkerboard(), Image.new("L", (64, 64), 128)):
        assert isinstance(checker.detections(image), list)
        assert checker.is_nsfw(image) is False


def test_flagging_rule():
    def found(cls, score):
        return [{"class": cls, "score": score, "box": [0, 0, 1, 1]}]

    for cls in sorted(safety.NSFW_CLASSES):
        assert flags_nsfw(found(cls, 0.8), 0.5), cls
        assert not flags_nsfw(found(cls, 0.8), 0.9), cls
        assert not flags_nsfw(found(cls, 0.5), 0.5), cls  # "above" the threshold
    for cls in ("FEMALE_BREAST_COVERED", "FACE_FEMALE", "BELLY_EXPOSED", "MALE_BREAST_EXPOSED"):
        assert not flags_nsfw(found(cls, 0.99), 0.5), cls
    assert not flags_nsfw([], 0.0)
    assert flags_nsfw(found("FEET_EXPOSED", 0.9) + found("ANUS_EXPOSED", 0.6), 0.5)


class _FakeDetector:
    def __init__(self, result):
        self.result = result
        self.seen = []

    def detect(self, array):
        self.seen.append(array)
        return self.result


def test_checker_applies_the_rule_to_the_detectors_findings(monkeypatch):
    fake = _FakeDetector([{"class": "BUTTOCKS_EXPOSED", "score": 0.7, "box": [1, 2, 3, 4]}])
    monkeypatch.setattr(safety, "_detector", fake)
    assert NsfwChecker(0.5).is_nsfw(gradient()) is True
    assert NsfwChecker(0.75).is_nsfw(gradient()) is False
    # NudeNet is handed what it expects: height x width x RGBA, uint8.
    assert fake.seen[0].shape == (64, 96, 4) and fake.seen[0].dtype == np.uint8


def test_detector_is_loaded_once_across_threads(monkeypatch):
    created = []

    class SlowDetector(_FakeDetector):
        def __init__(self):
            time.sleep(0.05)  # widen the race window
            created.append(self)
            super().__init__([])

    monkeypatch.setattr(safety, "_detector", None)
    monkeypatch.setattr(nudenet, "NudeDetector", SlowDetector)
    checker = NsfwChecker(0.5)
    threads = [threading.Thread(target=checker.is_nsfw, args=(gradient(),)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(created) == 1 and len(created[0].seen) == 8


def pattern(size) -> Image.Image:
    # Sharp detail everywhere, and no two blocks with the same mean.
    return Image.blend(checkerboard(size), gradient(size), 0.5)


@pytest.mark.parametrize("size", [(96, 64), (512, 512), (64, 300)])
@pytest.mark.parametrize("kind", REPLACEMENTS)
def test_replacements_keep_size_and_hide_the_image(kind, size):
    original = pattern(size)
    replaced = replace_nsfw(original, kind)
    assert replaced.size == original.size and replaced.mode == "RGB"
    pixels = np.asarray(replaced, dtype=np.int16)
    assert np.abs(pixels - np.asarray(original, dtype=np.int16)).mean() > 20
    if kind == "black":
        assert pixels.max() == 0
    if kind == "sensitive_content_text":
        white = (pixels > 200).all(axis=-1)
        assert white.any() and (pixels == 0).all(axis=-1).mean() > 0.5  # white text on black
        rows, cols = np.nonzero(white)
        # centered: the text's middle is near the image's middle
        assert abs((rows.min() + rows.max()) / 2 - size[1] / 2) < size[1] * 0.1 + 2
        assert abs((cols.min() + cols.max()) / 2 - size[0] / 2) < size[0] * 0.1 + 2
    if kind == "pixelate":
        # blocky: colour changes between neighbours only at a few block edges
        for axis in (0, 1):
            edges = np.any(np.diff(pixels, axis=axis) != 0, axis=(1 - axis, 2))
            assert 0 < edges.sum() <= 16, (axis, edges.sum())
    if kind == "blur":
        # the checkerboard's sharp detail is gone
        assert _detail(replaced) < 0.1 * _detail(original)


@pytest.mark.parametrize("kind", REPLACEMENTS)
def _detail(image: Image.Image) -> float:
    pixels = np.asarray(image, dtype=np.int16)
    return float(np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean())


@pytest.mark.parametrize("kind", REPLACEMENTS)
def test_replacements_of_degenerate_sizes(kind):
    for size in ((1, 1), (7, 3), (2000, 9)):
        assert replace_nsfw(gradient(size), kind).size == size


def test_replacement_of_an_rgba_image_and_an_unknown_kind():
    rgba = checkerboard().convert("RGBA")
    assert replace_nsfw(rgba, "blur").mode == "RGB"
    with pytest.raises(ValueError, match="sparkles"):
        replace_nsfw(rgba, "sparkles")


def test_server_checks_outputs_when_asked(server, user_key):
    body = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": "a vase",
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "safety_checker": "yes",
        "safety_checker_type": "blur",
    }
    data = server.post("/api/v6/images/text2img", body).json()
    assert data["status"] == "success", data
    assert data["nsfw_content_detected"] is False
    assert data["meta"]["safetychecker"] == "yes" and data["meta"]["safety_checker_type"] == "blur"

"""The offline NSFW detector and the replacements of `safety_checker_type`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdserve.engine.safety import REPLACEMENTS, NsfwChecker, flags_nsfw, replace_nsfw


def gradient(size=(96, 64)) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    rgb = np.stack([np.tile(x, (size[1], 1))] * 3, axis=-1)
    return Image.fromarray(rgb)


def test_detector_runs_offline_and_passes_a_harmless_image():
    checker = NsfwChecker(threshold=0.5)
    assert isinstance(checker.detections(gradient()), list)
    assert checker.is_nsfw(gradient()) is False


def test_flagging_rule():
    exposed = [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.8, "box": [0, 0, 1, 1]}]
    covered = [{"class": "FEMALE_BREAST_COVERED", "score": 0.99, "box": [0, 0, 1, 1]}]
    assert flags_nsfw(exposed, 0.5)
    assert not flags_nsfw(exposed, 0.9)
    assert not flags_nsfw(covered, 0.5)
    assert not flags_nsfw([], 0.0)


def checkerboard(size=(96, 64), cell=4) -> Image.Image:
    y, x = np.indices((size[1], size[0]))
    return Image.fromarray((((x // cell + y // cell) % 2) * 255).astype(np.uint8)).convert("RGB")


@pytest.mark.parametrize("kind", REPLACEMENTS)
def test_replacements_keep_size_and_hide_the_image(kind):
    original = checkerboard()
    replaced = replace_nsfw(original, kind)
    assert replaced.size == original.size
    pixels = np.asarray(replaced.convert("RGB"), dtype=np.int16)
    assert np.abs(pixels - np.asarray(original, dtype=np.int16)).mean() > 5
    if kind == "black":
        assert pixels.max() == 0
    if kind == "sensitive_content_text":
        assert pixels.max() > 200 and (pixels == 0).mean() > 0.5  # light text on black
    if kind == "pixelate":
        assert len(np.unique(pixels[:, :, 0])) <= (96 // 32) * (64 // 32)  # one colour a block


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

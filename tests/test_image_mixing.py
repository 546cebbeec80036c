"""blip_diffusion, magic_mix, img_mixer and mixture_canvas through the server: every verb on every
prefix on its tiny model, outputs decoded back, the knobs of the reimplementations really acting,
and bad input answered with a clear error before any job exists."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from conftest import ADMIN_KEY
from PIL import Image

SIZE = 64


def picture(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A gradient with a bright square: structure for the models to see."""
    rng = np.random.default_rng(seed)
    w, h = size
    array = np.zeros((h, w, 3), np.uint8)
    array[..., seed % 3] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
    array[y : y + h // 2, x : x + w // 2] = rng.integers(0, 256, 3)
    return Image.fromarray(array)


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pixels(url: str) -> np.ndarray:
    response = httpx.get(url, timeout=60)
    assert response.status_code == 200, url
    data = response.content
    if url.endswith(".base64"):
        data = base64.b64decode(data)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")).astype(np.float64)


BODIES = {
    "blip_diffusion": {
        "prompt": "on a beach",
        "condition_image": data_url(picture(1)),
        "condition_subject": "dog",
        "target_subject": "dog",
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
    },
    "magic_mix": {
        "prompt": "a cat",
        "image": data_url(picture(2)),
        "width": SIZE,
        "height": SIZE,
        "steps": 4,
    },
    "img_mixer": {
        "prompt": "a cat",
        "init_image": [data_url(picture(3)), data_url(picture(4))],
        "init_image_weights": "0.5,0.7",
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
    },
    "mixture_canvas": {  # the hosted API's reading: `width` is the canvas height
        "prompt": "a cat",
        "image": data_url(picture(5)),
        "width": 2 * SIZE,
        "height": SIZE,
        "pos_x1": 0,
        "pos_x2": 32,
        "pos_y1": 64,
        "pos_y2": 128,
        "steps": 2,
    },
}
# (width, height) of the output images
OUTPUT_SIZE = {verb: (SIZE, SIZE) for verb in BODIES} | {"mixture_canvas": (SIZE, 2 * SIZE)}
PREFIXES = [
    ("/api/v5/{verb}", "/api/v5/fetch/{id}"),
    ("/api/v6/image_editing/{verb}", "/api/v6/image_editing/fetch/{id}"),
    ("/api/v1/image_editing/{verb}", "/api/v1/image_editing/fetch/{id}"),
    ("/api/v1/enterprise/image_editing/{verb}", "/api/v1/enterprise/image_editing/fetch/{id}"),
]


def submit(server, path: str, body: dict, key: str) -> dict:
    return server.post(path, {"key": key, **body}).json()


def succeeded(server, path: str, body: dict, key: str) -> dict:
    answer = submit(server, path, body, key)
    assert answer["status"] == "success", answer
    assert isinstance(answer["output"], list)
    return answer


@pytest.mark.parametrize("verb", list(BODIES))
@pytest.mark.parametrize("path,fetch_path", PREFIXES, ids=["v5", "v6", "v1", "enterprise"])
def test_every_verb_answers_on_every_prefix(server, user_key, verb, path, fetch_path):
    key = ADMIN_KEY if "enterprise" in path else user_key
    answer = succeeded(server, path.format(verb=verb), BODIES[verb], key)
    [url] = answer["output"]
    assert pixels(url).shape[1::-1] == OUTPUT_SIZE[verb]
    again = server.post(fetch_path.format(id=answer["id"]), {"key": key}).json()
    assert again["status"] == "success" and again["output"] == answer["output"]


def test_img_mixer_answers_on_v3_too(server, user_key):
    answer = succeeded(server, "/api/v3/img_mixer", BODIES["img_mixer"], user_key)
    assert len(answer["output"]) == 1
    assert answer["meta"]["init_image"] == "base64,base64"
    assert answer["meta"]["init_image_weights"] == "0.5,0.7"


def test_enterprise_paths_need_the_admin_key(server, user_key):
    answer = submit(
        server, "/api/v1/enterprise/image_editing/magic_mix", BODIES["magic_mix"], user_key
    )
    assert answer["status"] == "error" and answer["message"] == "Invalid Api Key"


def test_samples_base64_and_a_webhook(server, user_key, webhook_receiver):
    body = {**BODIES["magic_mix"], "samples": 2, "base64": True, "temp": True, "seed": 11}
    body |= {"webhook": webhook_receiver.url, "track_id": "mix-1"}
    answer = succeeded(server, "/api/v5/magic_mix", body, user_key)
    assert len(answer["output"]) == 2 and all("/temp/" in url for url in answer["output"])
    both = [pixels(url) for url in answer["output"]]
    assert all(image.shape == (SIZE, SIZE, 3) for image in both)
    [payload] = webhook_receiver.wait_for(1)
    assert payload["id"] == answer["id"] and payload["track_id"] == "mix-1"
    # the same seed alone gives the first sample's pixels
    alone = succeeded(server, "/api/v5/magic_mix", {**BODIES["magic_mix"], "seed": 11}, user_key)
    assert np.abs(pixels(alone["output"][0]) - both[0]).max() <= 2


# ---- the knobs act ------------------------------------------------------------------------------


def run(server, user_key, verb: str, **change) -> np.ndarray:
    answer = succeeded(
        server, f"/api/v6/image_editing/{verb}", {**BODIES[verb], "seed": 7, **change}, user_key
    )
    return pixels(answer["output"][0])


def test_magic_mix_kmin_kmax_and_mix_factor_change_the_output(server, user_key):
    # 8 steps: from step 4, layout mixed in at step 5; or from step 1, layout mixed in to the end
    base = run(server, user_key, "magic_mix", steps=8)
    wider = run(server, user_key, "magic_mix", steps=8, kmin=0.1, kmax=0.9)
    mixed = run(server, user_key, "magic_mix", steps=8, mix_factor=0.9)
    assert np.abs(wider - base).mean() > 5
    assert np.abs(mixed - base).mean() > 5
    # the layout image matters: another image, another result
    other = run(server, user_key, "magic_mix", steps=8, image=data_url(picture(9)))
    assert np.abs(other - base).mean() > 5


def test_magic_mix_runs_on_an_sdxl_model(server, user_key):
    assert run(server, user_key, "magic_mix", model_id="tiny-sdxl").shape == (SIZE, SIZE, 3)


def test_img_mixer_weights_change_the_mix(server, user_key):
    first = run(server, user_key, "img_mixer", init_image_weights="1,0.1")
    second = run(server, user_key, "img_mixer", init_image_weights="0.1,1")
    assert np.abs(first - second).mean() > 2
    # a comma-separated string of data URLs is split where each image starts
    joined = ",".join(BODIES["img_mixer"]["init_image"])
    again = run(server, user_key, "img_mixer", init_image=joined, init_image_weights="1,0.1")
    assert np.abs(again - first).max() <= 2


def test_mixture_canvas_region_follows_the_source_where_asked(server, user_key):
    """At low strength the source image steers the region: two sources differ most where the
    region is, and the difference moves with it. At strength 1 the source plays no part."""
    canvas = {"width": SIZE, "height": 3 * SIZE, "pos_y1": 0, "pos_y2": SIZE, "steps": 4}
    sources = data_url(picture(5)), data_url(Image.fromarray(255 - np.asarray(picture(5))))

    def difference(**region) -> np.ndarray:
        a, b = (
            run(server, user_key, "mixture_canvas", image=s, **canvas, **region) for s in sources
        )
        return np.abs(a - b).mean(axis=(0, 2))  # per column

    right = difference(pos_x1=128, pos_x2=192, strength=0.1)
    left = difference(pos_x1=0, pos_x2=64, strength=0.1)
    assert right[128:].mean() > 1.5 * right[:64].mean()
    assert left[:64].mean() > 1.5 * left[128:].mean()
    assert right[128:].mean() > 1.5 * left[128:].mean()  # the difference moves with the region
    assert left[:64].mean() > 1.5 * right[:64].mean()
    assert difference(pos_x1=128, pos_x2=192, strength=1).max() == 0


def test_blip_diffusion_reference_and_controlnet_hint_both_matter(server, user_key):
    one = run(server, user_key, "blip_diffusion")
    other = run(server, user_key, "blip_diffusion", condition_image=data_url(picture(8)))
    assert np.abs(one - other).mean() > 1
    task = {
        "task": "controlnet_generation",
        "style_image": data_url(picture(6)),
        "style_subject": "flower",
        "controlnet_condition_image": data_url(picture(7)),
    }
    answer = succeeded(
        server, "/api/v5/blip_diffusion", {**BODIES["blip_diffusion"], **task, "seed": 7}, user_key
    )
    meta = answer["meta"]
    assert (
        meta["sub_task"] == "controlnet_generation" and meta["source_subject_category"] == "flower"
    )
    hinted = pixels(answer["output"][0])
    assert hinted.shape == (SIZE, SIZE, 3)
    task["controlnet_condition_image"] = data_url(picture(9))
    assert np.abs(run(server, user_key, "blip_diffusion", **task) - hinted).mean() > 1


# ---- bad input -----------------------------------------------------------------------------------

BAD_INPUT = [
    ("magic_mix", {"image": None}, "The image field is required."),
    ("magic_mix", {"image": "bm90IGFuIGltYWdl"}, "image is not a valid image"),
    ("magic_mix", {"kmin": 0.6, "kmax": 0.4}, "The kmin may not be greater than kmax."),
    ("magic_mix", {"kmax": 1.5}, "The kmax must be between 0 and 1."),
    ("magic_mix", {"mix_factor": -0.1}, "The mix factor must be between 0 and 1."),
    ("magic_mix", {"width": 16}, "The width must be between 64"),
    ("magic_mix", {"prompt": ""}, "The prompt field is required."),
    ("magic_mix", {"model_id": "tiny-t2v"}, "is a video model"),
    ("magic_mix", {"guidance_scale": 40}, "The guidance scale must be between 1 and 20."),
    ("img_mixer", {"init_image": None}, "Send between 1 and 4 images in init_image."),
    ("img_mixer", {"init_image_weights": "0.5"}, "Send one weight per image: 2 images, 1 weights."),
    ("img_mixer", {"init_image_weights": "0.5,1.5"}, "between 0 and 1"),
    ("img_mixer", {"init_image_weights": "0,0"}, "one at least above 0"),
    ("img_mixer", {"init_image": [data_url(picture(1))] * 5}, "Send between 1 and 4 images"),
    ("img_mixer", {"model_id": "tiny-sdxl"}, "sdxl_models"),
    ("img_mixer", {"model_id": "lambdalabs/image-mixer"}, "mixed with an IP-Adapter"),
    ("mixture_canvas", {"strength": 1.5}, "The strength must be between 0 and 1."),
    ("mixture_canvas", {"pos_y2": 256}, "must lie within the canvas height"),
    ("mixture_canvas", {"pos_x1": 12}, "The pos_x1 must be a multiple of 8."),
    ("mixture_canvas", {"image": None}, "The image field is required."),
    ("blip_diffusion", {"condition_image": None}, "The condition image field is required."),
    ("blip_diffusion", {"condition_subject": None}, "The condition subject field is required."),
    ("blip_diffusion", {"task": "paint"}, "The task must be one of"),
    (
        "blip_diffusion",
        {"task": "controlnet_generation", "style_subject": "dog"},
        "controlnet condition image",
    ),
    ("blip_diffusion", {"width": 16}, "The width must be between 64"),
    ("blip_diffusion", {"model_id": "blip-diffusion"}, "Salesforce/blipdiffusion"),
    ("blip_diffusion", {"model_id": "no-such-blip"}, "Model not found"),
    ("blip_diffusion", {"model_id": "../tiny-sd"}, "The model_id is not a valid id."),
]


@pytest.mark.parametrize("verb,change,text", BAD_INPUT)
def test_bad_input_is_a_clear_error(server, user_key, verb, change, text):
    body = {key: value for key, value in {**BODIES[verb], **change}.items() if value is not None}
    answer = submit(server, f"/api/v5/{verb}", body, user_key)
    assert answer["status"] == "error", answer
    assert text in answer["message"], answer["message"]
    assert "id" not in answer  # refused before a job existed

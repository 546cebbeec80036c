"""Video endpoints through a real server: decoded MP4 / GIF / WebP files, long clips, v2v, bad input."""

from __future__ import annotations

import base64
import io
import signal
import time

import av
import httpx
import numpy as np
import pytest
from conftest import ADMIN_KEY, ServerProcess, create_key, png_bytes, start_worker
from PIL import Image

from sdserve.media.video import encode_video

SMALL = {"width": 80, "height": 64, "num_inference_steps": 2}
INIT = base64.b64encode(png_bytes((80, 64), (40, 120, 200))).decode()


def read_mp4(url: str) -> tuple[str, str, float, list[np.ndarray], tuple[int, int]]:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    assert response.content[4:8] == b"ftyp" and b"moov" in response.content[:200]  # faststart
    with av.open(io.BytesIO(response.content)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        ctx = stream.codec_context
        return ctx.name, ctx.pix_fmt, float(stream.average_rate), frames, (ctx.width, ctx.height)


def test_v4_text2video_round_trip_and_meta(server, user_key):
    body = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": "a fox running",
        **SMALL,
        "num_frames": 12,
        "fps": 6,
        "seed": 5,
        "strength": 0.55,
    }
    data = server.post("/api/v4/dreambooth/text2video", body).json()
    assert data["status"] == "success", data
    assert "/video_generations/" in data["output"][0] and data["output"][0].endswith(".mp4")
    codec, pix_fmt, fps, frames, size = read_mp4(data["output"][0])
    assert (codec, pix_fmt, fps, len(frames), size) == ("h264", "yuv420p", 6.0, 12, (80, 64))
    meta = data["meta"]
    for key in (
        "W",
        "H",
        "steps",
        "strength",
        "seconds",
        "num_frames",
        "file_prefix",
        "full_url",
        "multi_lingual",
        "outdir",
        "safetychecker",
        "seed",
        "model_id",
        "scheduler",
    ):
        assert key in meta, key
    assert (meta["W"], meta["H"], meta["num_frames"], meta["seconds"]) == (80, 64, 12, 2)
    assert meta["strength"] == 0.55
    assert meta["file_prefix"] in data["output"][0]


def test_processing_points_at_the_dreambooth_fetch(server, user_key):
    body = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": "a fox",
        **SMALL,
        "num_frames": 8,
        "instant_response": "yes",
    }
    data = server.post("/api/v4/dreambooth/text2video", body).json()
    assert data["status"] == "processing"
    assert data["fetch_result"] == f"{server.url}/api/v3/dreambooth/fetch/{data['id']}"
    assert data["future_links"][0].endswith(f"/video_generations/{data['meta']['file_prefix']}.mp4")
    for _ in range(300):
        fetched = httpx.post(data["fetch_result"], json={"key": user_key}).json()
        if fetched["status"] == "success":
            break
        time.sleep(0.1)
    assert fetched["output"] == data["future_links"]


def test_seconds_times_fps_and_long_clip_beyond_adapter_context(server, user_key):
    body = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": "waves",
        **SMALL,
        "seconds": 5,
        "fps": 8,
    }
    data = server.post("/api/v4/dreambooth/text2video", body).json()
    assert data["status"] == "success", data
    _, _, fps, frames, _ = read_mp4(data["output"][0])
    assert (fps, len(frames), data["meta"]["num_frames"]) == (8.0, 40, 40)  # 40 > 16-frame context


def test_same_seed_same_frames(server, user_key):
    body = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": "a fox",
        **SMALL,
        "num_frames": 8,
        "seed": 11,
        "output_type": "gif",
    }

    def frames(seed):
        url = server.post("/api/v4/dreambooth/text2video", {**body, "seed": seed}).json()["output"][
            0
        ]
        image = Image.open(io.BytesIO(httpx.get(url).content))
        out = []
        for index in range(image.n_frames):
            image.seek(index)
            out.append(np.asarray(image.convert("RGB"), dtype=np.int16))
        return np.stack(out)

    a, b, c = frames(11), frames(11), frames(12)
    assert a.shape == (8, 64, 80, 3)
    assert np.abs(a - b).max() <= 1 and np.abs(a - c).max() > 1


@pytest.mark.parametrize("fmt,pil_format", [("gif", "GIF"), ("webp", "WEBP")])
def test_gif_and_webp(server, user_key, fmt, pil_format):
    body = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": "a fox",
        **SMALL,
        "num_frames": 6,
        "output_type": fmt,
    }
    data = server.post("/api/v6/video/text2video", body).json()
    assert data["output"][0].endswith("." + fmt)
    image = Image.open(io.BytesIO(httpx.get(data["output"][0]).content))
    assert (image.format, image.n_frames, image.size) == (pil_format, 6, (80, 64))
    assert data["meta"]["output_type"] == fmt and data["meta"]["fps"] == 7


def test_v5_text2video_unet_model(server, user_key):
    data = server.post(
        "/api/v5/text2video", {"key": user_key, "prompt": "a fox", **SMALL, "seconds": 2}
    ).json()
    assert data["status"] == "success", data
    codec, _, fps, frames, size = read_mp4(data["output"][0])
    assert (codec, fps, len(frames), size) == ("h264", 8.0, 16, (80, 64))
    assert data["meta"]["model_id"] == "tiny-t2v" and data["meta"]["seconds"] == 2


def test_v6_text2video_with_a_text_to_video_model(server, user_key):
    body = {"key": user_key, "model_id": "tiny-t2v", "prompt": "a fox", **SMALL, "num_frames": 5}
    data = server.post("/api/v6/video/text2video", body).json()
    assert data["status"] == "success", data
    assert len(read_mp4(data["output"][0])[3]) == 5


def test_img2video_svd(server, user_key):
    body = {
        "key": user_key,
        "init_image": INIT,
        **SMALL,
        "num_frames": 6,
        "fps": 5,
        "motion_bucket_id": 60,
    }
    data = server.post("/api/v6/video/img2video", body).json()
    assert data["status"] == "success", data
    codec, _, fps, frames, size = read_mp4(data["output"][0])
    assert (codec, fps, len(frames), size) == ("h264", 5.0, 6, (80, 64))
    assert data["meta"]["motion_bucket_id"] == 60
    fetched = server.post(f"/api/v6/video/fetch/{data['id']}", {"key": user_key}).json()
    assert fetched["output"] == data["output"]


def test_video_to_video_from_init_image_and_init_video(server, user_key):
    base = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": "a fox",
        **SMALL,
        "num_frames": 8,
        "seed": 3,
    }
    plain = server.post("/api/v4/dreambooth/text2video", base).json()
    from_image = server.post(
        "/api/v4/dreambooth/text2video", {**base, "init_image": INIT, "strength": 0.6}
    ).json()
    clip = encode_video([Image.new("RGB", (80, 64), (i * 20, 50, 90)) for i in range(10)], 8, "mp4")
    from_video = server.post(
        "/api/v4/dreambooth/text2video",
        {
            **base,
            "init_video": "data:video/mp4;base64," + base64.b64encode(clip).decode(),
            "strength": 0.6,
        },
    ).json()
    results = [read_mp4(d["output"][0])[3] for d in (plain, from_image, from_video)]
    assert all(len(frames) == 8 for frames in results)
    assert np.abs(np.stack(results[0]).astype(int) - np.stack(results[1])).max() > 2
    assert from_image["meta"]["strength"] == 0.6


def test_improved_sampling_and_base64(server, user_key):
    body = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": "a fox",
        **SMALL,
        "num_frames": 6,
        "use_improved_sampling": True,
        "base64": True,
    }
    data = server.post("/api/v6/video/text2video", body).json()
    assert data["status"] == "success", data
    assert data["output"][0].endswith(".base64")
    mp4 = base64.b64decode(httpx.get(data["output"][0]).text)
    with av.open(io.BytesIO(mp4)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 6


@pytest.mark.parametrize(
    "change,field,fragment",
    [
        ({"model_id": "tiny-sdxl"}, "model_id", "SD1.5"),
        ({"num_frames": 0}, "num_frames", "between 1 and 10000; above 64 it is reduced to 64"),
        ({"num_frames": 10**5}, "num_frames", "between 1 and 10000"),
        ({"num_frames": None, "seconds": 5000, "fps": 8}, "num_frames", "between 1 and 10000"),
        ({"output_type": "avi"}, "output_type", "mp4, gif, webp"),
        ({"prompt": ""}, "prompt", "required"),
    ],
)
def test_bad_video_requests(server, user_key, change, field, fragment):
    body = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": "a fox",
        **SMALL,
        "num_frames": 8,
        **change,
    }
    data = server.post("/api/v4/dreambooth/text2video", body).json()
    assert data["status"] == "error", data
    assert field in data["messege"] and fragment in data["message"]


def test_unreadable_init_image_and_video(server, user_key):
    body = {"key": user_key, "model_id": "tiny-sd", "prompt": "a fox", **SMALL, "num_frames": 8}
    bad_image = base64.b64encode(b"definitely not a picture").decode()
    data = server.post("/api/v4/dreambooth/text2video", {**body, "init_image": bad_image}).json()
    assert data["status"] == "error" and "init_image is not a valid image" in data["message"]
    data = server.post("/api/v4/dreambooth/text2video", {**body, "init_video": bad_image}).json()
    assert data["status"] == "error" and "init_video is not a readable video" in data["message"]
    data = server.post("/api/v6/video/img2video", {"key": user_key, **SMALL}).json()
    assert data["status"] == "error" and "init_image" in data["messege"]


def test_enterprise_video_needs_the_enterprise_key(server, user_key):
    body = {"model_id": "tiny-sd", "prompt": "a fox", **SMALL, "num_frames": 6}
    denied = server.post("/api/v1/enterprise/video/text2video", {"key": user_key, **body}).json()
    assert denied["status"] == "error" and denied["message"] == "Invalid Api Key"
    data = server.post("/api/v1/enterprise/video/text2video", {"key": ADMIN_KEY, **body}).json()
    assert data["status"] == "success", data
    fetched = server.post(f"/api/v1/enterprise/video/fetch/{data['id']}", {"key": ADMIN_KEY}).json()
    assert fetched["output"] == data["output"]


def test_killed_worker_mid_video_is_finished_by_another(tmp_path):
    lease = {"SDSERVE_LEASE_SECONDS": "2"}
    api = ServerProcess(tmp_path, SDSERVE_IN_PROCESS_WORKER="0", **lease).start()
    key = create_key(tmp_path)
    body = {
        "key": key,
        "model_id": "tiny-sd",
        "prompt": "slow",
        "width": 256,
        "height": 256,
        "num_inference_steps": 30,
        "num_frames": 16,
        "instant_response": True,
    }
    job_id = api.post("/api/v4/dreambooth/text2video", body).json()["id"]

    def worker():
        return start_worker(tmp_path, **lease)

    doomed = worker()
    rescuer = None
    try:
        for _ in range(600):
            data = api.post(f"/api/v3/dreambooth/fetch/{job_id}", {"key": key}).json()
            if data.get("progress", {}).get("step", 0) > 0:
                break
            time.sleep(0.1)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        rescuer = worker()
        for _ in range(1800):
            data = api.post(f"/api/v3/dreambooth/fetch/{job_id}", {"key": key}).json()
            if data["status"] != "processing":
                break
            time.sleep(0.1)
        assert data["status"] == "success", data
        assert len(read_mp4(data["output"][0])[3]) == 16
    finally:
        for proc in (doomed, rescuer):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
        api.stop()


def test_text2video_from_a_single_file_checkpoint(server, user_key, tiny_models_dir):
    import json

    from diffusers import StableDiffusionPipeline

    from sdserve.engine.checkpoints import export_single_file

    checkpoint = server.data_dir / "imported" / "my-anime.safetensors"
    export_single_file(
        StableDiffusionPipeline.from_pretrained(tiny_models_dir / "tiny-sd"), checkpoint
    )
    catalogue_path = server.data_dir / "models.json"
    catalogue = json.loads(catalogue_path.read_text()) if catalogue_path.exists() else {}
    catalogue["my-anime"] = {"source": str(checkpoint), "config": str(tiny_models_dir / "tiny-sd")}
    catalogue_path.write_text(json.dumps(catalogue))

    body = {"key": user_key, "prompt": "a fox", **SMALL, "num_frames": 8, "seed": 21}
    imported = server.post("/api/v4/dreambooth/text2video", {**body, "model_id": "my-anime"}).json()
    assert imported["status"] == "success", imported
    builtin = server.post("/api/v4/dreambooth/text2video", {**body, "model_id": "tiny-sd"}).json()
    reseeded = server.post(
        "/api/v4/dreambooth/text2video", {**body, "model_id": "tiny-sd", "seed": 22}
    ).json()
    a, b, c = (
        np.stack(read_mp4(d["output"][0])[3]).astype(int) for d in (imported, builtin, reseeded)
    )
    assert a.shape == (8, 64, 80, 3)
    # Same weights, same seed: the same clip up to H.264's lossy coding, far closer than a reseed.
    assert np.abs(a - b).mean() < 0.25 * np.abs(b - c).mean()


def test_clip_skip_and_weighting_on_long_clips(server, user_key):
    base = {
        "key": user_key,
        "model_id": "tiny-sd",
        "prompt": "a red fox",
        **SMALL,
        "num_frames": 20,
        "seed": 4,
        "output_type": "gif",
    }

    def clip(**change):
        data = server.post("/api/v4/dreambooth/text2video", {**base, **change}).json()
        assert data["status"] == "success", data
        image = Image.open(io.BytesIO(httpx.get(data["output"][0]).content))
        image.seek(10)
        return np.asarray(image.convert("RGB"), dtype=np.int16)

    plain = clip()
    assert np.abs(plain - clip(clip_skip=2)).max() > 2
    assert np.abs(plain - clip(prompt="a (red:1.8) fox")).max() > 2
    assert np.abs(plain - clip()).max() <= 1

"""What real clients of every era send (reference §16): parameters in the query string, form and
multipart bodies, the v7 paths, and video-to-video as a named endpoint."""

from __future__ import annotations

import io
import time

import av
import httpx
from conftest import ADMIN_KEY, decode_png, png_bytes

from sdserve.media.video import encode_video

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "enhance_prompt": "no"}


def frame_count(url: str) -> int:
    with av.open(io.BytesIO(httpx.get(url, timeout=60).content)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_fields_in_the_query_string_with_an_empty_body(server, user_key):
    response = httpx.post(
        server.url + "/api/v3/text2img?prompt=a%20tractor&width=64&height=64&samples=1"
        "&num_inference_steps=2&enhance_prompt=no",
        headers={"key": user_key},
        timeout=180,
    )
    answer = response.json()
    assert answer["status"] == "success", answer
    assert answer["meta"]["prompt"] == "a tractor" and answer["meta"]["W"] == 64
    assert decode_png(answer["output"][0]).size == (64, 64)


def test_the_body_wins_over_the_query_string(server, user_key):
    answer = server.post(
        "/api/v4/dreambooth?prompt=from%20the%20query&width=128",
        {"key": user_key, "model_id": "tiny-sd", "prompt": "from the body", **SMALL},
    ).json()
    assert answer["meta"]["prompt"] == "from the body" and answer["meta"]["W"] == 64


def test_form_bodies_with_and_without_a_content_type(server, user_key):
    form = f"key={user_key}&model_id=tiny-sd&prompt=a%20barn&width=64&height=64&num_inference_steps=2&enhance_prompt=no"
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {}):
        answer = httpx.post(
            server.url + "/api/v4/dreambooth", content=form, headers=headers, timeout=180
        ).json()
        assert answer["status"] == "success", answer
        assert answer["meta"]["prompt"] == "a barn"


def test_multipart_file_parts_are_images(server, user_key):
    fields = {"key": user_key, "model_id": "tiny-sd", "prompt": "a red barn", **SMALL}
    files = {"init_image": ("barn.png", png_bytes((64, 64), (200, 30, 30)), "image/png")}
    answer = httpx.post(
        server.url + "/api/v4/dreambooth/img2img",
        data={k: str(v) for k, v in fields.items()},
        files=files,
        timeout=180,
    ).json()
    assert answer["status"] == "success", answer
    assert answer["meta"]["init_image"] == "base64"
    assert decode_png(answer["output"][0]).size == (64, 64)
    broken = {"init_image": ("x.png", b"not an image", "image/png")}
    refused = httpx.post(
        server.url + "/api/v4/dreambooth/img2img",
        data={k: str(v) for k, v in fields.items()},
        files=broken,
        timeout=60,
    ).json()
    assert refused["status"] == "error" and "init_image is not a valid image" in refused["message"]


def test_v7_images_answer_output_url_and_fetch_at_their_own_path(server, user_key):
    body = {"key": user_key, "model_id": "tiny-sd", "prompt": "a lighthouse", **SMALL}
    done = server.post("/api/v7/images/text-to-image", body).json()
    assert done["status"] == "success", done
    assert done["output_url"] == done["output"][0]
    assert decode_png(done["output_url"]).size == (64, 64)
    queued = server.post("/api/v7/images/text-to-image", {**body, "instant_response": True}).json()
    assert queued["status"] == "processing"
    assert queued["fetch_result"].endswith(f"/api/v7/images/fetch/{queued['id']}")
    for _ in range(600):
        fetched = httpx.post(queued["fetch_result"], headers={"key": user_key}, timeout=60).json()
        if fetched["status"] == "success":
            break
        time.sleep(0.2)
    assert fetched["output_url"] == fetched["output"][0]
    init = "data:image/png;base64," + __import__("base64").b64encode(png_bytes()).decode()
    edited = server.post("/api/v7/images/image-to-image", {**body, "init_image": init}).json()
    assert edited["status"] == "success" and edited["meta"]["strength"] == 0.7


def test_video_to_video_is_a_named_endpoint_on_v6_v7_and_enterprise(server, user_key):
    clip = encode_video([__import__("PIL.Image").Image.new("RGB", (64, 64), (i * 30, 60, 90))
                         for i in range(6)], 8, "mp4")  # fmt: skip
    init_video = "data:video/mp4;base64," + __import__("base64").b64encode(clip).decode()
    body = {"model_id": "tiny-sd", "prompt": "a fox", **SMALL, "num_frames": 4, "strength": 0.5}
    for path, key in (
        ("/api/v6/video/video2video", user_key),
        ("/api/v7/video-fusion/video-to-video", user_key),
        ("/api/v1/enterprise/video/video2video", ADMIN_KEY),
    ):
        answer = server.post(path, {**body, "key": key, "init_video": init_video}).json()
        assert answer["status"] == "success", (path, answer)
        assert frame_count(answer["output"][0]) == 4
    assert answer["meta"]["strength"] == 0.5
    missing = server.post("/api/v6/video/video2video", {**body, "key": user_key}).json()
    assert missing["status"] == "error"
    assert missing["messege"] == {"init_video": ["The init video field is required."]}
    v7 = server.post("/api/v7/video-fusion/text-to-video", {**body, "key": user_key}).json()
    assert v7["status"] == "success" and v7["output_url"] == v7["output"][0]


# Every path of reference §2 and §16 for the families this server has (new families bring theirs).
PATHS = """
/api/v3/text2img /api/v3/img2img /api/v3/inpaint /api/v3/fetch/1 /api/v3/system_load
/api/v6/realtime/text2img /api/v6/realtime/img2img /api/v6/realtime/inpaint /api/v6/realtime/fetch/1
/api/v3/lora_fine_tune /api/v3/fine_tune_v2 /api/v3/fine_tune /api/v3/fine_tune_status/abcdefghij
/api/v3/finetune_list /api/v3/finetune/delete/abcdefghij /api/v3/cancle_training/abcdefghij
/api/v3/base64_crop /api/v5/text2video /api/v6/video/text2video /api/v6/video/img2video
/api/v6/video/video2video /api/v6/video/fetch/1 /api/v6/base64_to_url /api/v4/dreambooth/text2video
/api/v4/dreambooth /api/v4/dreambooth/img2img /api/v4/dreambooth/inpaint /api/v4/dreambooth/fetch
/api/v3/dreambooth/fetch/1 /api/v6/images/text2img /api/v6/images/img2img /api/v6/images/inpaint
/api/v6/images/fetch /api/v6/images/fetch/1 /api/v4/dreambooth/model_reload /api/v6/images/model_reload
/api/v3/dreambooth /api/v3/dreambooth/img2img /api/v3/dreambooth/inpaint /api/v3/delete_image
/api/v4/dreambooth/model_list /api/v3/model_list /api/v4/model_list /api/v5/clear_cache
/api/v3/dreambooth/buy_model /api/v3/buy_subscription /api/v3/cancel_subscription
/api/v3/nsfw_image_check /api/check_nsfw_cp /api/v3/load_model /api/sandbox/v3/fine_tune
/api/sandbox/v3/fine_tune_status/abcdefghij /api/v5/super_resolution /api/v3/super_resolution
/api/v6/image_editing/super_resolution /api/v1/image_editing/super_resolution
/api/v7/images/text-to-image /api/v7/images/image-to-image /api/v7/images/inpaint
/api/v7/images/fetch/1 /api/v7/video-fusion/text-to-video /api/v7/video-fusion/image-to-video
/api/v7/video-fusion/video-to-video /api/v7/video-fusion/fetch/1 /api/v3/dreambooth/model_list
/api/v3/clear_cache /api/v6/video/system_details /api/v6/video/clear_cache
/api/v1/enterprise/video/video2video /api/v1/enterprise/txt2img/fetch
/api/v1/enterprise/txt2img/upload_image /api/v1/enterprise/txt2img/nsfw_image_check
/api/v1/enterprise/txt2img/super_resolution
""".split()
ENTERPRISE_VERBS = """system_details restart_server update_server update update_s3 clear_cache clear_queue
schedulers_list load_model load_model_v2 verify_model get_all_models delete_model sync_models
load_vae model_file text2img img2img inpaint text2video super_resolution upload_image
nsfw_image_check fetch""".split()


def test_every_known_path_answers(server, user_key):
    products = ["", "txt2img/", "realtime/", "video/", "image_editing/"]
    paths = PATHS + [f"/api/v1/enterprise/{p}{verb}" for p in products for verb in ENTERPRISE_VERBS]
    missing = []
    for path in paths:
        # an ordinary key: admin verbs answer "Invalid Api Key", never run
        response = httpx.post(server.url + path, json={"key": user_key}, timeout=60)
        body = response.json()
        if response.status_code == 404 or (
            isinstance(body, dict) and body.get("message") == "Not found"
        ):
            missing.append(path)
    assert missing == []


def test_one_rule_for_every_bounded_field(tmp_path):
    """Past this server's maximum a value is reduced to it (meta shows it); below the minimum or
    past any sense it is an error that states both bounds. Images and video alike."""
    from conftest import ServerProcess

    api = ServerProcess(tmp_path, SDSERVE_IN_PROCESS_WORKER="0").start()  # meta is all we need
    try:
        image = {"key": ADMIN_KEY, "model_id": "tiny-sd", "prompt": "a cat", "instant_response": 1}
        meta = api.post(
            "/api/v4/dreambooth",
            {**image, "width": 4096, "height": 70, "num_inference_steps": 500, "samples": 9},
        ).json()["meta"]
        assert (meta["W"], meta["H"], meta["steps"], meta["n_samples"]) == (1024, 64, 50, 4)
        clip = {**image, "width": 4096, "num_frames": 65, "fps": 100}
        meta = api.post("/api/v6/video/text2video", clip).json()["meta"]
        assert (meta["W"], meta["num_frames"], meta["fps"]) == (1024, 64, 30)
        for path, field, value, text in (
            ("/api/v4/dreambooth", "width", 100_000, "between 64 and 8192; above 1024"),
            ("/api/v6/video/text2video", "width", 100_000, "between 64 and 8192; above 1024"),
            ("/api/v4/dreambooth", "num_inference_steps", 0, "between 1 and 1000; above 50"),
            ("/api/v6/video/text2video", "num_frames", 0, "between 1 and 10000; above 64"),
        ):
            refused = api.post(path, {**image, field: value}).json()
            assert refused["status"] == "error" and text in refused["messege"][field][0]
    finally:
        api.stop()

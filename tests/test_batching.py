"""Cross-request batching: jobs that share a denoising loop get the pixels they would get alone,
each with its own prompts, seeds, samples and guidance, and one job's failure stays its own."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import ADMIN_KEY, ServerProcess, decode_png, png_bytes, wait_for_job
from PIL import Image

from sdserve.engine.base import Runtime
from sdserve.engine.images import BatchItem, ImageEngine, ImageResult
from sdserve.engine.registry import ModelRegistry
from sdserve.engine.video import VideoEngine, VideoItem, VideoResult
from sdserve.errors import EngineError
from sdserve.jobs.eta import GUESS_MARGIN, MIN_ETA_SECONDS
from sdserve.schemas.images import normalize_image_request, parse_image_request
from sdserve.schemas.video import normalize_video_request, parse_video_request
from sdserve.settings import Settings

RED = Image.open(__import__("io").BytesIO(png_bytes((64, 64), (200, 40, 40))))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.set_num_threads(1)  # the same kernels for every batch size: pixels comparable
    settings = Settings(data_dir=tmp_path_factory.mktemp("batching"))
    return ImageEngine(Runtime.create(settings, ModelRegistry(settings)))


@pytest.fixture
def boom_cannot_be_encoded(monkeypatch):
    """Prompts containing "boom" fail to encode, as a broken prompt would."""
    from sdserve.engine import batching

    original = batching.encode_prompts

    def encode(pipe, prompts, negatives, clip_skip):
        if "boom" in prompts[0]:
            raise ValueError("cannot encode this")
        return original(pipe, prompts, negatives, clip_skip)

    monkeypatch.setattr(batching, "encode_prompts", encode)


def item(engine, kind="text2img", **change) -> BatchItem:
    body = {
        "prompt": "a red fox",
        "width": 64,
        "height": 64,
        "num_inference_steps": 4,
        "safety_checker": "no",
        "enhance_prompt": "no",
        "seed": 1,
        "init_image": "given as an image below",
        "mask_image": "given as an image below",
        **change,
    }
    params = normalize_image_request(
        parse_image_request(body), kind, "community", engine.settings, model_id="tiny-sd"
    )
    return BatchItem(
        params, RED if kind != "text2img" else None, RED.convert("L") if kind == "inpaint" else None
    )


def pixels(result: ImageResult) -> list[np.ndarray]:
    assert isinstance(result, ImageResult), result
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def assert_same(batched: ImageResult, alone: ImageResult) -> None:
    for a, b in zip(pixels(batched), pixels(alone), strict=True):
        assert np.abs(a - b).max() <= 1  # within 1/255


JOBS = [
    {"prompt": "a red fox", "seed": 1, "guidance_scale": 7},
    {"prompt": "a blue whale, ((ocean))", "seed": 22, "guidance_scale": 3, "samples": 2},
    {"prompt": "a castle", "negative_prompt": "fog", "seed": 5, "guidance_scale": 5},
]


@pytest.mark.parametrize("kind", ["text2img", "img2img", "inpaint"])
def test_batched_jobs_match_jobs_run_alone(engine, kind):
    items = [item(engine, kind, **job) for job in JOBS]
    assert len({i.params.batch_key for i in items}) == 1
    batched = engine.generate_batch(items)
    for one, result in zip(items, batched, strict=True):
        assert result.stages["batch_size"] == 3
        assert_same(result, engine.generate_batch([one])[0])
    assert len(batched[1].images) == 2


def test_guidance_is_applied_per_sample(engine):
    weak, strong = item(engine, guidance_scale=2), item(engine, guidance_scale=9)
    batched = engine.generate_batch([weak, strong])
    alone = [engine.generate_batch([weak])[0], engine.generate_batch([strong])[0]]
    assert_same(batched[0], alone[0])
    assert_same(batched[1], alone[1])
    assert np.abs(pixels(alone[0])[0] - pixels(alone[1])[0]).max() > 10


def test_a_failing_job_leaves_the_others_intact(engine, boom_cannot_be_encoded):
    good, bad = item(engine, seed=3), item(engine, prompt="boom", seed=4)
    results = engine.generate_batch([good, bad])
    assert isinstance(results[1], EngineError) and "cannot encode" in results[1].message
    assert_same(results[0], engine.generate_batch([good])[0])


def test_nan_in_one_job_fails_only_that_job(engine):
    vae = engine.pipeline("tiny-sd").vae

    def poison(_module, _args, output):
        output[1:2] = float("nan")  # the second job's sample
        return output

    handle = vae.decoder.register_forward_hook(poison)
    try:
        first, second, third = (item(engine, seed=s) for s in (7, 8, 9))
        results = engine.generate_batch([first, second, third])
    finally:
        handle.remove()
    assert isinstance(results[1], EngineError) and "NaN" in results[1].message
    assert_same(results[0], engine.generate_batch([first])[0])
    assert_same(results[2], engine.generate_batch([third])[0])


def test_out_of_memory_splits_the_batch_and_retries(engine, monkeypatch):
    sizes = []
    original = ImageEngine._call

    def call(self, pipe, items, embeds):
        sizes.append(len(items))
        if len(items) > 1:  # what a GPU does with a batch too big for its memory
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, pipe, items, embeds)

    monkeypatch.setattr(ImageEngine, "_call", call)
    items = [item(engine, seed=s) for s in (11, 12, 13)]
    results = engine.generate_batch(items)
    assert sizes == [3, 1, 2, 1, 1]
    monkeypatch.setattr(ImageEngine, "_call", original)
    for one, result in zip(items, results, strict=True):
        assert_same(result, engine.generate_batch([one])[0])


def clip(engine, model_id="tiny-sd", **change) -> VideoItem:
    body = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 3, **change}
    kind = "t2v" if model_id == "tiny-t2v" else "animatediff"
    params = normalize_video_request(
        parse_video_request({"num_frames": 4, "seed": 1, **body}),
        kind,
        "video",
        engine.settings,
        model_id=model_id,
    )
    return VideoItem(params)


def frames(result: VideoResult) -> np.ndarray:
    assert isinstance(result, VideoResult), result
    return np.stack([np.asarray(frame, dtype=np.int16) for frame in result.frames])


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-t2v"])  # AnimateDiff, text-to-video UNet
def test_batched_clips_match_clips_run_alone(engine, model_id):
    video = VideoEngine(engine.runtime)
    clips = [
        clip(engine, model_id, prompt="a red fox", seed=1, guidance_scale=7),
        clip(engine, model_id, prompt="a blue whale, ((ocean))", seed=22, guidance_scale=3),
        clip(engine, model_id, prompt="a castle", negative_prompt="fog", seed=5),
    ]
    assert len({c.params.batch_key for c in clips}) == 1
    batched = video.generate_batch(clips)
    alone = [video.generate_batch([c])[0] for c in clips]
    for together, single in zip(batched, alone, strict=True):
        assert together.stages["batch_size"] == 3 and single.stages["batch_size"] == 1
        assert len(together.frames) == 4
        assert np.abs(frames(together) - frames(single)).max() <= 1  # within 1/255
    # guidance and prompts really differ per clip
    assert np.abs(frames(alone[0]) - frames(alone[1])).mean() > 1


def test_clips_batch_only_when_they_can_share_a_loop(engine):
    key = clip(engine).params.batch_key
    assert clip(engine, prompt="other", seed=9, guidance_scale=3).params.batch_key == key
    assert clip(engine, num_frames=6).params.batch_key != key
    assert clip(engine, guidance_scale=1).params.batch_key != key  # guidance off
    assert clip(engine, model_id="tiny-t2v").params.batch_key != key
    # a loop of their own: FreeNoise past the adapter window, FreeInit, video-to-video
    solos = [
        clip(engine, num_frames=engine.settings.motion_context_frames + 1),
        clip(engine, use_improved_sampling="yes"),
        clip(engine, init_image="https://example.com/a.png"),
    ]
    for solo in solos:
        twin = solo.params.model_copy(update={"file_prefix": "another"})
        assert solo.params.solo and solo.params.batch_key != twin.batch_key


def test_a_failing_clip_leaves_the_others_intact(engine, boom_cannot_be_encoded):
    video = VideoEngine(engine.runtime)
    good, bad = clip(engine, seed=3), clip(engine, prompt="boom", seed=4)
    results = video.generate_batch([good, bad])
    assert isinstance(results[1], EngineError) and "cannot encode" in results[1].message
    assert results[0].stages["batch_size"] == 1  # the failed clip left the loop
    assert np.abs(frames(results[0]) - frames(video.generate_batch([good])[0])).max() <= 1


def test_out_of_memory_splits_a_batch_of_clips(engine, monkeypatch):
    sizes = []

    def loop(self, pipe, items, embeds):
        sizes.append(len(items))  # no batch fits: even one clip runs out of memory
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(VideoEngine, "_loop", loop)
    results = VideoEngine(engine.runtime).generate_batch([clip(engine, seed=s) for s in (1, 2)])
    assert sizes == [2, 1, 1]
    for result in results:
        assert isinstance(result, EngineError)
        assert result.message == "Out of GPU memory: try a smaller size or fewer frames"


def test_nan_in_one_clip_fails_only_that_clip(engine):
    video = VideoEngine(engine.runtime)
    calls = []

    def poison(_module, _args, output):
        calls.append(1)
        if len(calls) == 2:  # clips are decoded one by one: this is the second clip
            output[:] = float("nan")
        return output

    clips = [clip(engine, seed=s) for s in (7, 8, 9)]
    handle = video.animate_pipeline("tiny-sd").vae.decoder.register_forward_hook(poison)
    try:
        results = video.generate_batch(clips)
    finally:
        handle.remove()
    assert isinstance(results[1], EngineError) and "NaN" in results[1].message
    for index in (0, 2):
        alone = video.generate_batch([clips[index]])[0]
        assert np.abs(frames(results[index]) - frames(alone)).max() <= 1


def test_the_server_batches_concurrent_compatible_jobs(tmp_path):
    server = ServerProcess(tmp_path / "batching", SDSERVE_BATCH_WINDOW_MS="1500").start()
    body = {
        "key": ADMIN_KEY,
        "model_id": "tiny-sd",
        "width": 64,
        "height": 64,
        "num_inference_steps": 3,
        "safety_checker": "no",
        "enhance_prompt": "no",
    }
    try:
        server.post("/api/v4/dreambooth", {**body, "prompt": "warm up"})
        answers = {}

        def submit(name, **change):
            answers[name] = server.post("/api/v4/dreambooth", {**body, **change}).json()

        threads = [
            threading.Thread(target=submit, args=("a",), kwargs={"prompt": "a fox", "seed": 1}),
            threading.Thread(
                target=submit,
                args=("b",),
                kwargs={"prompt": "a cat", "seed": 2, "guidance_scale": 3},
            ),
            threading.Thread(
                target=submit, args=("c",), kwargs={"prompt": "a dog", "seed": 3, "width": 128}
            ),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        timings = {name: answer["timings"] for name, answer in answers.items()}
        assert timings["a"]["batch_size"] == timings["b"]["batch_size"] == 2
        assert timings["c"]["batch_size"] == 1  # another size: not compatible
        assert {"queue_wait", "model_load", "denoise", "decode", "upload"} <= set(timings["a"])
        alone = server.post(
            "/api/v4/dreambooth", {**body, "prompt": "a cat", "seed": 2, "guidance_scale": 3}
        ).json()
        assert alone["timings"]["batch_size"] == 1
        diff = np.abs(
            np.asarray(decode_png(answers["b"]["output"][0]), dtype=int)
            - np.asarray(decode_png(alone["output"][0]), dtype=int)
        )
        assert diff.max() <= 1
        clips = {}

        def submit_clip(name, **change):
            clip_body = {**body, "prompt": "a fox running", "num_frames": 4, **change}
            clips[name] = server.post("/api/v6/video/text2video", clip_body).json()

        threads = [
            threading.Thread(target=submit_clip, args=(n,), kwargs={"seed": s})
            for n, s in (("x", 1), ("y", 2))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for answer in clips.values():
            assert answer["status"] == "success", answer
            assert answer["timings"]["batch_size"] == 2
            assert __import__("httpx").get(answer["output"][0]).content[4:8] == b"ftyp"
        metrics = __import__("httpx").get(server.url + "/metrics").text
        assert 'sdserve_stage_seconds_count{stage="denoise"}' in metrics
        assert "sdserve_batch_size_sum" in metrics
    finally:
        server.stop()


def test_a_server_warms_up_its_default_model_before_it_serves(tmp_path):
    """By default a worker loads the default model and times a short job of it before the API
    answers: the first request waits for no load, and its eta is priced at that speed."""
    default = Settings.model_fields["warmup_buckets"].default
    server = ServerProcess(
        tmp_path / "warm",
        SDSERVE_WARMUP_BUCKETS=f"{default}, not-a-bucket",
        SDSERVE_SYNC_WAIT_SECONDS="0",
    ).start()
    try:
        details = server.post("/api/v1/enterprise/system_details", {"key": ADMIN_KEY}).json()
        assert details["loaded_models"] == ["tiny-sd"]  # at once: no waiting for it
        assert "warm-up of not-a-bucket failed" in server.log.read_text()
        metrics = __import__("httpx").get(server.url + "/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("sdserve_seconds_per_step{"))
        assert 'model_id="tiny-sd"' in line
        seconds_per_unit = float(line.split()[-1])
        body = {"key": ADMIN_KEY, "prompt": "a fox", "width": 256, "height": 256, "samples": 4}
        answer = server.post("/api/v4/dreambooth", {**body, "num_inference_steps": 10}).json()
        assert answer["status"] == "processing", answer
        # 4 samples of 10 steps at a quarter of 512x512: 10 units, and the job's fixed one, at
        # the warm-up's speed (another shape: a guess)
        expected = max(GUESS_MARGIN * seconds_per_unit * 11, MIN_ETA_SECONDS)
        # less if the idle worker has run some of its steps by the time the answer is made
        assert expected / 2 <= answer["eta"] <= expected + 0.011, (answer, seconds_per_unit)
        done = wait_for_job(server, ADMIN_KEY, answer["id"])
        assert done["status"] == "success", done
        assert done["timings"]["model_load"] < 0.05  # resident since the warm-up
    finally:
        server.stop()

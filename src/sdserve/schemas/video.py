"""Wire schemas for the video endpoints (v4 dreambooth/text2video, v5 text2video, v6 video) and meta."""

from __future__ import annotations

from typing import Any

from sdserve.engine.prompts import enhance_prompt
from sdserve.engine.schedulers import resolve_scheduler_name
from sdserve.engine.video import VideoKind, VideoParams, runs_together
from sdserve.errors import ValidationFailed
from sdserve.media.video import VIDEO_FORMATS
from sdserve.schemas import common
from sdserve.schemas.coerce import Flag, Float, Int, Text, yes_no
from sdserve.schemas.common import (
    CommonRequest,
    Context,
    Dialect,
    Input,
    JobSpec,
    Route,
    WireFlags,
    parse_request,
)
from sdserve.settings import Settings

# v4video: /api/v4/dreambooth/text2video; v5video: /api/v5/text2video; video: /api/v6/video/*
V4VIDEO = Dialect(
    "v4video", "/api/v3/dreambooth/fetch/{id}", "Try to fetch request after given estimated time"
)
V5VIDEO = Dialect("v5video", "/api/v3/fetch/{id}")
VIDEO = Dialect("video", "/api/v6/video/fetch/{id}")
ENTERPRISE = Dialect("enterprise", "/api/v1/enterprise/video/fetch/{id}")
V7 = Dialect("v7video", "/api/v7/video-fusion/fetch/{id}", output_url=True)  # v6 bodies (§16.4)


class VideoRequest(CommonRequest):
    num_frames: Int = None
    seconds: Int = None
    fps: Int = None
    init_video: Text = None
    output_type: Text = None
    use_improved_sampling: Flag = None
    improved_sampling_seed: Int = None
    motion_bucket_id: Int = None
    noise_aug_strength: Float = None
    min_guidance_scale: Float = None
    max_guidance_scale: Float = None
    multi_lingual: Flag = None
    latent_interpolation_method: Text = None


# Defaults by dialect (reference §5): fps, seconds / frames, steps, guidance, size.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "v4video": {"fps": 8, "seconds": 2, "steps": 20, "guidance": 7.5, "size": 512, "type": "mp4"},
    "v5video": {"fps": 8, "seconds": 3, "steps": 20, "guidance": 9.0, "size": 256, "type": "mp4"},
    "video": {"fps": 7, "frames": 16, "steps": 20, "guidance": 7.0, "size": 512, "type": "mp4"},
    "v7video": {"fps": 7, "frames": 16, "steps": 20, "guidance": 7.0, "size": 512, "type": "mp4"},
    "enterprise": {
        "fps": 8,
        "seconds": 2,
        "steps": 20,
        "guidance": 7.5,
        "size": 512,
        "type": "mp4",
    },
}


def parse_video_request(body: dict) -> VideoRequest:
    return parse_request(VideoRequest, body)


def normalize_video_request(
    req: VideoRequest, kind: VideoKind, dialect: str, settings: Settings, *, model_id: str
) -> VideoParams:
    errors: dict[str, list[str]] = {}
    d = _DEFAULTS[dialect]
    prompt = common.check_prompt(req.prompt, "prompt", settings, errors, required=kind != "svd")
    negative = common.check_prompt(
        req.negative_prompt, "negative_prompt", settings, errors, required=False
    )
    if kind == "svd" and not req.init_image:
        errors["init_image"] = ["The init image field is required."]

    fps = d["fps"] if req.fps is None else req.fps
    fps = common.bounded("fps", fps, 1, settings.max_video_fps, 1000, errors)

    if req.num_frames is not None:
        num_frames = req.num_frames
    elif req.seconds is not None:
        num_frames = req.seconds * fps
    else:
        num_frames = d.get("frames") or d["seconds"] * fps
    # num_frames, or seconds x fps
    num_frames = common.bounded(
        "num_frames", num_frames, 1, settings.max_video_frames, common.HARD_MAX_FRAMES, errors
    )
    sizes = {
        name: common.size(name, value, d["size"], settings.max_video_size, errors)
        for name, value in (("width", req.width), ("height", req.height))
    }

    steps = common.steps(req.num_inference_steps, req.steps, d["steps"], settings, errors)

    output_type = (req.output_type or d["type"]).strip().lower()
    if output_type not in VIDEO_FORMATS:
        errors["output_type"] = [f"The output type must be one of: {', '.join(VIDEO_FORMATS)}."]
    common.check_webhook(req.webhook, settings, errors)
    loras = common.loras(req.lora_model, req.lora_strength)
    if errors:
        raise ValidationFailed(errors)

    init = "video" if req.init_video else "image" if (req.init_image and kind != "svd") else "none"
    guidance = d["guidance"] if req.guidance_scale is None else req.guidance_scale
    params = VideoParams(
        kind=kind,
        model_id=model_id,
        prompt=prompt,
        negative_prompt=negative or ("low quality" if dialect != "v4video" else ""),
        width=sizes["width"],
        height=sizes["height"],
        num_frames=num_frames,
        fps=fps,
        steps=steps,
        guidance_scale=max(0.0, min(guidance, 30.0)),
        seed=common.pick_seed(req.seed),
        scheduler=req.scheduler,
        strength=0.7 if req.strength is None else max(0.0, min(req.strength, 1.0)),
        init=init,
        output_type=output_type,
        clip_skip=None if req.clip_skip is None else max(1, min(req.clip_skip, 8)),
        loras=loras,
        use_improved_sampling=bool(req.use_improved_sampling),
        improved_sampling_seed=req.improved_sampling_seed or 42,
        motion_bucket_id=127
        if req.motion_bucket_id is None
        else max(1, min(req.motion_bucket_id, 1023)),
        noise_aug_strength=0.02
        if req.noise_aug_strength is None
        else max(0.0, min(req.noise_aug_strength, 1.0)),
        min_guidance_scale=1.0 if req.min_guidance_scale is None else req.min_guidance_scale,
        max_guidance_scale=3.0 if req.max_guidance_scale is None else req.max_guidance_scale,
        file_prefix=common.new_file_prefix(),
    )
    params.solo = not runs_together(params, settings.motion_context_frames)
    return params


def video_job(dialect: Dialect, *, image_to_video: bool = False, video_to_video: bool = False):
    """The route handler's work for one (dialect, text, image or video to video): body to spec."""

    def build(body: dict, ctx: Context) -> JobSpec:
        settings, registry = ctx.settings, ctx.registry
        req = parse_video_request(body)
        if video_to_video and not req.init_video:
            raise ValidationFailed({"init_video": ["The init video field is required."]})
        if image_to_video:
            model_id = req.model_id or settings.default_svd_model
        elif dialect.name in ("v4video", "enterprise") and not video_to_video:
            if not req.model_id:
                raise ValidationFailed({"model_id": ["The model id field is required."]})
            model_id = req.model_id
        else:
            model_id = req.model_id or settings.default_t2v_model

        source = registry.resolve(model_id, ctx.owner)
        registry.check_available(source)
        kind = _video_kind(model_id, registry.architecture(source), image_to_video)
        p = normalize_video_request(req, kind, dialect.name, settings, model_id=model_id)
        if req.enhance_prompt and p.prompt:
            p.prompt, p.negative_prompt = enhance_prompt(p.prompt, p.negative_prompt)
        choice = resolve_scheduler_name(p.scheduler, None, None)
        for lora_id, _ in p.loras:
            registry.resolve_lora(lora_id, ctx.owner)

        inputs = {}
        if kind == "svd" or (req.init_image and not req.init_video):
            inputs["init_image"] = Input(req.init_image)
        elif req.init_video:
            inputs["init_video"] = Input(req.init_video, "video")
        wire = WireFlags.of(
            req,
            multi_lingual=yes_no(bool(req.multi_lingual)),
            safetychecker=yes_no(bool(req.safety_checker)),
            enhance_prompt=yes_no(bool(req.enhance_prompt)),
            latent_interpolation_method=req.latent_interpolation_method or "lerp",
        )
        wire.file_prefix = p.file_prefix
        ext = "base64" if wire.base64 else p.output_type
        folder = "temp" if wire.temp else "video_generations"
        return JobSpec(
            kind=kind,
            model_id=model_id,
            params={**p.model_dump(mode="json"), **wire.stored()},
            batch_key=p.batch_key,
            cost=p.cost,
            total_steps=p.steps,
            output_names=[f"{folder}/{p.file_prefix}.{ext}"],
            meta=build_video_meta(p, wire, dialect=dialect.name, scheduler=choice.class_name),
            inputs=inputs,
            webhook=wire.webhook,
            track_id=wire.track_id,
            instant_response=wire.instant_response,
        )

    return build


def _video_kind(model_id: str, architecture: str | None, image_to_video: bool) -> VideoKind:
    if image_to_video:
        if architecture not in (None, "svd"):
            raise ValidationFailed(
                {"model_id": [f"Model {model_id} is not an image-to-video (SVD) model."]}
            )
        return "svd"
    if architecture == "t2v":
        return "t2v"
    if architecture in ("sdxl", "sd2", "svd"):
        raise ValidationFailed(
            {
                "model_id": [
                    f"Model {model_id} is not an SD1.5-family model; text2video animates SD1.5 models only."
                ]
            }
        )
    return "animatediff"  # sd15, or a single file checked when it loads


def _routes() -> list[Route]:
    routes = []
    for path, dialect, what, admin_only in (
        ("/api/v4/dreambooth/text2video", V4VIDEO, "text2video", False),
        ("/api/v5/text2video", V5VIDEO, "text2video", False),
        ("/api/v6/video/text2video", VIDEO, "text2video", False),
        ("/api/v6/video/img2video", VIDEO, "img2video", False),
        ("/api/v6/video/video2video", VIDEO, "video2video", False),
        ("/api/v7/video-fusion/text-to-video", V7, "text2video", False),
        ("/api/v7/video-fusion/image-to-video", V7, "img2video", False),
        ("/api/v7/video-fusion/video-to-video", V7, "video2video", False),
        ("/api/v1/enterprise/text2video", ENTERPRISE, "text2video", True),
        ("/api/v1/enterprise/video/text2video", ENTERPRISE, "text2video", True),
        ("/api/v1/enterprise/video/img2video", ENTERPRISE, "img2video", True),
        ("/api/v1/enterprise/video/video2video", ENTERPRISE, "video2video", True),
        ("/api/v1/enterprise/{product}/text2video", ENTERPRISE, "text2video", True),
    ):
        build = video_job(
            dialect,
            image_to_video=what == "img2video",
            video_to_video=what == "video2video",
        )
        routes.append(
            Route(
                path,
                dialect,
                build,
                VideoRequest,
                summary=f"{what} ({dialect.name})",
                admin_only=admin_only,
                tags=("video",),
            )
        )
    return routes


ROUTES = _routes()


def build_video_meta(
    p: VideoParams, w: WireFlags, *, dialect: str, scheduler: str
) -> dict[str, Any]:
    """Meta in the seed shape of §5.2 (v4), with the v5 / v6 keys added for those families."""
    meta: dict[str, Any] = {
        "prompt": p.prompt,
        "model_id": p.model_id,
        "scheduler": scheduler,
        "safetychecker": w.echo.get("safetychecker", "no"),
        "negative_prompt": p.negative_prompt,
        "W": p.width,
        "H": p.height,
        "guidance_scale": p.guidance_scale,
        "steps": p.steps,
        "strength": p.strength,
        "full_url": "no",
        "seconds": round(p.num_frames / p.fps, 3)
        if p.num_frames % p.fps
        else p.num_frames // p.fps,
        "multi_lingual": w.echo.get("multi_lingual", "no"),
        "seed": p.seed,
        "outdir": "out",
        "file_prefix": w.file_prefix,
        "num_frames": p.num_frames,
    }
    if dialect in ("v5video", "video", "v7video", "enterprise"):
        meta.update(
            fps=p.fps,
            output_type=p.output_type,
            n_samples=1,
            instant_response=yes_no(w.instant_response),
            temp=yes_no(w.temp),
            base64=yes_no(w.base64),
            clip_skip=p.clip_skip,
            lora_models=",".join(i for i, _ in p.loras) or None,
            use_improved_sampling=yes_no(p.use_improved_sampling),
            improved_sampling_seed=p.improved_sampling_seed,
            webhook=w.webhook,
            track_id=w.track_id,
        )
    if p.kind == "svd":
        meta.update(
            motion_bucket_id=p.motion_bucket_id,
            noise_aug_strength=p.noise_aug_strength,
            min_guidance_scale=p.min_guidance_scale,
            max_guidance_scale=p.max_guidance_scale,
            latent_interpolation_method=w.echo.get("latent_interpolation_method"),
        )
    return meta

"""Wire schemas for the video endpoints (v4 dreambooth/text2video, v5 text2video, v6 video) and meta."""

from __future__ import annotations

import secrets
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdserve.errors import ValidationFailed
from sdserve.media.video import VIDEO_FORMATS
from sdserve.net import url_field_errors
from sdserve.schemas.coerce import Flag, Float, FloatList, Int, StrList, Text, yes_no
from sdserve.schemas.images import validation_error_map
from sdserve.settings import Settings

# animatediff: any SD1.5 image model animated by a motion adapter (v4 text2video, v6 text2video);
# t2v: a text-to-video UNet (ModelScope / Zeroscope layout, v5 text2video); svd: img2video.
VideoKind = Literal["animatediff", "t2v", "svd"]
# v4video: /api/v4/dreambooth/text2video; v5video: /api/v5/text2video; video: /api/v6/video/*
VideoFamily = Literal["v4video", "v5video", "video", "enterprise"]


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key: Text = None
    model_id: Text = None
    prompt: Text = None
    negative_prompt: Text = None
    width: Int = None
    height: Int = None
    num_frames: Int = None
    seconds: Int = None
    fps: Int = None
    num_inference_steps: Int = None
    steps: Int = None
    guidance_scale: Float = None
    scheduler: Text = None
    seed: Int = None
    strength: Float = None
    init_image: Text = None
    init_video: Text = None
    output_type: Text = None
    base64: Flag = None
    temp: Flag = None
    instant_response: Flag = None
    clip_skip: Int = None
    lora_model: StrList = None
    lora_strength: FloatList = None
    use_improved_sampling: Flag = None
    improved_sampling_seed: Int = None
    enhance_prompt: Flag = None
    motion_bucket_id: Int = None
    noise_aug_strength: Float = None
    min_guidance_scale: Float = None
    max_guidance_scale: Float = None
    webhook: Text = None
    track_id: Any = None
    multi_lingual: Flag = None
    safety_checker: Flag = None
    latent_interpolation_method: Text = None


class VideoParams(BaseModel):
    """The effective, typed parameters of one video job, stored on the job row."""

    kind: VideoKind
    family: VideoFamily
    model_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str | None
    strength: float
    init: Literal["none", "image", "video"] = "none"
    output_type: str
    base64: bool
    temp: bool
    instant_response: bool
    clip_skip: int | None = None
    loras: list[tuple[str, float]] = Field(default_factory=list)
    use_improved_sampling: bool = False
    improved_sampling_seed: int = 42
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0
    file_prefix: str
    track_id: Any = None
    webhook: str | None = None
    echo: dict[str, Any] = Field(default_factory=dict)
    solo: bool = False  # runs in a denoising loop of its own (see runs_together)

    @property
    def batch_key(self) -> str:
        """Clips with equal keys can share one denoising loop; a solo clip's key is its own."""
        if self.solo:
            return f"video-solo|{self.file_prefix}"
        fields = (
            self.model_id,
            self.kind,
            self.width,
            self.height,
            self.num_frames,
            self.steps,
            self.scheduler,
            ",".join(f"{name}:{weight:g}" for name, weight in sorted(self.loras)),
            self.guidance_scale > 1,  # guidance on or off
        )
        return "video|" + "|".join(map(str, fields))

    @property
    def cost(self) -> float:
        """Work units as for images: frames x steps x megapixels relative to 512x512."""
        return self.num_frames * self.steps * (self.width * self.height) / (512 * 512)

    @property
    def output_key(self) -> str:
        ext = "base64" if self.base64 else self.output_type
        return f"{'temp' if self.temp else 'video_generations'}/{self.file_prefix}.{ext}"


# Defaults by family (reference §5): fps, seconds / frames, steps, guidance, size.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "v4video": {"fps": 8, "seconds": 2, "steps": 20, "guidance": 7.5, "size": 512, "type": "mp4"},
    "v5video": {"fps": 8, "seconds": 3, "steps": 20, "guidance": 9.0, "size": 256, "type": "mp4"},
    "video": {"fps": 7, "frames": 16, "steps": 20, "guidance": 7.0, "size": 512, "type": "mp4"},
    "enterprise": {
        "fps": 8,
        "seconds": 2,
        "steps": 20,
        "guidance": 7.5,
        "size": 512,
        "type": "mp4",
    },
}


def runs_together(p: VideoParams, motion_context_frames: int) -> bool:
    """Whether a clip can share a denoising loop with others. FreeNoise (clips past the motion
    adapter's window) and FreeInit work on one prompt; video-to-video and SVD start from images."""
    if p.kind == "t2v":
        return True
    return (
        p.kind == "animatediff"
        and p.init == "none"
        and not p.use_improved_sampling
        and p.num_frames <= motion_context_frames
    )


def parse_video_request(body: dict) -> VideoRequest:
    try:
        return VideoRequest.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed(validation_error_map(exc)) from None


def normalize_video_request(
    req: VideoRequest, kind: VideoKind, family: VideoFamily, settings: Settings, *, model_id: str
) -> VideoParams:
    errors: dict[str, list[str]] = {}
    d = _DEFAULTS[family]
    if kind != "svd" and (not req.prompt or not req.prompt.strip()):
        errors["prompt"] = ["The prompt field is required."]
    if kind == "svd" and not req.init_image:
        errors["init_image"] = ["The init image field is required."]

    fps = d["fps"] if req.fps is None else req.fps
    if fps < 1:
        errors["fps"] = ["The fps must be at least 1."]
    fps = max(1, min(fps, settings.max_video_fps))

    if req.num_frames is not None:
        num_frames = req.num_frames
    elif req.seconds is not None:
        num_frames = req.seconds * fps
    else:
        num_frames = d.get("frames") or d["seconds"] * fps
    if num_frames < 1 or num_frames > settings.max_video_frames:
        errors["num_frames"] = [
            f"The num frames must be between 1 and {settings.max_video_frames} "
            "(num_frames, or seconds x fps)."
        ]

    sizes = {}
    for name, value in (("width", req.width), ("height", req.height)):
        value = d["size"] if value is None else value
        if value < 64 or value > 8192:
            errors[name] = [f"The {name} must be between 64 and {settings.max_video_size}."]
        sizes[name] = max(64, min(value, settings.max_video_size)) // 8 * 8

    steps = req.num_inference_steps if req.num_inference_steps is not None else req.steps
    steps = d["steps"] if steps is None else steps
    if steps < 1 or steps > 1000:
        errors["num_inference_steps"] = [
            f"The num inference steps must be between 1 and {settings.max_steps}."
        ]
    steps = max(1, min(steps, settings.max_steps))

    output_type = (req.output_type or d["type"]).strip().lower()
    if output_type not in VIDEO_FORMATS:
        errors["output_type"] = [f"The output type must be one of: {', '.join(VIDEO_FORMATS)}."]
    errors.update(url_field_errors(req.webhook, settings, "webhook"))
    if errors:
        raise ValidationFailed(errors)

    lora_ids = req.lora_model or []
    strengths = req.lora_strength or []
    loras = [
        (lora_id, max(0.0, min(strengths[min(i, len(strengths) - 1)] if strengths else 1.0, 2.0)))
        for i, lora_id in enumerate(lora_ids)
    ]
    seed = req.seed if req.seed not in (None, -1, 0) else secrets.randbelow(2**32 - 1) + 1
    init = "video" if req.init_video else "image" if (req.init_image and kind != "svd") else "none"
    guidance = d["guidance"] if req.guidance_scale is None else req.guidance_scale
    params = VideoParams(
        kind=kind,
        family=family,
        model_id=model_id,
        prompt=(req.prompt or "").strip(),
        negative_prompt=req.negative_prompt or ("low quality" if family != "v4video" else ""),
        width=sizes["width"],
        height=sizes["height"],
        num_frames=num_frames,
        fps=fps,
        steps=steps,
        guidance_scale=max(0.0, min(guidance, 30.0)),
        seed=seed % 2**32,
        scheduler=req.scheduler,
        strength=0.7 if req.strength is None else max(0.0, min(req.strength, 1.0)),
        init=init,
        output_type=output_type,
        base64=bool(req.base64),
        temp=bool(req.temp),
        instant_response=bool(req.instant_response),
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
        file_prefix=str(uuid.uuid4()),
        track_id=req.track_id,
        webhook=req.webhook,
        echo={
            "multi_lingual": yes_no(bool(req.multi_lingual)),
            "safetychecker": yes_no(bool(req.safety_checker)),
            "enhance_prompt": yes_no(bool(req.enhance_prompt)),
            "latent_interpolation_method": req.latent_interpolation_method or "lerp",
        },
    )
    params.solo = not runs_together(params, settings.motion_context_frames)
    return params


def build_video_meta(p: VideoParams, *, scheduler: str) -> dict[str, Any]:
    """Meta in the seed shape of §5.2 (v4), with the v5 / v6 keys added for those families."""
    meta: dict[str, Any] = {
        "prompt": p.prompt,
        "model_id": p.model_id,
        "scheduler": scheduler,
        "safetychecker": p.echo.get("safetychecker", "no"),
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
        "multi_lingual": p.echo.get("multi_lingual", "no"),
        "seed": p.seed,
        "outdir": "out",
        "file_prefix": p.file_prefix,
        "num_frames": p.num_frames,
    }
    if p.family in ("v5video", "video", "enterprise"):
        meta.update(
            fps=p.fps,
            output_type=p.output_type,
            n_samples=1,
            instant_response=yes_no(p.instant_response),
            temp=yes_no(p.temp),
            base64=yes_no(p.base64),
            clip_skip=p.clip_skip,
            lora_models=",".join(i for i, _ in p.loras) or None,
            use_improved_sampling=yes_no(p.use_improved_sampling),
            improved_sampling_seed=p.improved_sampling_seed,
            webhook=p.webhook,
            track_id=p.track_id,
        )
    if p.kind == "svd":
        meta.update(
            motion_bucket_id=p.motion_bucket_id,
            noise_aug_strength=p.noise_aug_strength,
            min_guidance_scale=p.min_guidance_scale,
            max_guidance_scale=p.max_guidance_scale,
            latent_interpolation_method=p.echo.get("latent_interpolation_method"),
        )
    return meta

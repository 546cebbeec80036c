"""Wire schemas for the image endpoints (text2img / img2img / inpaint) of every family, and meta."""

from __future__ import annotations

import secrets
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdserve.errors import ValidationFailed
from sdserve.net import url_field_errors
from sdserve.schemas.coerce import Flag, Float, FloatList, Int, StrList, Text, yes_no
from sdserve.settings import Settings

Kind = Literal["text2img", "img2img", "inpaint"]
# v3: /api/v3/{text2img,...}; community: /api/v3|v4/dreambooth*; images: /api/v6/images/*;
# realtime: /api/v6/realtime/*
Family = Literal["v3", "community", "images", "realtime"]

SAFETY_TYPES = ("sensitive_content_text", "blur", "pixelate", "black")
_HARD_MAX_SIZE = 8192  # above this a size is nonsense, not something to clamp
_HARD_MAX_STEPS = 1000
_MIN_SIZE = 64


class ImageRequest(BaseModel):
    """Every field any family sends; unknown fields are ignored and null means not given."""

    model_config = ConfigDict(extra="ignore")

    key: Text = None
    model_id: Text = None
    prompt: Text = None
    negative_prompt: Text = None
    width: Int = None
    height: Int = None
    samples: Int = None
    num_inference_steps: Int = None
    steps: Int = None  # v4/v6 inpaint docs spell it this way
    guidance_scale: Float = None
    seed: Int = None
    scheduler: Text = None
    use_karras_sigmas: Flag = None
    algorithm_type: Text = None
    safety_checker: Flag = None
    safety_checker_type: Text = None
    enhance_prompt: Flag = None
    lora_model: StrList = None
    lora: StrList = None  # alias in some v6 examples
    lora_strength: FloatList = None
    embeddings_model: Text = None
    embeddings: Text = None  # v6 name
    clip_skip: Int = None
    vae: Text = None
    init_image: Text = None
    mask_image: Text = None
    strength: Float = None
    prompt_strength: Float = None  # very old docs' name for strength
    base64: Flag = None
    temp: Flag = None
    instant_response: Flag = None
    webhook: Text = None
    track_id: Any = None
    # Accepted and echoed in meta; no effect here (see docs/compatibility.md).
    multi_lingual: Flag = None
    panorama: Flag = None
    self_attention: Flag = None
    upscale: Text = None
    highres_fix: Flag = None
    tomesd: Flag = None
    enhance_style: Text = None


class GenerationParams(BaseModel):
    """The effective, typed parameters of one image job, stored on the job row."""

    kind: Kind
    family: Family
    model_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    samples: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str | None
    use_karras_sigmas: bool
    algorithm_type: str | None
    loras: list[tuple[str, float]] = Field(default_factory=list)
    embeddings_model: str | None = None
    clip_skip: int | None = None
    vae: str | None = None
    strength: float = 0.7
    init_image: str | None = None  # what the client sent (URL, or "base64" placeholder)
    mask_image: str | None = None
    safety_checker: bool
    safety_checker_type: str
    enhance_prompt: bool
    base64: bool
    temp: bool
    instant_response: bool
    file_prefix: str
    track_id: Any = None
    webhook: str | None = None
    echo: dict[str, Any] = Field(default_factory=dict)

    @property
    def batch_key(self) -> str:
        """Jobs with equal keys can share one denoising loop."""
        return "|".join(
            map(
                str,
                (
                    self.model_id,
                    self.kind,
                    self.width,
                    self.height,
                    self.steps,
                    self.scheduler,
                    self.use_karras_sigmas,
                    self.algorithm_type,
                    # the same adapters, VAE and embeddings; guidance on or off; img2img strength
                    ",".join(f"{name}:{weight:g}" for name, weight in sorted(self.loras)),
                    self.vae,
                    self.embeddings_model,
                    self.guidance_scale > 1,
                    self.strength if self.kind != "text2img" else "",
                ),
            )
        )

    @property
    def cost(self) -> float:
        """Work units: samples x steps x megapixels relative to 512x512."""
        return self.samples * self.steps * (self.width * self.height) / (512 * 512)

    def output_names(self) -> list[str]:
        """File names as the hosted API names them: v3 `{prefix}-{i}`, later `{i}-{prefix}`."""
        ext = "base64" if self.base64 else "png"
        if self.family == "v3":
            return [f"{self.file_prefix}-{i}.{ext}" for i in range(self.samples)]
        return [f"{i}-{self.file_prefix}.{ext}" for i in range(self.samples)]

    @property
    def output_folder(self) -> str:
        return "temp" if self.temp else "generations"


def validation_error_map(exc: ValidationError) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "body"
        message = (
            err["msg"]
            if err["type"] in {"integer", "number", "flag", "string"}
            else (f"The {name} field is invalid.")
        )
        fields.setdefault(name, []).append(message)
    return fields


def parse_image_request(body: dict) -> ImageRequest:
    try:
        return ImageRequest.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed(validation_error_map(exc)) from None


# Defaults that differ by family (reference §3, §6): steps, safety checker, prompt enhancement.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "v3": {"steps": 20, "safety_checker": False, "enhance_prompt": True},
    "community": {"steps": 30, "safety_checker": True, "enhance_prompt": True},
    "images": {"steps": 30, "safety_checker": True, "enhance_prompt": True},
    "realtime": {"steps": 20, "safety_checker": True, "enhance_prompt": False},
}


def _size(name: str, value: int | None, maximum: int, errors: dict) -> int:
    if value is None:
        return min(512, maximum)
    if value < _MIN_SIZE or value > _HARD_MAX_SIZE:
        errors.setdefault(name, []).append(f"The {name} must be between {_MIN_SIZE} and {maximum}.")
        return _MIN_SIZE
    return max(_MIN_SIZE, min(value, maximum)) // 8 * 8  # latents are 1/8 of the image


def normalize_image_request(
    req: ImageRequest, kind: Kind, family: Family, settings: Settings, *, model_id: str
) -> GenerationParams:
    """Validate and clamp a wire request into GenerationParams; raise ValidationFailed."""
    errors: dict[str, list[str]] = {}
    defaults = _FAMILY_DEFAULTS[family]
    if not req.prompt or not req.prompt.strip():
        errors["prompt"] = ["The prompt field is required."]
    if kind in ("img2img", "inpaint") and not req.init_image:
        errors["init_image"] = ["The init image field is required."]
    if kind == "inpaint" and not req.mask_image:
        errors["mask_image"] = ["The mask image field is required."]

    width = _size("width", req.width, settings.max_width, errors)
    height = _size("height", req.height, settings.max_height, errors)

    samples = 1 if req.samples is None else req.samples
    if samples < 1:
        errors["samples"] = ["The samples must be at least 1."]
    samples = max(1, min(samples, settings.max_samples))

    steps = req.num_inference_steps if req.num_inference_steps is not None else req.steps
    steps = defaults["steps"] if steps is None else steps
    if steps < 1 or steps > _HARD_MAX_STEPS:
        errors["num_inference_steps"] = [
            f"The num inference steps must be between 1 and {settings.max_steps}."
        ]
    steps = max(1, min(steps, settings.max_steps))

    guidance = 7.5 if req.guidance_scale is None else req.guidance_scale
    if guidance < 0:
        errors["guidance_scale"] = ["The guidance scale must be at least 0."]
    guidance = max(0.0, min(guidance, 30.0))

    strength = req.strength if req.strength is not None else req.prompt_strength
    strength = 0.7 if strength is None else max(0.0, min(strength, 1.0))

    safety_type = (req.safety_checker_type or "sensitive_content_text").strip().lower()
    if safety_type not in SAFETY_TYPES:
        errors["safety_checker_type"] = [
            f"The safety checker type must be one of: {', '.join(SAFETY_TYPES)}."
        ]

    lora_ids = req.lora_model or req.lora or []
    strengths = req.lora_strength or []
    loras = [
        (
            lora_id,
            max(
                0.0,
                min(
                    strengths[i] if i < len(strengths) else (strengths[-1] if strengths else 1.0),
                    2.0,
                ),
            ),
        )
        for i, lora_id in enumerate(lora_ids)
    ]

    clip_skip = req.clip_skip
    if clip_skip is not None:
        if clip_skip < 1:
            errors["clip_skip"] = ["The clip skip must be between 1 and 8."]
        clip_skip = max(1, min(clip_skip, 8))

    errors.update(url_field_errors(req.webhook, settings, "webhook"))

    if errors:
        raise ValidationFailed(errors)

    # null, -1 and 0 all mean "random"; the seed actually used is chosen now and echoed in meta.
    seed = req.seed if req.seed not in (None, -1, 0) else secrets.randbelow(2**32 - 1) + 1
    seed = seed % 2**32

    return GenerationParams(
        kind=kind,
        family=family,
        model_id=model_id,
        prompt=req.prompt.strip(),
        negative_prompt=req.negative_prompt or "",
        width=width,
        height=height,
        samples=samples,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        scheduler=req.scheduler,
        use_karras_sigmas=True if req.use_karras_sigmas is None else req.use_karras_sigmas,
        algorithm_type=req.algorithm_type if req.algorithm_type not in (None, "", "none") else None,
        loras=loras,
        embeddings_model=req.embeddings_model or req.embeddings,
        clip_skip=clip_skip,
        vae=req.vae,
        strength=strength,
        init_image=_echo_image(req.init_image),
        mask_image=_echo_image(req.mask_image),
        safety_checker=defaults["safety_checker"]
        if req.safety_checker is None
        else req.safety_checker,
        safety_checker_type=safety_type,
        enhance_prompt=defaults["enhance_prompt"]
        if req.enhance_prompt is None
        else req.enhance_prompt,
        base64=bool(req.base64),
        temp=bool(req.temp),
        instant_response=bool(req.instant_response),
        file_prefix=str(uuid.uuid4()),
        track_id=req.track_id,
        webhook=req.webhook,
        echo={
            "multi_lingual": yes_no(bool(req.multi_lingual)),
            "panorama": yes_no(bool(req.panorama)),
            "self_attention": yes_no(bool(req.self_attention)),
            "upscale": req.upscale or "no",
            "highres_fix": yes_no(bool(req.highres_fix)),
            "tomesd": yes_no(req.tomesd is not False),
            "enhance_style": req.enhance_style,
        },
    )


def _echo_image(value: str | None) -> str | None:
    """URLs are echoed in meta; inline base64 is not (it can be megabytes)."""
    if value is None:
        return None
    return value if value.startswith(("http://", "https://")) else "base64"


def build_meta(p: GenerationParams, *, model_label: str, scheduler: str) -> dict[str, Any]:
    """The `meta` echo of effective parameters, in the key style of the job's family (§1.5)."""
    lora = ",".join(lora_id for lora_id, _ in p.loras) or None
    lora_strength = ",".join(f"{s:g}" for _, s in p.loras) or None
    if p.family == "v3":
        meta = {
            "H": p.height,
            "W": p.width,
            "enable_attention_slicing": "true",
            "file_prefix": p.file_prefix,
            "guidance_scale": p.guidance_scale,
            "model": model_label,
            "n_samples": p.samples,
            "negative_prompt": p.negative_prompt,
            "outdir": "out",
            "prompt": p.prompt,
            "revision": "fp16",
            "safetychecker": yes_no(p.safety_checker),
            "seed": p.seed,
            "steps": p.steps,
            "vae": p.vae or "default",
            "scheduler": scheduler,
        }
    elif p.family == "realtime":
        meta = {
            "width": p.width,
            "height": p.height,
            "base64": yes_no(p.base64),
            "enhance_prompt": yes_no(p.enhance_prompt),
            "enhance_style": p.echo.get("enhance_style"),
            "file_prefix": p.file_prefix,
            "guidance_scale": p.guidance_scale,
            "instant_response": yes_no(p.instant_response),
            "n_samples": p.samples,
            "negative_prompt": p.negative_prompt,
            "outdir": "out",
            "prompt": p.prompt,
            "safety_checker": yes_no(p.safety_checker),
            "safety_checker_type": p.safety_checker_type,
            "seed": p.seed,
            "steps": p.steps,
            "temp": yes_no(p.temp),
            "track_id": p.track_id,
            "webhook": p.webhook,
        }
    else:
        meta = {
            "prompt": p.prompt,
            "model_id": p.model_id,
            "negative_prompt": p.negative_prompt,
            "scheduler": scheduler,
            "safetychecker": yes_no(p.safety_checker),
            "W": p.width,
            "H": p.height,
            "guidance_scale": p.guidance_scale,
            "seed": p.seed,
            "steps": p.steps,
            "n_samples": p.samples,
            "full_url": "no",
            "upscale": p.echo.get("upscale", "no"),
            "multi_lingual": p.echo.get("multi_lingual"),
            "panorama": p.echo.get("panorama"),
            "self_attention": p.echo.get("self_attention"),
            "embeddings": p.embeddings_model,
            "lora": lora,
            "lora_strength": lora_strength,
            "clip_skip": p.clip_skip or 1,
            "vae": p.vae,
            "use_karras_sigmas": yes_no(p.use_karras_sigmas),
            "algorithm_type": p.algorithm_type or "none",
            "safety_checker_type": p.safety_checker_type,
            "tomesd": p.echo.get("tomesd"),
            "enhance_prompt": yes_no(p.enhance_prompt),
            "instant_response": yes_no(p.instant_response),
            "temp": yes_no(p.temp),
            "base64": yes_no(p.base64),
            "webhook": p.webhook,
            "track_id": p.track_id,
            "outdir": "out",
            "file_prefix": p.file_prefix,
        }
    if p.kind != "text2img":
        meta["init_image"] = p.init_image
        meta["strength"] = p.strength
    if p.kind == "inpaint":
        meta["mask_image"] = p.mask_image
    return meta
